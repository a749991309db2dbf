"""Log-likelihood of responses under a model, reusing the instruction's KV cache across candidates.

A response is scored on exactly the tokens training puts its loss on: the response and its end
token, as `Renderer.render_training` labels them, with method "it" when an instruction is given
and "rt" (no user turn at all) when it is None. So a score is the negative summed training loss of
that (instruction, response) example, and "given no instruction" is the distribution RT learns.

Every candidate response of one instruction shares the rendered prompt prefix. The prefix runs
through the model once; its KV cache is copied along the batch dimension and the candidates
continue from it in right-padded batches. With right padding every real token keeps the position
it has in the full sequence (positions count on from the cache length), and pads come after the
real tokens, so causal attention never lets a real token see one; the attention mask marks them
anyway, and pad positions are never scored.

Response ranking (`response_ranking`) is a judge-free check in the spirit of Hewitt et al. 2024
("Instruction Following without Instruction Tuning", arXiv 2409.14254): does the model, given an
instruction, prefer that instruction's own response over the responses written for other
instructions? See `ranking_from_scores` for the exact definition used here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from rtune.errors import RtuneError
from rtune.render import IGNORE


@dataclass(frozen=True)
class ResponseScore:
    logprob: float  # sum of log p(token | everything before it) over the scored tokens
    num_tokens: int  # how many tokens were scored (response tokens, plus the end token when included)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.num_tokens


@dataclass(frozen=True)
class RankingResult:
    top1: float  # share of instructions whose own response scores highest (strictly) among all responses
    pairwise: float  # share of (instruction, other response) pairs where the own response scores higher
    num_instructions: int


# -- rendering ------------------------------------------------------------------------------------
def scored_tokens(
    renderer, instruction: str | None, response: str, include_eos: bool = True
) -> tuple[list[int], list[int]]:
    """(prefix ids, scored ids) of one example: the scored ids are its trained tokens.

    The prefix is everything before the first trained token; untrained tokens after the last
    trained one (e.g. a newline a chat template puts after its turn-end token) are dropped.
    """
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise RtuneError("instruction must be a non-empty string, or None to score without an instruction")
    if not renderer.trainable:
        # An in-context format (URIAL...) renders prompts only: the response is scored as the text that
        # follows its prompt, stripped as the format strips content; no end token (a stop string ends it).
        if instruction is None:
            raise RtuneError("an in-context format scores a response given an instruction only")
        return renderer.render_prompt(instruction), renderer.encode_text(response.strip())
    method = "rt" if instruction is None else "it"
    seq = renderer.render_training({"instruction": instruction or "", "response": response}, method)
    if seq is None:  # only possible with truncation, which is not used here; kept as a guard
        raise RtuneError(f"nothing to score in response {response[:40]!r}")
    trained = [i for i, label in enumerate(seq.labels) if label != IGNORE]
    first, last = trained[0], trained[-1]
    if trained != list(range(first, last + 1)):
        raise RtuneError("the trained tokens of a single-turn example are not contiguous; cannot score it")
    prefix, targets = seq.input_ids[:first], seq.input_ids[first : last + 1]
    if not include_eos:
        end = list(renderer.template.end_ids)
        if targets[-len(end) :] != end:
            raise RtuneError(f"the rendered response does not end with the end token(s) {end}")
        targets = targets[: -len(end)]
    if not prefix:
        raise RtuneError("the rendered prompt prefix is empty; there is nothing to condition the response on")
    return prefix, targets


# -- the model --------------------------------------------------------------------------------------
def _device(model):
    return next(model.parameters()).device


def _row_logprob(logits: torch.Tensor, row: list[int]) -> float:
    """Sum of log p(row[t+1] | row[:t+1]) from one row's logits (position t predicts token t+1)."""
    n = len(row) - 1
    row_logits = logits[:n].float()  # fp32 for the normalisation, whatever the model's dtype
    targets = torch.tensor(row[1:], device=row_logits.device)
    picked = row_logits.gather(-1, targets[:, None]).squeeze(-1)
    # logit - logsumexp, not log_softmax: over Gemma's 262k vocabulary an fp32 log_softmax is off by
    # about 1e-5 per token (against float64), logsumexp by about 1e-7.
    return (picked - torch.logsumexp(row_logits, dim=-1)).sum().item()


def _prefix_cache(model, ids: list[int]):
    """The KV cache of `ids` (batch of one), or None when there is nothing to cache."""
    if not ids:
        return None
    out = model(input_ids=torch.tensor([ids], device=_device(model)), use_cache=True)
    return out.past_key_values


def _batch_logprobs(model, cache, rows: list[list[int]]) -> list[float]:
    """Summed log-probs of rows[b][1:] for each row, continuing from `cache` (right-padded batch)."""
    device = _device(model)
    width = max(len(r) for r in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # pad id 0: masked and never scored
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, : len(row)] = 1
    past = None
    if cache is not None:
        # The forward pass appends to the cache it is given: work on a copy so the prefix cache
        # stays as it is for the next batch, then repeat it for every row of this batch.
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(len(rows))
        prefix_mask = torch.ones((len(rows), cache.get_seq_length()), dtype=torch.long)
        attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        past_key_values=past,
        use_cache=past is not None,
    )
    return [_row_logprob(out.logits[b], row) for b, row in enumerate(rows)]


# -- public API -------------------------------------------------------------------------------------
def score_responses(
    model,
    renderer,
    instruction: str | None,
    responses: list[str],
    batch_size: int = 8,
    include_eos: bool = True,
) -> list[ResponseScore]:
    """Log-likelihood of each response given `instruction` (None: given no instruction), in input order.

    The model should be in eval mode (rtune's loaders return it so). The prompt prefix runs once;
    candidates are scored in batches of `batch_size` continuing from its KV cache.
    """
    if batch_size < 1:
        raise RtuneError(f"batch_size must be >= 1, got {batch_size}")
    if not responses:
        return []
    split = [scored_tokens(renderer, instruction, r, include_eos) for r in responses]
    prefix = split[0][0]
    if any(p != prefix for p, _ in split):
        raise RtuneError("the candidates rendered with different prompt prefixes; they cannot share a cache")
    targets = [t for _, t in split]

    # Longest first: similar lengths share a batch (less padding), and running out of memory shows at once.
    order = sorted(range(len(targets)), key=lambda i: len(targets[i]), reverse=True)
    scores: list[ResponseScore | None] = [None] * len(targets)
    with torch.inference_mode():
        # The cache holds the prefix but its last token. That token is fed again at the start of
        # every row, so its logits (which predict the first response token) come out of the batch
        # like all the others.
        cache = _prefix_cache(model, prefix[:-1])
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [[prefix[-1]] + targets[i] for i in idx]
            for i, logprob in zip(idx, _batch_logprobs(model, cache, rows)):
                scores[i] = ResponseScore(logprob=logprob, num_tokens=len(targets[i]))
    return scores  # type: ignore[return-value]


def score_pairs(
    model,
    renderer,
    instructions: list[str | None],
    responses: list[str],
    batch_size: int = 8,
    include_eos: bool = True,
) -> list[list[ResponseScore]]:
    """The matrix of scores: result[i][j] is response j given instruction i (None: no instruction)."""
    return [score_responses(model, renderer, x, responses, batch_size, include_eos) for x in instructions]


def ranking_from_scores(conditional: list[list[float]], unconditional: list[float] | None = None) -> RankingResult:
    """Response ranking from a square matrix: conditional[i][j] = log p(response j | instruction i).

    Response j's score for instruction i is s(i, j) = conditional[i][j], minus unconditional[j]
    (log p(response j) with no instruction) when that is given. The subtraction makes responses
    of different lengths comparable: it is how much instruction i raises response j's likelihood
    (pointwise mutual information), so a short or generic response does not win every row.

    top1: the share of instructions i with s(i, i) > s(i, j) for every j != i.
    pairwise: the share of ordered pairs (i, j), j != i, with s(i, i) > s(i, j).
    Ties count as failures, so a model that cannot tell responses apart scores 0, not 1.
    """
    n = len(conditional)
    if n < 2:
        raise RtuneError(f"response ranking needs at least 2 instructions, got {n}")
    if any(len(row) != n for row in conditional):
        raise RtuneError("response ranking needs a square matrix: one response per instruction")
    if unconditional is not None and len(unconditional) != n:
        raise RtuneError(f"expected {n} unconditional scores, got {len(unconditional)}")
    base = unconditional if unconditional is not None else [0.0] * n
    top1 = pairs = 0
    for i, row in enumerate(conditional):
        s = [row[j] - base[j] for j in range(n)]
        wins = sum(1 for j in range(n) if j != i and s[i] > s[j])
        pairs += wins
        top1 += wins == n - 1
    return RankingResult(top1=top1 / n, pairwise=pairs / (n * (n - 1)), num_instructions=n)


def response_ranking(
    model,
    renderer,
    instructions: list[str],
    responses: list[str],
    normalize: bool = True,
    batch_size: int = 8,
    include_eos: bool = True,
) -> RankingResult:
    """How often the model prefers each instruction's own response (responses[i] for instructions[i]).

    Scores every response under every instruction and, when `normalize`, under no instruction
    too; see `ranking_from_scores` for the definition. normalize=False ranks by the raw
    likelihood given the instruction, which favours short responses.
    """
    if len(instructions) != len(responses):
        raise RtuneError(f"{len(instructions)} instructions but {len(responses)} responses: pair them one to one")
    matrix = score_pairs(model, renderer, instructions, responses, batch_size, include_eos)
    conditional = [[s.logprob for s in row] for row in matrix]
    unconditional = None
    if normalize:
        unconditional = [s.logprob for s in score_responses(model, renderer, None, responses, batch_size, include_eos)]
    return ranking_from_scores(conditional, unconditional)
