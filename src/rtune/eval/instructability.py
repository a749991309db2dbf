"""Judge-free instructability: how much a model's likelihoods and outputs follow the instruction.

    response ranking   (Hewitt et al. 2024) over (instruction, reference response) pairs: given
                       instruction i, does the model give i's own response a higher length-normalised
                       log-likelihood (mean log-prob per token) than K responses drawn from other
                       instructions? ranking_top1: own response above all K; ranking_pairwise: the
                       share of the K it is above. Ties count as failures.
    reference NLL      the reference response's mean negative log-likelihood per token given its
                       instruction and given no instruction (`rt`'s training format), and the gain
                       between them: how much the model uses the instruction. A model prompted in
                       context (URIAL...) is scored on the text after its prompt, given the
                       instruction only.
    distribution shift (Lin et al. 2023, URIAL) over a tuned model's greedy answers: the share of
                       answer positions where the untuned base model's top-1 token differs from
                       the tuned model's token, and where that token is outside the base's top 3.
                       For a LoRA run the base is the same model with its adapter switched off.

All scores use rtune.infer.score, so a response is scored on exactly the tokens training trains.
"""

from __future__ import annotations

import contextlib
import random

from rtune.infer.score import score_rows, scored_tokens

SHIFT_TOP_K = 3


def _distractors(pairs: list[tuple[str, str]], k: int, seed: int) -> list[list[str]]:
    """Per pair, up to k responses of other pairs (not equal to its own), drawn with a seeded RNG."""
    rng = random.Random(seed)
    out = []
    for i, (_, own) in enumerate(pairs):
        others = [j for j in range(len(pairs)) if j != i and pairs[j][1] != own]
        out.append([pairs[j][1] for j in rng.sample(others, min(k, len(others)))])
    return out


def reference_values(model, renderer, pairs: list[tuple[str, str]], k: int | None, seed: int = 0,
                     nll: bool = True, only: list[int] | None = None,
                     max_tokens: int | None = None) -> list[dict]:
    """For each pair in `only` (default all, in that order): response ranking against k distractors
    (k None: no ranking) and, with `nll`, the reference NLL given its instruction, given none, and the gain.

    Distractors are drawn for every pair whatever `only` is, so a pair's draw does not depend on it.
    Everything is scored in one call to score_rows: each instruction's prefix once for its own
    response and its distractors (the own response's score is also the NLL given the instruction),
    and the no-instruction prefix, which every reference shares, once for all of them.
    """
    only = list(range(len(pairs))) if only is None else list(only)
    candidates = _distractors(pairs, k, seed) if k is not None else [[] for _ in pairs]
    rows, where = [], {}  # where[(pair, j)]: row of candidate j (0 = own, "alone" = own given no instruction)
    for i in only:
        instruction, own = pairs[i]
        responses = [own, *candidates[i]] if nll or candidates[i] else []
        for j, response in enumerate(responses):
            where[(i, j)] = len(rows)
            rows.append(scored_tokens(renderer, instruction, response))
        if nll and renderer.trainable:  # an in-context format has no "no instruction" rendering
            where[(i, "alone")] = len(rows)
            rows.append(scored_tokens(renderer, None, own))
    scores = score_rows(model, rows, max_tokens=max_tokens)
    mean = {key: sum(scores[r].logprobs) / len(scores[r].logprobs) for key, r in where.items()}
    out = []
    for i in only:
        values = {}
        if k is not None:
            if candidates[i]:
                wins = sum(mean[(i, 0)] > mean[(i, j)] for j in range(1, len(candidates[i]) + 1))
                values.update(ranking_top1=float(wins == len(candidates[i])),
                              ranking_pairwise=wins / len(candidates[i]))
            else:
                values.update(ranking_top1=None, ranking_pairwise=None)
        if nll:
            values["nll_given_instruction"] = -mean[(i, 0)]
            if (i, "alone") in where:
                values.update(nll_no_instruction=-mean[(i, "alone")], nll_gain=mean[(i, 0)] - mean[(i, "alone")])
        out.append(values)
    return out


def ranking_values(model, renderer, pairs: list[tuple[str, str]], k: int, seed: int = 0,
                   max_tokens: int | None = None) -> list[dict]:
    """Per pair: {"ranking_top1": 0/1, "ranking_pairwise": share} against k distractors (seeded draw)."""
    return reference_values(model, renderer, pairs, k, seed, nll=False, max_tokens=max_tokens)


def nll_values(model, renderer, pairs: list[tuple[str, str]], max_tokens: int | None = None) -> list[dict]:
    """Per pair: mean NLL per token of the reference given its instruction, given none, and the gain."""
    return reference_values(model, renderer, pairs, None, max_tokens=max_tokens)


def base_of(model):
    """A context manager under which `model` computes its untuned base: a LoRA adapter switched off."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def shift_values(base_model, prompts: list[list[int]], answers: list[list[int]],
                 max_tokens: int | None = None) -> list[dict]:
    """Per answer: shares of positions where the base's top-1 differs from the answer's token, and
    where that token is outside the base's top 3. `base_model` is called as it is (see base_of).

    "Differs" means some token has a strictly higher logit than the answer's (a tie at the top counts
    as the answer's token being top-1). All answers in as few forward passes as fit in max_tokens.
    """
    todo = [i for i, answer in enumerate(answers) if answer]
    scores = score_rows(base_model, [(prompts[i], answers[i]) for i in todo], rank_cap=SHIFT_TOP_K,
                        max_tokens=max_tokens, logprobs=False)
    out = [{"shift_top1_differs": None, "shift_outside_top3": None} for _ in answers]
    for i, score in zip(todo, scores):
        n = len(score.ranks)
        out[i] = {"shift_top1_differs": sum(r >= 1 for r in score.ranks) / n,
                  "shift_outside_top3": sum(r >= SHIFT_TOP_K for r in score.ranks) / n}
    return out
