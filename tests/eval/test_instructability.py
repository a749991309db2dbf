"""Ranking, reference NLL and distribution shift, batched, against a straightforward computation.

The reference is what rtune computed before batching: one forward pass per (prompt, response)
sequence, log_softmax over the full logits, torch.topk for the shift. Models: a tiny Llama, a
GPT-2 (absolute positions: a wrong position id under left padding changes its outputs) and a
Gemma 3 whose sliding window is shorter than the prompts; fp32, values within 1e-4.
"""

import random

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from rtune.eval import instructability as ins
from rtune.infer.score import score_rows, scored_tokens
from rtune.render import Renderer

PAIRS = [
    ("Give three tips for staying healthy. " * 3, "Eat well and sleep."),
    ("Hi", "1. First\n2. Second\n3. Third\n" * 3),
    ("The quick brown fox", "x"),
    ("Name a colour.", "The quick brown fox jumps over the lazy dog."),
    ("Héllo wörld", "Héllo wörld — naïve café, 東京 🙂"),
    ("1. First", "Eat well, sleep, and exercise."),
]


def _gemma3(tokenizer):
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"], initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3"])
def model(request, tiny_model_path, tiny_tokenizer):
    if request.param == "llama":
        return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    if request.param == "gpt2":  # room for the in-context prompt (~1,900 tiny-tokenizer tokens)
        return tiny.tiny_gpt2(tiny_tokenizer, positions=4096)
    return _gemma3(tiny_tokenizer)


@pytest.fixture(params=["one-tile", "many-tiles"])
def tiles(request, monkeypatch):
    """The output layer in one tile, or in chunks of 7 positions x 64 vocabulary entries (online log-sum-exp)."""
    import rtune.infer.score as score

    if request.param == "many-tiles":
        monkeypatch.setattr(score, "CPU_SCORE_ROWS", 7)
        monkeypatch.setattr(score, "CPU_SCORE_TILE_BYTES", 4 * 7 * 64)
    return request.param


@pytest.fixture(scope="module", params=["tulu", "urial-r"])
def renderer(request, tiny_tokenizer):
    return Renderer(tiny_tokenizer, request.param)


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def mean_logprob(model, renderer, instruction, response):
    prefix, targets = scored_tokens(renderer, instruction, response)
    logp = torch.log_softmax(full_logits(model, prefix + targets), dim=-1)
    n = len(prefix)
    return sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(targets)) / len(targets)


def reference_ranking_and_nll(model, renderer, pairs, k, seed):
    rng = random.Random(seed)
    out = []
    for i, (instruction, own) in enumerate(pairs):
        others = [j for j in range(len(pairs)) if j != i and pairs[j][1] != own]
        distractors = [pairs[j][1] for j in rng.sample(others, min(k, len(others)))]
        scores = [mean_logprob(model, renderer, instruction, y) for y in [own, *distractors]]
        wins = sum(scores[0] > s for s in scores[1:])
        values = {"ranking_top1": float(wins == len(distractors)), "ranking_pairwise": wins / len(distractors),
                  "nll_given_instruction": -scores[0]}
        if renderer.trainable:
            alone = -mean_logprob(model, renderer, None, own)
            values.update(nll_no_instruction=alone, nll_gain=alone + scores[0])
        out.append(values)
    return out


def assert_close(got: list[dict], want: list[dict]):
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    for g, w in zip(got, want):
        for key in w:
            assert g[key] == pytest.approx(w[key], abs=1e-4), key


@pytest.mark.parametrize("max_tokens", [8192, 64], ids=["one-pass", "many-passes"])
def test_ranking_and_nll_equal_the_plain_computation(model, renderer, max_tokens, tiles):
    want = reference_ranking_and_nll(model, renderer, PAIRS, k=3, seed=1)
    assert_close(ins.reference_values(model, renderer, PAIRS, 3, seed=1, max_tokens=max_tokens), want)
    ranking = ins.ranking_values(model, renderer, PAIRS, 3, seed=1, max_tokens=max_tokens)
    assert_close(ranking, [{k: w[k] for k in ("ranking_top1", "ranking_pairwise")} for w in want])
    nll = ins.nll_values(model, renderer, PAIRS[:4], max_tokens=max_tokens)
    assert_close(nll, [{k: v for k, v in w.items() if k.startswith("nll")} for w in want[:4]])


def test_a_subset_of_pairs_and_no_distractors(model, tiny_tokenizer):
    r = Renderer(tiny_tokenizer, "tulu")
    want = reference_ranking_and_nll(model, r, PAIRS, k=2, seed=0)
    # The distractors of pairs 1 and 4 are those drawn when every pair is scored.
    assert_close(ins.reference_values(model, r, PAIRS, 2, seed=0, only=[4, 1]), [want[4], want[1]])
    # Every response the same: nothing to rank against.
    same = [("Hi", "x"), ("Name a colour.", "x")]
    assert ins.ranking_values(model, r, same, 3) == [{"ranking_top1": None, "ranking_pairwise": None}] * 2


def reference_shift(model, prompts, answers):
    out = []
    for prompt, answer in zip(prompts, answers):
        if not answer:
            out.append({"shift_top1_differs": None, "shift_outside_top3": None})
            continue
        logits = full_logits(model, prompt + answer)[len(prompt) - 1 : -1]
        top = logits.topk(3, dim=-1).indices
        target = torch.tensor(answer)
        out.append({"shift_top1_differs": float((top[:, 0] != target).float().mean()),
                    "shift_outside_top3": float((~(top == target[:, None]).any(-1)).float().mean())})
    return out


@pytest.mark.parametrize("max_tokens", [8192, 40], ids=["one-pass", "many-passes"])
def test_shift_equals_the_plain_computation(model, tiny_tokenizer, max_tokens, tiles):
    r = Renderer(tiny_tokenizer, "tulu")
    prompts = [r.render_prompt(x) for x, _ in PAIRS] + [r.render_prompt("Hi")]
    answers = []
    for prompt, (_, text) in zip(prompts, PAIRS):
        greedy = []  # the model's own top-1 for a few tokens (shift 0 there), then text it would not write
        for _ in range(4):
            greedy.append(int(full_logits(model, prompt + greedy)[-1].argmax()))
        answers.append(greedy + tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    answers.append([])
    want = reference_shift(model, prompts, answers)
    assert all(0 < w["shift_top1_differs"] < 1 for w in want[:-1])
    got = ins.shift_values(model, prompts, answers, max_tokens=max_tokens)
    assert got[-1] == {"shift_top1_differs": None, "shift_outside_top3": None}
    assert_close(got[:-1], want[:-1])


def test_rank_counts_only_strictly_higher_logits(tiny_tokenizer, tiles):
    # A model whose every logit is equal: each token ties with all others, so it is its own top-1.
    model = tiny.tiny_gpt2(tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    rows = [([1, 5, 6], [7, 8]), ([1, 5, 6], [9]), ([4], [3, 3, 3])]
    scores = score_rows(model, rows, rank_cap=3)
    vocab = model.config.vocab_size
    for (_, targets), s in zip(rows, scores):
        assert s.ranks == [0] * len(targets)
        assert s.logprobs == pytest.approx([-torch.log(torch.tensor(float(vocab))).item()] * len(targets), abs=1e-5)
