"""How often models answer held-out instructions: the demo's table for any models and prompts.

Each model (a run folder, a merged folder or a model spec) answers every prompt greedily; the
table is `rtune.demo.summarise` (ends at EOS or a stop string, repeats the instruction, writes an instruction,
answered), judge-free heuristics, so read the written generations too. Used to choose the demo's
settings on more prompts than the demo itself answers:

    rtune data prepare --source alpaca-demo --out probe/alpaca-demo.jsonl --seed 1
    python scripts/answer_rate.py rtune-demo/runs/rt rtune-demo/runs/it \\
        --prompts probe/alpaca-demo.jsonl --exclude rtune-demo/data/train.jsonl --limit 36 \\
        --out probe/generations --show
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rtune.data import read_prompts
from rtune.data.sources import read_records
from rtune.demo import is_answer, summarise, table
from rtune.infer.answer import answer_prompts
from rtune.infer.generate import GenerationConfig
from rtune.infer.load import load_for_inference
from rtune.io import write_jsonl_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="run folders, merged folders or model specs")
    p.add_argument("--prompts", required=True, help="a prompts file (a prepared .heldout.jsonl works)")
    p.add_argument("--out", default=None, help="folder for one generations file per model")
    p.add_argument("--exclude", action="append", default=[],
                   help="a prepared data file whose record ids are left out (the models' training data)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts (after --exclude) only")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--show", action="store_true", help="print each answer's first line")
    a = p.parse_args()

    excluded = {r["id"] for path in a.exclude for r in read_records(path)}
    prompts = [r for r in read_prompts(a.prompts) if r["id"] not in excluded][: a.limit]
    if not prompts:
        raise SystemExit(f"{a.prompts}: no prompts left after --exclude")
    config = GenerationConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    summary = {}
    for spec in a.models:
        model, tokenizer, renderer = load_for_inference(spec)
        start = time.time()
        name = spec.rstrip("/")
        rows = answer_prompts(model, tokenizer, renderer, prompts, config, generator=name)
        summary[name] = summarise(rows)
        print(f"{spec}: {len(rows)} prompts in {time.time() - start:.0f} s", flush=True)
        if a.show:
            for row in rows:
                mark = "answer " if is_answer(row["instruction"], row) else "-      "
                first = (row["output"].strip().splitlines() or [""])[0][:80]
                print(f"  {mark}{row['instruction'].splitlines()[0][:48]:<48} | {first}")
        if a.out:
            write_jsonl_atomic(Path(a.out) / (name.strip("./").replace("/", "_") + ".jsonl"), rows)
        del model
    print()
    print(table(summary))


if __name__ == "__main__":
    main()
