"""`rtune demo`: the whole path on the offline default, sized for a 2-core laptop CPU.

prepare alpaca-demo -> train RT and IT on the same responses -> answer held-out instructions with
the base, RT and IT models -> a side-by-side file and a short table.

Every step writes its output atomically and is skipped when that output already exists, so an
interrupted demo continues where it stopped when run again (training resumes from its last
checkpoint).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rtune import run_folder
from rtune.io import write_json_atomic, write_jsonl_atomic, write_text_atomic


@dataclass
class DemoConfig:
    out_dir: str = "rtune-demo"
    model: str = "gemma-3-270m"
    source: str = "alpaca-demo"
    seed: int = 0
    train_size: int = 256  # responses shared by RT and IT
    eval_size: int = 24  # held-out instructions answered by every model (a plain random sample)
    # Chosen by measurement on a 2-core CPU (README, "The demo"): many short responses teach the
    # 270M base model to answer and to stop within the time budget; every one keeps its EOS.
    # At lr 5e-4 RT mostly wrote a new instruction instead of an answer; 2e-3 made it answer.
    max_response_chars: int = 800
    epochs: float = 4
    lr: float = 2e-3
    max_length: int = 320
    max_new_tokens: int = 192
    save_steps: int = 16


def repeats_instruction(instruction: str, output: str) -> bool:
    """True when the output merely echoes the instruction instead of answering it.

    Judged on normalised text: the output starts with (most of) the instruction's first line, or
    is mostly made of the instruction's words.
    """
    def norm(s: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()

    inst, out = norm(instruction), norm(output)
    if not out:
        return False
    head = norm(instruction.strip().splitlines()[0])[:60] if instruction.strip() else ""
    if head and out.startswith(head):
        return True
    inst_words, out_words = set(inst.split()), out.split()
    return len(out_words) > 0 and sum(w in inst_words for w in out_words) / len(out_words) > 0.8


# How instructions in Alpaca-style data open; an answer rarely does.
INSTRUCTION_OPENERS = (
    "give", "write", "generate", "create", "describe", "explain", "identify", "name", "list", "suggest",
    "find", "construct", "compose", "change", "classify", "rewrite", "make", "provide", "summarize",
    "summarise", "edit", "convert", "design", "translate", "analyze", "analyse", "compare", "develop",
    "evaluate", "predict", "calculate", "come up with", "tell me", "determine", "outline", "select",
    "choose", "categorize", "brainstorm", "formulate", "paraphrase", "complete", "imagine", "from the given",
)


def writes_instruction(output: str) -> bool:
    """True when the output is itself an instruction or a question, like the prompts, not an answer.

    Small RT models often continue the prompt's genre: "Describe the key responsibilities of a
    software engineer." -> "What are the main duties of a software engineer?". Judged on the
    first non-empty line: it ends with "?", opens with a common instruction verb (Alpaca's, not
    in a list item), or the output opens a new chat turn ("<|user|>"). A heuristic: an answer that happens to start
    with "Write ..." counts as an instruction too.
    """
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return False
    first = lines[0].lower()
    if "<|user|>" in output or first.endswith("?"):
        return True
    if re.match(r"([-*\u2022]|\d+[.)])\s", first):  # a list item: "- Use robots to ..." is an answer
        return False
    words = re.sub(r"[^\w\s]", " ", first).split()
    return any(words[: len(o.split())] == o.split() for o in INSTRUCTION_OPENERS)


def is_answer(instruction: str, row: dict) -> bool:
    """Ends with EOS, is not empty, does not repeat the instruction and is not itself an instruction."""
    output = row["output"]
    return (row["finished"] and bool(output.strip()) and not repeats_instruction(instruction, output)
            and not writes_instruction(output))


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "prompts": n,
        "ends_with_eos": sum(r["finished"] for r in rows) / n,
        "repeats_instruction": sum(repeats_instruction(r["instruction"], r["output"]) for r in rows) / n,
        "writes_instruction": sum(writes_instruction(r["output"]) for r in rows) / n,
        "answered": sum(is_answer(r["instruction"], r) for r in rows) / n,
        "mean_tokens": sum(r["num_tokens"] for r in rows) / n,
    }


def table(summary: dict) -> str:
    lines = [
        "| model | ends with EOS | repeats the instruction | writes an instruction | answered | mean tokens |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['ends_with_eos']:.0%} | {s['repeats_instruction']:.0%} | {s['writes_instruction']:.0%} "
            f"| {s['answered']:.0%} | {s['mean_tokens']:.0f} |"
        )
    lines.append("")
    lines.append("answered: ends with EOS, neither repeats the instruction nor writes one (judge-free heuristics; "
                 "read side_by_side.jsonl)")
    return "\n".join(lines)


def run_demo(config: DemoConfig) -> dict:
    from rtune.data import prepare
    from rtune.infer.generate import GenerationConfig, generate_file
    from rtune.train.config import load_config
    from rtune.train.recipe import train

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.time()

    def step(name: str, done: Path, fn) -> None:
        if done.exists():
            print(f"[demo] {name}: already done ({done})")
            return
        print(f"[demo] {name} ...", flush=True)
        t = time.time()
        fn()
        timings[name] = round(time.time() - t, 1)
        print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)

    train_file, heldout_file = out / "data" / "train.jsonl", out / "data" / "train.heldout.jsonl"
    step(
        "prepare data",
        train_file,
        lambda: prepare(config.source, train_file, limit=config.train_size, seed=config.seed,
                        holdout=config.eval_size, max_response_chars=config.max_response_chars),
    )

    train_config = load_config(
        "cpu",
        {
            "epochs": config.epochs,
            "lr": config.lr,
            "max_length": config.max_length,
            "save_steps": config.save_steps,
            "seed": config.seed,
        },
    )
    for method in ("rt", "it"):
        run_dir = out / "runs" / method
        train_config.method = method
        if run_folder.run_is_complete(run_dir):
            print(f"[demo] train {method.upper()}: already done ({run_dir})")
            continue
        print(f"[demo] train {method.upper()} on {config.train_size} responses ...", flush=True)
        t = time.time()
        # An interrupted run continues from its last checkpoint (a finished one is skipped above).
        train(config.model, str(train_file), str(run_dir), train_config, resume=run_folder.is_run_dir(run_dir))
        timings[f"train {method}"] = round(time.time() - t, 1)

    gen_config = GenerationConfig(max_new_tokens=config.max_new_tokens, batch_size=config.eval_size)
    generators = {"base": config.model, "rt": str(out / "runs" / "rt"), "it": str(out / "runs" / "it")}
    for name, model in generators.items():
        path = out / "generations" / f"{name}.jsonl"
        step(f"generate {name}", path, lambda m=model, p=path: generate_file(m, str(heldout_file), str(p), gen_config))

    generations = {name: _read_jsonl(out / "generations" / f"{name}.jsonl") for name in generators}
    summary = {name: summarise(rows) for name, rows in generations.items()}
    side_by_side = [
        {
            "id": rows[0]["id"],
            "instruction": rows[0]["instruction"],
            **{f"{name}_output": generations[name][i]["output"] for name in generators},
            **{f"{name}_finished": generations[name][i]["finished"] for name in generators},
        }
        for i, rows in enumerate(zip(*generations.values()))
    ]
    write_jsonl_atomic(out / "side_by_side.jsonl", side_by_side)
    report = {
        "config": asdict(config),
        "summary": summary,
        "timings_s": timings,
        "total_s": round(time.time() - start, 1),
    }
    write_json_atomic(out / "summary.json", report)
    text = table(summary)
    write_text_atomic(out / "summary.md", text + "\n")
    print("\n" + text)
    print(f"\nside-by-side answers: {out / 'side_by_side.jsonl'}; total {report['total_s']:.0f} s")
    return report


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
