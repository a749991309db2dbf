"""Likelihood scoring: the cached-prefix batches against a plain full-sequence computation."""

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from rtune.errors import RtuneError
from rtune.infer.score import (
    RankingResult,
    ResponseScore,
    ranking_from_scores,
    response_ranking,
    score_pairs,
    score_responses,
    scored_tokens,
)
from rtune.render import IGNORE, Renderer

INSTRUCTION = "Give three tips for staying healthy. " * 3  # longer than the tiny Gemma's sliding window
RESPONSES = [
    "Eat well and sleep.",
    "x",
    "1. First\n2. Second\n3. Third\n" * 4,
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld — naïve café, 東京 🙂",
]


@pytest.fixture(scope="module")
def renderer(tiny_tokenizer):
    return Renderer(tiny_tokenizer, "tulu")


def _gemma3(tokenizer):
    # A sliding-window layer with a window shorter than the prompt: the cache keeps only its tail.
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
    return tiny.tiny_gpt2(tiny_tokenizer) if request.param == "gpt2" else _gemma3(tiny_tokenizer)


def plain_score(model, renderer, instruction, response, include_eos=True) -> tuple[float, int]:
    """The reference: one full sequence, one forward pass, log_softmax, gather the trained tokens."""
    method = "it" if instruction is not None else "rt"
    seq = renderer.render_training({"instruction": instruction or "", "response": response}, method)
    positions = [t for t, label in enumerate(seq.labels) if label != IGNORE]
    if not include_eos:
        positions = positions[:-1]  # tulu trains one end token, the last trained one
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return sum(logp[t - 1, seq.input_ids[t]].item() for t in positions), len(positions)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
@pytest.mark.parametrize("instruction", [INSTRUCTION, None], ids=["instruction", "none"])
def test_cached_batches_equal_plain(model, renderer, instruction, batch_size):
    scores = score_responses(model, renderer, instruction, RESPONSES, batch_size=batch_size)
    assert len({s.num_tokens for s in scores}) == len(RESPONSES)  # really of different lengths
    for response, score in zip(RESPONSES, scores):
        logprob, n = plain_score(model, renderer, instruction, response)
        assert isinstance(score, ResponseScore)
        assert score.num_tokens == n
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.mean_logprob == pytest.approx(logprob / n, abs=1e-4)


def test_without_eos(model, renderer):
    with_eos = score_responses(model, renderer, INSTRUCTION, RESPONSES[:3])
    without = score_responses(model, renderer, INSTRUCTION, RESPONSES[:3], batch_size=2, include_eos=False)
    for response, a, b in zip(RESPONSES, with_eos, without):
        logprob, n = plain_score(model, renderer, INSTRUCTION, response, include_eos=False)
        assert b.num_tokens == n == a.num_tokens - 1
        assert b.logprob == pytest.approx(logprob, abs=1e-4)
        assert b.logprob > a.logprob  # the end token's log-prob is negative


def test_scored_tokens_are_the_trained_tokens(renderer):
    for instruction, method in [(INSTRUCTION, "it"), (None, "rt")]:
        seq = renderer.render_training({"instruction": instruction or "", "response": RESPONSES[0]}, method)
        prefix, targets = scored_tokens(renderer, instruction, RESPONSES[0])
        assert prefix + targets == seq.input_ids
        assert targets == [t for t in seq.labels if t != IGNORE]
    prefix, _ = scored_tokens(renderer, None, RESPONSES[0])
    assert "<|user|>" not in renderer.tokenizer.decode(prefix)  # rt: no user turn at all


def test_pairs_matrix_and_input_checks(model, renderer):
    instructions = [INSTRUCTION, "Hi", None]
    matrix = score_pairs(model, renderer, instructions, RESPONSES[:2], batch_size=4)
    assert [len(row) for row in matrix] == [2, 2, 2]
    for x, row in zip(instructions, matrix):
        for response, score in zip(RESPONSES, row):
            assert score.logprob == pytest.approx(plain_score(model, renderer, x, response)[0], abs=1e-4)
    assert score_responses(model, renderer, "Hi", []) == []
    with pytest.raises(RtuneError, match="non-empty string"):
        score_responses(model, renderer, "  ", RESPONSES)
    with pytest.raises(RtuneError, match="batch_size"):
        score_responses(model, renderer, "Hi", RESPONSES, batch_size=0)
    with pytest.raises(RtuneError, match="response"):
        score_responses(model, renderer, "Hi", ["ok", " "])


def test_ranking_hand_made():
    # conditional[i][j] = log p(response j | instruction i).
    conditional = [
        [-10.0, -12.0, -3.0],  # response 2 is short: raw likelihood prefers it everywhere
        [-14.0, -11.0, -4.0],
        [-15.0, -13.0, -2.0],
    ]
    unconditional = [-16.0, -15.0, -5.0]  # log p(response j) with no instruction
    raw = ranking_from_scores(conditional)
    assert raw == RankingResult(top1=1 / 3, pairwise=4 / 6, num_instructions=3)
    # Gains s(i, j) = conditional - unconditional: [[6, 3, 2], [2, 4, 1], [1, 2, 3]].
    pmi = ranking_from_scores(conditional, unconditional)
    assert pmi == RankingResult(top1=1.0, pairwise=1.0, num_instructions=3)
    # A tie is a failure: a model that cannot tell responses apart ranks nothing.
    assert ranking_from_scores([[0.0, 0.0], [0.0, 0.0]]).top1 == 0.0
    with pytest.raises(RtuneError, match="square"):
        ranking_from_scores([[0.0, 1.0], [0.0]])
    with pytest.raises(RtuneError, match="at least 2"):
        ranking_from_scores([[0.0]])


def test_response_ranking_uses_the_scores(renderer, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    instructions = ["Hi", "The quick brown fox", INSTRUCTION]
    responses = RESPONSES[:3]
    conditional = [[plain_score(model, renderer, x, y)[0] for y in responses] for x in instructions]
    unconditional = [plain_score(model, renderer, None, y)[0] for y in responses]
    for normalize in (True, False):
        got = response_ranking(model, renderer, instructions, responses, normalize=normalize, batch_size=2)
        assert got == ranking_from_scores(conditional, unconditional if normalize else None)
    with pytest.raises(RtuneError, match="one to one"):
        response_ranking(model, renderer, instructions, responses[:2])


def test_in_context_format_scores_the_text_after_its_prompt(tiny_tokenizer):
    from rtune.infer.score import scored_tokens

    r = Renderer(tiny_tokenizer, "urial-r")
    prefix, targets = scored_tokens(r, "Name a colour.", "  Blue. <eos>  ")
    assert prefix == r.render_prompt("Name a colour.")
    assert targets == r.encode_text("Blue. <eos>") and tiny_tokenizer.eos_token_id not in targets
    with pytest.raises(RtuneError, match="given an instruction only"):
        scored_tokens(r, None, "Blue.")
