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

import torch

from rtune.infer.score import score_responses

SHIFT_TOP_K = 3


def ranking_values(model, renderer, pairs: list[tuple[str, str]], k: int, seed: int = 0,
                   batch_size: int = 8) -> list[dict]:
    """Per pair: {"ranking_top1": 0/1, "ranking_pairwise": share} against k distractors (seeded draw)."""
    rng = random.Random(seed)
    out = []
    for i, (instruction, own) in enumerate(pairs):
        others = [j for j in range(len(pairs)) if j != i and pairs[j][1] != own]
        distractors = [pairs[j][1] for j in rng.sample(others, min(k, len(others)))]
        if not distractors:
            out.append({"ranking_top1": None, "ranking_pairwise": None})
            continue
        scores = [s.mean_logprob for s in score_responses(model, renderer, instruction, [own, *distractors],
                                                          batch_size=batch_size)]
        wins = sum(scores[0] > s for s in scores[1:])
        out.append({"ranking_top1": float(wins == len(distractors)), "ranking_pairwise": wins / len(distractors)})
    return out


def nll_values(model, renderer, pairs: list[tuple[str, str]], batch_size: int = 8) -> list[dict]:
    """Per pair: mean NLL per token of the reference given its instruction, given none, and the gain."""
    out = []
    for instruction, reference in pairs:
        given = -score_responses(model, renderer, instruction, [reference], batch_size=batch_size)[0].mean_logprob
        if not renderer.trainable:  # an in-context format has no "no instruction" rendering
            out.append({"nll_given_instruction": given})
            continue
        alone = -score_responses(model, renderer, None, [reference], batch_size=batch_size)[0].mean_logprob
        out.append({"nll_given_instruction": given, "nll_no_instruction": alone, "nll_gain": alone - given})
    return out


def base_of(model):
    """A context manager under which `model` computes its untuned base: a LoRA adapter switched off."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def shift_values(base_model, prompts: list[list[int]], answers: list[list[int]]) -> list[dict]:
    """Per answer: shares of positions where the base's top-1 differs from the answer's token, and
    where that token is outside the base's top 3. `base_model` is called as it is (see base_of)."""
    device = next(base_model.parameters()).device
    out = []
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            if not answer:
                out.append({"shift_top1_differs": None, "shift_outside_top3": None})
                continue
            ids = torch.tensor([prompt + answer], device=device)
            # Only the positions that predict the answer's tokens: the last len(answer) + 1 logits, minus one.
            logits = base_model(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
            target = torch.tensor(answer, device=device)
            top = logits.topk(SHIFT_TOP_K, dim=-1).indices
            out.append({
                "shift_top1_differs": float((top[:, 0] != target).float().mean()),
                "shift_outside_top3": float((~(top == target[:, None]).any(-1)).float().mean()),
            })
    return out
