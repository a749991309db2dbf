"""Likelihood scoring throughput: rtune.score.score_responses against a plain loop.

Scores N instructions x K candidate responses (the Hewitt et al. response-ranking setup: every
instruction against the same pool of responses, its own among them) in two ways:

    cached   score_responses: the prompt prefix runs once per instruction, candidates continue
             from its KV cache in right-padded batches
    plain    one full sequence (prompt + response) per forward pass, gather the response tokens

and prints candidates/s for both, the speed-up, and the largest absolute difference between the
two methods' scores. Model: the built-in base Gemma 3 270M (tulu template); data: alpaca-demo
records, shuffled with seed 0 as `rtune data prepare` does.

    python perf/score_throughput.py --instructions 8 --candidates 16 --batch-size 8
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from rtune.data.sources import load_source
from rtune.infer.load import load_for_inference
from rtune.infer.score import score_responses
from rtune.render import IGNORE


def plain_scores(model, renderer, instruction: str, responses: list[str]) -> list[float]:
    """The obvious way: each (instruction, response) on its own, the whole sequence every time."""
    out = []
    for response in responses:
        seq = renderer.render_training({"instruction": instruction, "response": response}, "it")
        logits = model(input_ids=torch.tensor([seq.input_ids], device=model.device)).logits[0].float()
        # log p = logit - logsumexp (as rtune.score does): an fp32 log_softmax over Gemma's 262k
        # vocabulary drifts by about 1e-5 per token, which would swamp the difference measured here.
        log_z = torch.logsumexp(logits, dim=-1)
        positions = [t for t, label in enumerate(seq.labels) if label != IGNORE]
        out.append(sum((logits[t - 1, seq.input_ids[t]] - log_z[t - 1]).item() for t in positions))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--instructions", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-response-chars", type=int, default=600,
        help="only use responses up to this length, so a CPU run stays short (default 600)",
    )  # fmt: skip
    args = parser.parse_args()

    records, _ = load_source("alpaca-demo")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    pool = [records[i] for i in order if len(records[i]["response"]) <= args.max_response_chars]
    pool = pool[: max(args.instructions, args.candidates)]
    instructions = [r["instruction"] for r in pool[: args.instructions]]
    responses = [r["response"] for r in pool[: args.candidates]]  # instruction i's own response is responses[i]

    model, tokenizer, renderer = load_for_inference(args.model)
    n = len(instructions) * len(responses)
    response_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    print(
        f"model {args.model} ({next(model.parameters()).dtype}, {model.device}, {torch.get_num_threads()} threads); "
        f"{len(instructions)} instructions x {len(responses)} candidates = {n} scores; "
        f"response tokens: mean {sum(response_tokens) / len(response_tokens):.0f}, max {max(response_tokens)}"
    )

    with torch.inference_mode():
        score_responses(model, renderer, "Warm up.", ["Warm up."])  # first-call overheads, untimed

        start = time.perf_counter()
        cached = [score_responses(model, renderer, x, responses, batch_size=args.batch_size) for x in instructions]
        cached_s = time.perf_counter() - start

        start = time.perf_counter()
        plain = [plain_scores(model, renderer, x, responses) for x in instructions]
        plain_s = time.perf_counter() - start

    diff = max(abs(c.logprob - p) for row_c, row_p in zip(cached, plain) for c, p in zip(row_c, row_p))
    print(f"cached (batch {args.batch_size}): {n / cached_s:7.2f} candidates/s  ({cached_s:.1f} s)")
    print(f"plain (one at a time):  {n / plain_s:7.2f} candidates/s  ({plain_s:.1f} s)")
    print(f"speed-up: {plain_s / cached_s:.2f}x")
    print(f"max |cached - plain| log-prob: {diff:.2e}")


if __name__ == "__main__":
    main()
