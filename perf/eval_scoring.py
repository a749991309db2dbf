"""The demo's evaluation scoring, old code path against the current one, in one run.

    python perf/eval_scoring.py                    # bf16 where the CPU has it, as `rtune demo` scores
    python perf/eval_scoring.py --dtype fp32       # the values must agree within 1e-4 here
    python perf/eval_scoring.py --eval-dir rtune-demo/eval   # real answers for the shift (a demo's eval folder)

What `rtune demo` scores (rtune.eval.instructability), per component:

    tulu      response ranking (K = 3) and reference NLL with and without the instruction on the 24
              held-out instructions of `rtune demo`'s data; the demo scores this for base, RT and IT
    urial-r   the same for base+urial-r (the instruction after a ~550-token in-context prompt; NLL
              given the instruction only); once in the demo
    shift     distribution shift of 56 answers (24 held-out + 16 AdvBench + 16 HarmBench prompts)
              against the base; twice in the demo (RT and IT)

The demo's fine-tuned models are merged LoRA runs with the base's shapes, so each component runs
on the base weights here: the cost is the same, the values are the base's. Shift answers are the
demo's own when --eval-dir points at a demo's eval folder (RT's answers, re-tokenized), else
stand-ins of the same length limit: alpaca-demo responses cut to 192 tokens.

"old" is the code path before batched scoring (rtune at git 3859cec), kept here as it was: per
instruction one forward pass for the prompt and one for its candidates, the NLL given and without the instruction
each scored on its own (one prompt pass and one response pass each), one forward pass per shift
answer, the full vocabulary's logits at every position of a pass. "new" is
rtune.eval.instructability. The two alternate (old, new, old, new, ...) so both see the same
machine load; the table shows each one's fastest of --repeat runs (other jobs only slow a run
down; every run is printed as it ends, with the load average), the load average before and after,
and the largest difference between old and new values.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time

import torch

DEMO_WEIGHTS = {"tulu": 3, "urial-r": 1, "shift": 2}  # how many times `rtune demo` scores each component


# -- the old code path (rtune.infer.score / rtune.eval.instructability before batching) ----------
def _old_row_logprob(logits, row):
    n = len(row) - 1
    row_logits = logits[:n].float()
    targets = torch.tensor(row[1:], device=row_logits.device)
    picked = row_logits.gather(-1, targets[:, None]).squeeze(-1)
    return (picked - torch.logsumexp(row_logits, dim=-1)).sum().item()


def _old_score(model, renderer, instruction, responses, batch_size=8):
    from rtune.infer.score import scored_tokens

    split = [scored_tokens(renderer, instruction, r) for r in responses]
    prefix, targets = split[0][0], [t for _, t in split]
    order = sorted(range(len(targets)), key=lambda i: len(targets[i]), reverse=True)
    means = [0.0] * len(targets)
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([prefix[:-1]]), use_cache=True).past_key_values
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [[prefix[-1]] + targets[i] for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = torch.tensor(row)
                mask[b, : len(row)] = 1
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))
            mask = torch.cat([torch.ones((len(rows), cache.get_seq_length()), dtype=torch.long), mask], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True).logits
            for b, i in enumerate(idx):
                means[i] = _old_row_logprob(logits[b], rows[b]) / len(targets[i])
    return means


def old_reference_values(model, renderer, pairs, k, seed):
    rng = random.Random(seed)
    out = []
    for i, (instruction, own) in enumerate(pairs):
        others = [j for j in range(len(pairs)) if j != i and pairs[j][1] != own]
        distractors = [pairs[j][1] for j in rng.sample(others, min(k, len(others)))]
        scores = _old_score(model, renderer, instruction, [own, *distractors])
        wins = sum(scores[0] > s for s in scores[1:])
        out.append({"ranking_top1": float(wins == len(distractors)), "ranking_pairwise": wins / len(distractors)})
    for values, (instruction, reference) in zip(out, pairs):  # nll_values: its own passes
        given = -_old_score(model, renderer, instruction, [reference])[0]
        values["nll_given_instruction"] = given
        if renderer.trainable:
            alone = -_old_score(model, renderer, None, [reference])[0]
            values.update(nll_no_instruction=alone, nll_gain=alone - given)
    return out


def old_shift_values(model, prompts, answers):
    out = []
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
            target = torch.tensor(answer)
            top = logits.topk(3, dim=-1).indices
            out.append({"shift_top1_differs": float((top[:, 0] != target).float().mean()),
                        "shift_outside_top3": float((~(top == target[:, None]).any(-1)).float().mean())})
    return out


# -- the workload --------------------------------------------------------------------------------
def demo_data(work: str, eval_dir: str | None, tokenizer, renderer):
    """(held-out (instruction, reference) pairs, shift prompts as ids, shift answers as ids)."""
    from rtune.data import prepare, read_records
    from rtune.demo import DemoConfig
    from rtune.eval.benchmarks import load_benchmark

    demo = DemoConfig()
    train = os.path.join(work, "train.jsonl")
    if not os.path.exists(train):
        prepare(demo.source, train, limit=demo.train_size, seed=demo.seed, holdout=demo.eval_size,
                max_response_chars=demo.max_response_chars)
    heldout = read_records(os.path.join(work, "train.heldout.jsonl"))
    pairs = [(r["instruction"], r["response"]) for r in heldout]
    instructions = [x for x, _ in pairs]
    for name in ("advbench", "harmbench"):
        instructions += [item.prompt for item in load_benchmark(name, demo.safety_size, demo.seed).items]
    prompts = [renderer.render_prompt(x) for x in instructions]
    if eval_dir:
        from rtune.eval.results import read_items, result_dir

        answers = []
        for bench in ("train.heldout", "advbench", "harmbench"):
            answers += [tokenizer(row["output"], add_special_tokens=False)["input_ids"]
                        for row in read_items(result_dir(eval_dir, "rt", bench))]
    else:
        texts = [r["response"] for r in read_records(train)]
        answers = [tokenizer(t, add_special_tokens=False)["input_ids"][: demo.max_new_tokens] for t in texts]
        answers = answers[: len(prompts)]
    return pairs, prompts, answers


def max_difference(a: list[dict], b: list[dict]) -> float:
    return max((abs(x[key] - y[key]) for x, y in zip(a, b) for key in x if x[key] is not None), default=0.0)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: as rtune eval picks")
    p.add_argument("--eval-dir", help="a demo's eval folder: RT's answers there are the shift's answers")
    p.add_argument("--components", default="tulu,urial-r,shift")
    p.add_argument("--repeat", type=int, default=1, help="old/new alternations; the fastest of each is shown")
    p.add_argument("--limit", type=int, help="only the first N held-out pairs and shift answers (smoke runs)")
    p.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "rtune", "perf-eval-scoring"))
    a = p.parse_args()

    from rtune.eval import instructability as ins
    from rtune.eval.generation import resolve_dtype
    from rtune.infer.load import load_for_inference
    from rtune.render import Renderer

    os.makedirs(a.work, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_dtype(a.dtype, "cpu")]
    model, tokenizer, tulu = load_for_inference(a.model, dtype=dtype)
    urial = Renderer(tokenizer, "urial-r")
    pairs, prompts, answers = demo_data(a.work, a.eval_dir, tokenizer, tulu)
    if a.limit:
        pairs, prompts, answers = pairs[: a.limit], prompts[: a.limit], answers[: a.limit]
    k = 3  # DemoConfig.ranking_k
    jobs = {
        "tulu": (lambda: old_reference_values(model, tulu, pairs, k, 0),
                 lambda: ins.reference_values(model, tulu, pairs, k, 0)),
        "urial-r": (lambda: old_reference_values(model, urial, pairs, k, 0),
                    lambda: ins.reference_values(model, urial, pairs, k, 0)),
        "shift": (lambda: old_shift_values(model, prompts, answers),
                  lambda: ins.shift_values(model, prompts, answers)),
    }
    names = [c.strip() for c in a.components.split(",") if c.strip()]
    print(f"model {a.model} ({dtype}, {torch.get_num_threads()} threads); {len(pairs)} held-out pairs, K {k}; "
          f"{len(answers)} shift answers, {sum(map(len, answers)) / len(answers):.0f} tokens on average "
          f"({'from ' + a.eval_dir if a.eval_dir else 'stand-ins'})", flush=True)
    ins.reference_values(model, tulu, pairs[:2], 1, 0)  # first-call overheads, untimed
    load_before = load_average()
    times = {name: {"old": [], "new": []} for name in names}
    diffs = {}
    for _ in range(a.repeat):
        for name in names:
            values = {}
            for which, fn in zip(("old", "new"), jobs[name]):
                start = time.perf_counter()
                values[which] = fn()
                times[name][which].append(time.perf_counter() - start)
                print(f"  {name:<8} {which}: {times[name][which][-1]:7.1f} s (load {load_average()})", flush=True)
            diffs[name] = max(diffs.get(name, 0.0), max_difference(values["old"], values["new"]))
    print(f"\nload average (1, 5, 15 min) before: {load_before}; after: {load_average()}")
    print(f"{'component':<10} {'x demo':>6} {'old s':>8} {'new s':>8} {'speed-up':>8} {'max |old - new|':>16}")
    total = {"old": 0.0, "new": 0.0}
    for name in names:
        old, new = (min(times[name][w]) for w in ("old", "new"))
        total["old"] += DEMO_WEIGHTS[name] * old
        total["new"] += DEMO_WEIGHTS[name] * new
        print(f"{name:<10} {DEMO_WEIGHTS[name]:>6} {old:>8.1f} {new:>8.1f} {old / new:>7.2f}x {diffs[name]:>16.2e}")
    print(f"{'demo total':<10} {'':>6} {total['old']:>8.1f} {total['new']:>8.1f} "
          f"{total['old'] / total['new']:>7.2f}x   (each component times its count in the demo)")


if __name__ == "__main__":
    main()
