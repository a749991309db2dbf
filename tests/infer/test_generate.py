"""Batched generation on tiny random models: padding, stopping, sampling, prompt files."""

import json
import sys
import types

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

import rtune.infer.answer as answer
from rtune import run_folder
from rtune.data import read_prompts
from rtune.errors import RtuneError
from rtune.infer.answer import generate_file
from rtune.infer.generate import Generation, GenerationConfig, generate_ids
from rtune.infer.load import load_for_inference
from rtune.render import Renderer

INSTRUCTIONS = [
    "Hi",
    "Give three tips for staying healthy. " * 6,
    "The quick brown fox",
    "1. First\n2. Second\n3. Third\n" * 3,
    "x",
]


@pytest.fixture(scope="module")
def llama(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def renderer(tiny_tokenizer):
    return Renderer(tiny_tokenizer, "tulu")


def _force(model, token_id: int, only_padded_rows: bool = False):
    """Make the model always predict token_id (optionally only for left-padded batch rows)."""

    def hook(module, args, kwargs, output):
        rows = slice(None)
        if only_padded_rows:
            rows = (kwargs["attention_mask"] == 0).any(dim=1)
        output.logits[rows, :, token_id] += 1e4
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


class _Script:
    """Make the model generate exactly `ids` (then EOS), counting the forward passes (one per
    generated token), while registered: `with _Script(model, ids) as script: ...`."""

    def __init__(self, model, ids: list[int], eos_id: int):
        self.model, self.ids, self.calls = model, list(ids) + [eos_id], 0

    def __enter__(self):
        step = {"n": 0}

        def hook(module, args, kwargs, output):
            if kwargs["input_ids"].shape[1] > 1:  # a new prompt (prefill): the script starts over
                step["n"] = 0
            output.logits[:, -1, self.ids[min(step["n"], len(self.ids) - 1)]] += 1e4
            step["n"] += 1
            self.calls += 1
            return output

        self.handle = self.model.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_one_at_a_time(arch, llama, tiny_tokenizer, renderer):
    model = llama if arch == "llama" else tiny.tiny_gpt2(tiny_tokenizer)
    prompts = [renderer.render_prompt(x) for x in INSTRUCTIONS]
    assert max(map(len, prompts)) > 5 * min(map(len, prompts))
    config = GenerationConfig(max_new_tokens=12, batch_size=3)
    batched = generate_ids(model, tiny_tokenizer, renderer, prompts, config)
    alone = [generate_ids(model, tiny_tokenizer, renderer, [p], config)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert all(isinstance(g, Generation) and g.num_tokens == len(g.token_ids) for g in batched)
    # One big batch (sorted differently) gives the same, in input order.
    whole = generate_ids(model, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=12, batch_size=8))
    assert [g.token_ids for g in whole] == [g.token_ids for g in alone]


def test_stops_at_eos(llama, tiny_tokenizer, renderer):
    handle = _force(llama, tiny_tokenizer.eos_token_id)
    try:
        out = generate_ids(llama, tiny_tokenizer, renderer, [renderer.render_prompt("Hi")], GenerationConfig(max_new_tokens=8))
    finally:
        handle.remove()
    assert out[0].finished and out[0].token_ids == [] and out[0].text == "" and out[0].num_tokens == 0
    assert out[0].finish_reason == "eos"


def test_stops_at_any_stop_id(llama, tiny_tokenizer, renderer):
    # A "model" template ends turns with its own token (e.g. <end_of_turn>); any stop id ends a reply.
    other = tiny_tokenizer.convert_tokens_to_ids("<bos>")
    stub = types.SimpleNamespace(stop_ids=[other, tiny_tokenizer.eos_token_id])
    handle = _force(llama, other)
    try:
        out = generate_ids(llama, tiny_tokenizer, stub, [renderer.render_prompt("Hi")], GenerationConfig(max_new_tokens=8))
    finally:
        handle.remove()
    assert out[0].finished and out[0].token_ids == [] and out[0].finish_reason == "eos"


def test_hits_max_new_tokens(llama, tiny_tokenizer, renderer):
    out = generate_ids(llama, tiny_tokenizer, renderer, [renderer.render_prompt("Hi")], GenerationConfig(max_new_tokens=5))
    assert not out[0].finished and out[0].num_tokens == 5 and tiny_tokenizer.eos_token_id not in out[0].token_ids
    assert out[0].finish_reason == "length"


def test_mixed_batch_strips_padding_after_stop(llama, tiny_tokenizer, renderer):
    # The short prompt (left-padded) stops at once; the long one runs on, so the short row is padded.
    prompts = [renderer.render_prompt("Hi"), renderer.render_prompt(INSTRUCTIONS[1])]
    handle = _force(llama, tiny_tokenizer.eos_token_id, only_padded_rows=True)
    try:
        short, long = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=6))
    finally:
        handle.remove()
    assert short.finished and short.token_ids == [] and short.text == "" and short.finish_reason == "eos"
    assert not long.finished and long.num_tokens == 6 and long.finish_reason == "length"


# -- stop strings -----------------------------------------------------------------------------------
def test_template_stop_string_cuts_an_invented_next_turn(llama, tiny_tokenizer, renderer):
    # A base model under the tulu format runs on into "\n<|user|>\n...": the reply ends before it.
    script = _ids(tiny_tokenizer, "Sure thing.\n<|user|>\nAnd more")
    assert len(_ids(tiny_tokenizer, "<|user|>")) > 1  # a stop string spanning several tokens
    prompt = renderer.render_prompt("Hi")
    with _Script(llama, script, tiny_tokenizer.eos_token_id) as s:
        (out,) = generate_ids(llama, tiny_tokenizer, renderer, [prompt], GenerationConfig(max_new_tokens=40))
    assert out.text == "Sure thing." and out.finish_reason == "stop" and out.finished
    kept = _ids(tiny_tokenizer, "Sure thing.")
    assert out.token_ids == script[: len(kept)] == kept and out.num_tokens == len(kept)
    # HF stopped at the token that completes "<|user|>" (the "\n" after it was never generated).
    assert s.calls == len(_ids(tiny_tokenizer, "Sure thing.\n<|user|>"))
    # The "model" template has no stop strings: the same script then runs on to EOS.
    with _Script(llama, script, tiny_tokenizer.eos_token_id):
        stub = types.SimpleNamespace(stop_ids=renderer.stop_ids, stop_strings=[])
        (plain,) = generate_ids(llama, tiny_tokenizer, stub, [prompt], GenerationConfig(max_new_tokens=40))
    assert plain.text == "Sure thing.\n<|user|>\nAnd more" and plain.finish_reason == "eos"


@pytest.mark.parametrize(
    "stop, kept_text, kept_tokens",
    [
        ("Third", "Eat well.", 3),  # the space before the stop is cut with it
        ("hird", "Eat well. T", 4),  # the token " Third" holds kept text and the stop's start: it is kept
        (".", "Eat well", 2),  # the earliest occurrence counts
    ],
)
def test_user_stop_cut_and_tokens(llama, tiny_tokenizer, renderer, stop, kept_text, kept_tokens):
    script = _ids(tiny_tokenizer, "Eat well. Third.")
    assert [tiny_tokenizer.decode([t]) for t in script] == ["Eat", " well", ".", " Third", "."]
    with _Script(llama, script, tiny_tokenizer.eos_token_id):
        (out,) = generate_ids(llama, tiny_tokenizer, renderer, [renderer.render_prompt("Hi")],
                              GenerationConfig(max_new_tokens=20, stop=[stop]))  # fmt: skip
    assert (out.text, out.finish_reason) == (kept_text, "stop")
    assert out.token_ids == script[:kept_tokens] and out.num_tokens == kept_tokens


def test_stop_string_does_not_begin_in_the_prompt(llama, tiny_tokenizer, renderer):
    # The prompt ends with "\n"; a reply "\n\n" stops at a blank line of its own, not at its first "\n"
    # (HF's stock stop_strings matches across the prompt boundary and would stop after one token).
    prompt = renderer.render_prompt("Hi")
    assert tiny_tokenizer.decode(prompt).endswith("\n")
    nl = _ids(tiny_tokenizer, "\n")
    with _Script(llama, nl * 5 + _ids(tiny_tokenizer, "x"), tiny_tokenizer.eos_token_id) as s:
        (out,) = generate_ids(llama, tiny_tokenizer, renderer, [prompt],
                              GenerationConfig(max_new_tokens=20, stop=["\n\n"]))  # fmt: skip
    assert s.calls == 2 and out.finish_reason == "stop" and out.text == "" and out.num_tokens == 0


def test_special_token_stop_string(llama, tiny_tokenizer, renderer):
    # A stop string that is a special token (skipped when decoding) is matched as a token id.
    bos = tiny_tokenizer.convert_tokens_to_ids("<bos>")
    script = _ids(tiny_tokenizer, "Eat well.") + [bos] + _ids(tiny_tokenizer, "x")
    prompt = renderer.render_prompt("Hi")
    with _Script(llama, script, tiny_tokenizer.eos_token_id):
        (out,) = generate_ids(llama, tiny_tokenizer, renderer, [prompt],
                              GenerationConfig(max_new_tokens=20, stop=["<bos>"]))  # fmt: skip
        (plain,) = generate_ids(llama, tiny_tokenizer, renderer, [prompt], GenerationConfig(max_new_tokens=20))
    assert (out.text, out.finish_reason, out.token_ids) == ("Eat well.", "stop", script[:3])
    assert (plain.text, plain.finish_reason) == ("Eat well.x", "eos")


def test_bad_stop_strings(llama, tiny_tokenizer, renderer):
    for bad in ([""], [None]):
        with pytest.raises(RtuneError, match="stop strings"):
            generate_ids(llama, tiny_tokenizer, renderer, [[1, 2]], GenerationConfig(stop=bad))


def _stops_from(tokenizer, gens, want=2, width=3) -> dict[int, str]:
    """Stop strings for `want` rows: the text of `width` greedy tokens of the row, past its first
    quarter, that appears nowhere earlier in its reply (so the row stops there, over several tokens)."""
    stops = {}
    for row, g in enumerate(gens):
        ids = g.token_ids
        for k in range(len(ids) // 4, len(ids) - width):
            before, piece = tokenizer.decode(ids[:k]), tokenizer.decode(ids[k : k + width])
            text = tokenizer.decode(ids[: k + width])  # the random model writes broken UTF-8 too: avoid it
            if piece.strip() and "\ufffd" not in piece and text == before + piece and text.find(piece) == len(before):
                stops[row] = piece
                break
        if len(stops) == want:
            return stops
    raise AssertionError(f"no stop strings found in {gens}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_one_at_a_time_with_stops(arch, llama, tiny_tokenizer, renderer):
    model = llama if arch == "llama" else tiny.tiny_gpt2(tiny_tokenizer)
    prompts = [renderer.render_prompt(x) for x in INSTRUCTIONS]
    free = generate_ids(model, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=24, batch_size=8))
    stops = _stops_from(tiny_tokenizer, free)
    config = GenerationConfig(max_new_tokens=24, batch_size=3, stop=list(stops.values()))
    batched = generate_ids(model, tiny_tokenizer, renderer, prompts, config)
    alone = [generate_ids(model, tiny_tokenizer, renderer, [p], config)[0] for p in prompts]
    def key(gens):
        return [(g.text, g.token_ids, g.finish_reason) for g in gens]

    assert key(batched) == key(alone)
    config.batch_size = 8
    whole = generate_ids(model, tiny_tokenizer, renderer, prompts, config)
    assert key(whole) == key(alone)
    # The stops took effect: their rows end early, each with a prefix of its free-running reply.
    for row in stops:
        assert batched[row].finish_reason == "stop" and batched[row].num_tokens < free[row].num_tokens
        assert free[row].text.startswith(batched[row].text)
        assert batched[row].token_ids == free[row].token_ids[: batched[row].num_tokens]
    assert "length" in [g.finish_reason for g in batched]


def test_sampling_is_seeded(llama, tiny_tokenizer, renderer):
    prompts = [renderer.render_prompt(x) for x in INSTRUCTIONS[:3]]
    cfg = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, top_k=50)
    a = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(seed=1, **cfg))
    b = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(seed=1, **cfg))
    c = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(seed=2, **cfg))
    greedy = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=10))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]


def test_repetition_penalty_is_applied(llama, tiny_tokenizer, renderer):
    prompts = [renderer.render_prompt(x) for x in INSTRUCTIONS]
    plain = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=20))
    cfg = GenerationConfig(max_new_tokens=20, repetition_penalty=5.0)
    a = generate_ids(llama, tiny_tokenizer, renderer, prompts, cfg)
    b = generate_ids(llama, tiny_tokenizer, renderer, prompts, cfg)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in plain]
    # A strong penalty makes the random model repeat itself less.
    assert sum(len(set(g.token_ids)) for g in a) > sum(len(set(g.token_ids)) for g in plain)


def test_checkpoint_generation_config_does_not_leak(llama, tiny_tokenizer, renderer):
    # A checkpoint that samples by default must still decode greedily unless asked.
    prompts = [renderer.render_prompt(x) for x in INSTRUCTIONS[:2]]
    expected = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=10))
    saved = llama.generation_config
    llama.generation_config = saved.__class__(do_sample=True, temperature=3.0, top_k=5, repetition_penalty=3.0)
    try:
        got = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=10))
    finally:
        llama.generation_config = saved
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]


def test_bad_configs_and_inputs(llama, tiny_tokenizer, renderer):
    assert generate_ids(llama, tiny_tokenizer, renderer, []) == []
    with pytest.raises(RtuneError, match="empty"):
        generate_ids(llama, tiny_tokenizer, renderer, [[]])
    for bad in (dict(max_new_tokens=0), dict(batch_size=0), dict(temperature=0), dict(top_p=0), dict(top_k=-1)):
        with pytest.raises(RtuneError):
            generate_ids(llama, tiny_tokenizer, renderer, [[1, 2]], GenerationConfig(**bad))


# -- prompt files and generate_file ---------------------------------------------------------------
@pytest.fixture
def loaded(monkeypatch, llama, tiny_tokenizer, renderer):
    """generate_file with the tiny model, whatever the model argument (rtune.models is not under test)."""
    calls = []

    def fake_load(model_or_run, template=None, **kw):
        calls.append((model_or_run, template))
        return llama, tiny_tokenizer, renderer

    monkeypatch.setattr(answer, "load_for_inference", fake_load)
    return calls


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_file_jsonl(tmp_path, loaded, llama, tiny_tokenizer, renderer):
    rows = [{"id": f"q{i}", "instruction": text} for i, text in enumerate(INSTRUCTIONS)]
    rows[2] = {"id": 7, "prompt": rows[2]["instruction"]}  # `prompt` and integer ids are accepted
    prompts = _jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out" / "gens.jsonl"
    summary = generate_file("some/model", str(prompts), str(out), GenerationConfig(max_new_tokens=6, batch_size=2))
    got = _read(out)
    assert [r["id"] for r in got] == ["q0", "q1", "7", "q3", "q4"]
    assert [r["instruction"] for r in got] == INSTRUCTIONS
    assert set(got[0]) == {"id", "instruction", "output", "finished", "finish_reason", "num_tokens", "generator"}
    assert all(r["generator"] == "model" and r["num_tokens"] == 6 and r["finished"] is False for r in got)
    assert all(r["finish_reason"] == "length" for r in got)
    expected = generate_ids(llama, tiny_tokenizer, renderer, [renderer.render_prompt(INSTRUCTIONS[1])],
                            GenerationConfig(max_new_tokens=6))  # fmt: skip
    assert got[1]["output"] == expected[0].text
    assert summary["count"] == 5 and summary["finished_share"] == 0.0 and summary["mean_tokens"] == 6.0
    assert summary["finish_reasons"] == {"eos": 0, "stop": 0, "length": 5}
    assert summary["seconds"] >= 0 and "prompts_per_s" in summary
    assert loaded == [("some/model", None)]


def test_cli_generate_stop(tmp_path, capsys, tiny_model_path, llama, tiny_tokenizer, renderer):
    # `rtune generate --stop` (repeatable) on the real tiny model folder: rows cut at the user's stops.
    from rtune.cli import main

    prompts = [renderer.render_prompt(x) for x in INSTRUCTIONS]
    free = generate_ids(llama, tiny_tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=24))
    stops = _stops_from(tiny_tokenizer, free)
    config = GenerationConfig(max_new_tokens=24, stop=list(stops.values()))
    expected = generate_ids(llama, tiny_tokenizer, renderer, prompts, config)
    path = _jsonl(tmp_path / "p.jsonl", [{"id": str(i), "instruction": x} for i, x in enumerate(INSTRUCTIONS)])
    out = tmp_path / "g.jsonl"
    argv = ["generate", str(tiny_model_path), "--prompts", str(path), "--out", str(out), "--max-new-tokens", "24"]
    for stop in stops.values():
        argv += ["--stop", stop]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    got = _read(out)
    assert [(r["output"], r["finish_reason"], r["num_tokens"], r["finished"]) for r in got] == [
        (g.text, g.finish_reason, g.num_tokens, g.finished) for g in expected
    ]
    for row, stop in stops.items():
        text = free[row].text
        assert got[row]["finish_reason"] == "stop" and got[row]["output"] == text[: text.find(stop)].rstrip()
    reasons = [r["finish_reason"] for r in got]
    assert summary["finish_reasons"] == {k: reasons.count(k) for k in ("eos", "stop", "length")}
    assert summary["finished_share"] == (len(got) - reasons.count("length")) / len(got)


def test_generate_file_txt_and_json(tmp_path, loaded):
    txt = tmp_path / "p.txt"
    txt.write_text("Hi\n\nThe quick brown fox\n", encoding="utf-8")
    out = tmp_path / "a.jsonl"
    generate_file("m", str(txt), str(out), GenerationConfig(max_new_tokens=3), method_label="rt")
    got = _read(out)
    assert [(r["id"], r["instruction"], r["generator"]) for r in got] == [("0", "Hi", "rt"), ("1", "The quick brown fox", "rt")]

    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"instruction": "Hi", "id": "a"}, "x"]), encoding="utf-8")
    assert [(r["id"], r["instruction"]) for r in read_prompts(str(js))] == [("a", "Hi"), ("1", "x")]


@pytest.mark.parametrize(
    "content, where",
    [
        ('{"id": "a", "instruction": "Hi"}\n{"id": "b", "instruction": \n', ":2"),
        ('{"id": "a", "instruction": "Hi"}\n\n{"id": "b", "response": "no prompt"}\n', ":3"),
        ('{"id": "a", "instruction": "Hi"}\n{"id": "a", "instruction": "again"}\n', ":2"),
        ('["not an object"]\n', ":1"),
        ("", "no prompts"),
    ],
)
def test_bad_prompt_file_keeps_existing_output(tmp_path, loaded, content, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "gens.jsonl"
    out.write_text("previous results\n", encoding="utf-8")
    with pytest.raises(RtuneError) as e:
        generate_file("m", str(bad), str(out), GenerationConfig(max_new_tokens=2))
    assert str(bad) in str(e.value) and where in str(e.value)
    assert out.read_text(encoding="utf-8") == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "gens.jsonl"]  # no temp file left
    assert loaded == []  # failed before loading a model


def test_missing_prompt_file(tmp_path):
    with pytest.raises(RtuneError, match="not found"):
        read_prompts(str(tmp_path / "nope.jsonl"))


# -- load_for_inference dispatch (rtune.models / rtune.run_folder.load_run stubbed: not under test here) --
@pytest.fixture
def stubs(monkeypatch, tiny_model_path, tiny_tokenizer):
    calls = []
    models = types.ModuleType("rtune.models")
    models.load_tokenizer = lambda spec: calls.append(("tok", spec)) or tiny_tokenizer
    models.load_model = lambda spec, **kw: calls.append(("model", spec, kw)) or AutoModelForCausalLM.from_pretrained(
        tiny_model_path
    )

    def load_run(run_dir, **kw):
        calls.append(("run", str(run_dir), kw))
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        return model, tiny_tokenizer, Renderer(tiny_tokenizer, "tulu"), {}

    monkeypatch.setitem(sys.modules, "rtune.models", models)
    monkeypatch.setattr(run_folder, "load_run", load_run)
    return calls


def test_load_plain_model(stubs):
    model, tok, r = load_for_inference("tiny-spec", dtype=torch.float32, device="cpu")
    assert not model.training and r.template_name == "tulu"
    assert stubs == [("tok", "tiny-spec"), ("model", "tiny-spec", {"dtype": torch.float32, "device": "cpu"})]


@pytest.mark.parametrize("marker", ["rtune_run.json", "rtune_template.json"])
def test_load_run_or_merged_folder(tmp_path, stubs, marker):
    (tmp_path / marker).write_text("{}")
    model, tok, r = load_for_inference(str(tmp_path), dtype=torch.float32)
    assert [c[:2] for c in stubs] == [("run", str(tmp_path))] and not model.training
    assert stubs[0][2]["dtype"] == torch.float32
    with pytest.raises(RtuneError, match="trained with --template tulu"):
        load_for_inference(str(tmp_path), template="model")


def test_merged_folder_uses_saved_template(tmp_path, tiny_tokenizer):
    # The real loader (rtune.run_folder.load_run) on a merged-style folder: the saved format comes back.
    folder = tiny.tiny_model_dir(tmp_path / "merged")
    saved = Renderer(tiny_tokenizer, "tulu").to_dict()
    saved["strings"]["assistant_header"] = "<|bot|>\n"
    (folder / "rtune_template.json").write_text(json.dumps({"format": "rtune-merged", "renderer": saved}))
    model, tok, r = load_for_inference(str(folder), dtype=torch.float32, device="cpu")
    assert tok.decode(r.render_prompt("Hi")).endswith("<|bot|>\n")
    assert not model.training


def test_the_output_layer_gets_a_contiguous_input(tiny_model_path):
    """HF's generate hands the output layer a strided slice of the prompt's hidden states; on CPUs a
    frozen weight then makes torch run one copy of it per row (seconds and GBs for a 262k vocabulary).
    load_for_inference makes that input contiguous: same values, ordinary matmul."""
    from rtune.infer.load import load_for_inference

    model, tokenizer, renderer = load_for_inference(str(tiny_model_path))
    for p in model.parameters():
        p.requires_grad_(False)  # as in a merged or LoRA run
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    prompts = [renderer.render_prompt(text) for text in INSTRUCTIONS[:3]]
    gens = generate_ids(model, tokenizer, renderer, prompts, GenerationConfig(max_new_tokens=3, batch_size=3))
    assert seen and all(seen)
    plain, _, _ = load_for_inference(str(tiny_model_path))
    plain.get_output_embeddings()._forward_pre_hooks.clear()  # without it: the same tokens
    assert [g.token_ids for g in gens] == [g.token_ids for g in
                                           generate_ids(plain, tokenizer, renderer, prompts,
                                                        GenerationConfig(max_new_tokens=3, batch_size=3))]
