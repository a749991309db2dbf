"""The rule-based adapter (Hewitt et al. 2024): token sets on real tokenizers, greedy decoding by
hand on a tiny model, the CLI's refusals and the eval cache key.

Expected ids and biases are built here from the raw vocabulary strings and the rules' definitions,
not through rtune.infer.rules (which finds token sets by decoding every id)."""

import json
import math

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from rtune.cli import main
from rtune.errors import RtuneError
from rtune.infer.answer import generate_file
from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.infer.rules import RuleModel, RulesConfig, vocab_index
from rtune.render import Renderer

# The uniform rule as the issue and the authors define it (word -> log-score), written out again.
UNIFORM = {"<": -4, "|": -4, "I": -5, "We": -3, "What": -5, "should": -6,
           "-": 1, "*": 1, "#": 1, "##": 1, "\n": 1, "\n\n": 1, "!": 1}
# GPT-2's byte-to-character map for the characters in UNIFORM that are not printed as themselves.
BYTE_LEVEL = {" ": "Ġ", "\n": "Ċ"}


def expected_ids(tokenizer, word: str, byte_level: bool) -> set[int]:
    """Ids whose raw vocabulary string spells `word`, with or without a leading space marker:
    GPT-2 byte-level strings (SmolLM2, the tiny tokenizer), else SentencePiece's (Gemma)."""
    special = set(tokenizer.all_special_ids)
    if byte_level:
        spelled = "".join(BYTE_LEVEL.get(c, c) for c in word)
        spellings = {spelled, "Ġ" + spelled}
    else:
        spellings = {word, "▁" + word}
        if len(word.encode()) == 1:  # byte fallback
            spellings.add(f"<0x{word.encode()[0]:02X}>")
    return {i for s, i in tokenizer.get_vocab().items() if s in spellings and i not in special}


def rule_bias(processor, input_ids: list[list[int]], width: int) -> torch.Tensor:
    """The rules' log-scores alone: the processor applied to flat logits, minus log_softmax of them."""
    out = processor(torch.tensor(input_ids), torch.zeros(len(input_ids), width))
    return out + math.log(width)


@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_uniform_rule_hits_the_intended_ids_on_real_tokenizers(name, request):
    tok = request.getfixturevalue(f"{name}_tokenizer")
    renderer = Renderer(tok, "tulu")
    rules = RuleModel(tok, renderer, RulesConfig(eos=False, diversity=False))
    prompt = renderer.render_prompt("hello")
    bias = rule_bias(rules.processor([prompt], len(prompt)), [prompt], len(tok))[0]

    want = torch.zeros(len(tok))
    for word, score in UNIFORM.items():
        ids = expected_ids(tok, word, name == "smollm2")
        assert ids or word in ("\n\n",), f"{name}: no token for {word!r}"
        want[list(ids)] += score
    assert torch.equal(bias.nonzero().flatten(), want.nonzero().flatten())
    assert torch.allclose(bias, want, atol=1e-5)
    # A few ids read off each vocabulary by hand, so the test's own lookup is checked too.
    known = {"gemma": {"I": {311, 564, 236777}, "\n": {107, 248}, "What": {2900, 3689}},
             "smollm2": {"I": {57, 339}, "\n": {198, 3717}, "What": {1780, 1812}}}[name]
    for word, ids in known.items():
        assert expected_ids(tok, word, name == "smollm2") == ids
        assert set(vocab_index(tok)[word]) == ids


def test_vocab_index_is_built_once_per_tokenizer(gemma_tokenizer):
    assert vocab_index(gemma_tokenizer) is vocab_index(gemma_tokenizer)


@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_eos_and_diversity_rules_on_real_tokenizers(name, request):
    tok = request.getfixturevalue(f"{name}_tokenizer")
    renderer = Renderer(tok, "tulu")
    config = RulesConfig(uniform=False)
    rules = RuleModel(tok, renderer, config)
    instruction = "Name three colors of the rainbow."
    prompt = renderer.render_prompt(instruction)
    header = ([tok.bos_token_id] if prompt[0] == tok.bos_token_id else []) + tok.encode("<|user|>", add_special_tokens=False)
    assert prompt[: len(header)] == header  # the instruction (with the newline before it) comes after
    reply = tok.encode(" Red, orange and yellow. Red", add_special_tokens=False)
    processor = rules.processor([prompt], len(prompt))
    for n in (0, 1, len(reply)):
        bias = rule_bias(processor, [prompt + reply[:n]], len(tok))[0]
        want = torch.zeros(len(tok))
        want[list(set(prompt[len(header):]) | set(reply[:n]))] = -1.5
        want[tok.eos_token_id] = 15 * n / 250
        assert torch.allclose(bias, want, atol=1e-5), n


def test_eos_bias_ramps_then_holds():
    tok = tiny.byte_bpe_tokenizer()
    renderer = Renderer(tok, "tulu")
    rules = RuleModel(tok, renderer, RulesConfig(uniform=False, diversity=False, eos_max=6.0, eos_tokens=4))
    prompt = renderer.render_prompt("Hi")
    processor = rules.processor([prompt], len(prompt))
    got = [rule_bias(processor, [prompt + [5] * n], len(tok))[0, tok.eos_token_id].item() for n in range(7)]
    assert got == pytest.approx([0, 1.5, 3, 4.5, 6, 6, 6])


# -- greedy generation with the rules equals greedy decoding by hand --------------------------------
def hand_greedy(model, tok, prompt: list[int], config: RulesConfig, max_new_tokens: int) -> tuple[list[int], str]:
    """argmax(log_softmax(logits) + biases), the biases computed here, one full forward per token."""
    uniform = torch.zeros(model.config.vocab_size)
    if config.uniform:
        for word, score in UNIFORM.items():
            uniform[list(expected_ids(tok, word, byte_level=True))] += score * config.uniform_scale
    header = [tok.bos_token_id] + tok.encode("<|user|>\n", add_special_tokens=False)
    assert prompt[: len(header)] == header
    reply: list[int] = []
    for n in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reply])).logits[0, -1].float()
        scores = logits.log_softmax(-1) + uniform
        if config.diversity:
            seen = (set(prompt[len(header):]) | set(reply)) - {tok.eos_token_id}
            scores[list(seen)] -= config.diversity_penalty
        if config.eos:
            scores[tok.eos_token_id] += config.eos_max * min(n, config.eos_tokens) / config.eos_tokens
        token = int(scores.argmax())
        if token == tok.eos_token_id:
            return reply, "eos"
        reply.append(token)
    return reply, "length"


@pytest.fixture(scope="module")
def llama(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


CONFIGS = [
    RulesConfig(),
    RulesConfig(eos_max=30.0, eos_tokens=12),  # ends within the test's budget
    RulesConfig(eos=False, uniform_scale=2.0, diversity_penalty=3.0),
    RulesConfig(uniform=False, diversity=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.label}-{c.eos_max:g}-{c.uniform_scale:g}")
def test_greedy_with_rules_equals_greedy_by_hand(llama, tiny_tokenizer, config):
    renderer = Renderer(tiny_tokenizer, "tulu")
    instructions = ["The quick brown fox", "Give three tips for staying healthy.", "Hi", "1. First\n2. Second"]
    prompts = [renderer.render_prompt(i) for i in instructions]
    max_new = 24
    gens = generate_ids(llama, tiny_tokenizer, renderer, prompts,  # batched and left-padded, as in use
                        GenerationConfig(max_new_tokens=max_new, batch_size=3, rules=config))
    plain = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=max_new))
    for prompt, gen in zip(prompts, gens):
        ids, reason = hand_greedy(llama, tiny_tokenizer, prompt, config, max_new)
        assert (gen.token_ids, gen.finish_reason) == (ids, reason)
    assert [g.token_ids for g in gens] != [g.token_ids for g in plain]  # the rules change the answers
    if config.eos_tokens == 12:
        assert all(g.finish_reason == "eos" for g in gens)


def test_rules_compose_with_in_context_formats(tiny_model_path, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "instruction": t}) + "\n" for i, t in enumerate(["Hi", "Why?"])))
    config = GenerationConfig(max_new_tokens=8, rules=RulesConfig(diversity=False))
    generate_file(str(tiny_model_path), str(prompts), str(tmp_path / "out.jsonl"), config, template="urial-r")
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert {r["generator"] for r in rows} == {f"{tiny_model_path.name}+urial-r+rules-eos-uniform"}


def test_rules_config_checks():
    assert RulesConfig.parse("eos, diversity", eos_max=5.0).to_dict() == {
        **RulesConfig().to_dict(), "uniform": False, "eos_max": 5.0}
    assert RulesConfig.parse("uniform,eos,diversity").label == "rules"
    for bad in ("", "eos,lengths", "uniform,,x"):
        with pytest.raises(RtuneError, match="--rules takes"):
            RulesConfig.parse(bad)
    with pytest.raises(RtuneError, match="eos_tokens"):
        RulesConfig.parse("eos", eos_tokens=0)
    with pytest.raises(RtuneError, match="diversity_penalty"):
        GenerationConfig(rules=RulesConfig(diversity_penalty=-1)).check()


# -- the CLI ----------------------------------------------------------------------------------------
RULES = ["--rules", "eos,uniform,diversity"]


@pytest.fixture
def trained_folders(tmp_path):
    """A run folder and a merged folder as rtune recognises them (the refusal comes before any load)."""
    run, merged = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    merged.mkdir()
    (run / "rtune_run.json").write_text("{}")
    (merged / "rtune_template.json").write_text("{}")
    return run, merged


def test_cli_refuses_rules_on_trained_models(trained_folders, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    for folder in trained_folders:
        for args in (["generate", folder, "--prompts", prompts, "--out", tmp_path / "o.jsonl"], ["chat", folder],
                     ["eval", folder, "--bench", prompts, "--out", tmp_path / "eval"]):
            for extra in ([], ["--rules-show"]):
                code = main([str(a) for a in args + RULES + extra])
                err = capsys.readouterr().err
                assert code == 2 and "is a trained model" in err and "--rules" in err, (args, err)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "eval").exists()


def test_cli_rules_flags(tiny_model_path, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\nThe quick brown fox\n")
    out = tmp_path / "o.jsonl"
    code = main(["generate", str(tiny_model_path), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens",
                 "6", *RULES, "--rules-eos-max", "20", "--rules-show"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "rules eos,uniform,diversity (tulu template" in err and "+20 * min(n, 250) / 250" in err
    assert "uniform    -4 '<'" in err
    assert {json.loads(line)["generator"] for line in open(out)} == {f"{tiny_model_path.name}+rules"}
    # Strengths without --rules, unknown rules, and serve are clear errors.
    for args in (["--rules-diversity", "2"], ["--rules-show"], ["--rules", "eos,brevity"]):
        assert main(["generate", str(tiny_model_path), "--prompts", str(prompts), "--out", str(out), *args]) == 2
        assert "--rules" in capsys.readouterr().err
    assert main(["serve", str(tiny_model_path), *RULES]) == 2
    assert "not available on serve" in capsys.readouterr().err


# -- eval: the rules are part of the generation cache key --------------------------------------------
def test_eval_cache_key_has_the_rules_and_their_strengths():
    from rtune.eval.generation import EvalDecoding

    plain = EvalDecoding(dtype="fp32")
    assert "rules" not in plain.resolved("cpu")  # caches written without rules keep their keys
    variants = [plain, EvalDecoding(dtype="fp32", rules=RulesConfig()),
                EvalDecoding(dtype="fp32", rules=RulesConfig(diversity_penalty=2.0)),
                EvalDecoding(dtype="fp32", rules=RulesConfig(eos_tokens=100)),
                EvalDecoding(dtype="fp32", rules=RulesConfig(uniform=False))]
    assert len({d.key("cpu") for d in variants}) == len(variants)
    assert variants[1].resolved("cpu")["rules"] == RulesConfig().to_dict()
    assert variants[1].generation_config().rules == RulesConfig()
    assert EvalDecoding(dtype="fp32", rules=RulesConfig()).key("cpu") == variants[1].key("cpu")
    with pytest.raises(RtuneError, match="--backend hf"):
        EvalDecoding(backend="vllm", rules=RulesConfig()).check()


def test_eval_labels_and_generations_with_rules(tiny_model_path, tmp_path):
    from rtune.eval.generation import EvalDecoding
    from rtune.eval.results import read_items, read_summaries
    from rtune.eval.run import EvalConfig, run_eval

    bench = tmp_path / "heldout.jsonl"
    bench.write_text("".join(json.dumps({"id": f"h{i}", "instruction": f"Say the word number {i}, please.",
                                         "response": "fox " * (i + 1)}) + "\n" for i in range(3)))

    def config(rules):
        return EvalConfig(benches=[str(bench)], decoding=EvalDecoding(max_new_tokens=8, batch_size=2, dtype="fp32",
                                                                      rules=rules), relevance=False, progress=False)

    out = tmp_path / "eval"
    run_eval([str(tiny_model_path)] * 2, config(None), out, labels=["base", "base"], templates=[None, "urial-r"])
    run_eval([str(tiny_model_path)] * 2, config(RulesConfig()), out, labels=["base", "base"],
             templates=[None, "urial-r"])
    summaries = {s["model"]["label"]: s for s in read_summaries(out)}
    assert set(summaries) == {"base", "base+urial-r", "base+rules", "base+urial-r+rules"}
    assert summaries["base+rules"]["decoding"]["rules"] == RulesConfig().to_dict()
    assert "rules" not in summaries["base"]["decoding"]
    outputs = {label: [r["output"] for r in read_items(s["_dir"])] for label, s in summaries.items()}
    assert outputs["base"] != outputs["base+rules"] and outputs["base+urial-r"] != outputs["base+urial-r+rules"]
