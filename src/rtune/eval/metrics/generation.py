"""Judge-free statistics of generations: how a reply ended, whether it answers, how repetitive it is.

Per item, `generation_values(prompt, row)` reads a generation row ({"output", "finish_reason",
"num_tokens", ...} as rtune.infer.generate writes it); `summarise_generation` turns the per-item
values into metrics with bootstrap 95% intervals. The answer heuristics (`repeats_instruction`,
`writes_instruction`, `is_answer`) are the ones `rtune demo` reports.
"""

from __future__ import annotations

import re

from rtune.eval.metrics.intervals import estimate
from rtune.eval.results import metric

# How a reply ended, as rtune.infer.generate writes it (not imported from there: that pulls in torch).
# "ended": a server said the reply stopped but not whether at EOS or a stop string (rtune eval --gen-url
# against a server that returns neither token ids nor a stop reason); both rates leave such items out.
FINISH_REASONS = ("eos", "stop", "length", "ended")


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


def distinct_n(text: str, n: int) -> float | None:
    """Distinct n-grams / all n-grams of the whitespace-split words of one output.

    1.0 when no n-gram repeats; low when the output loops ("a b a b a b" has distinct-2 0.4).
    Words are compared exactly (case and punctuation kept). None when the output has fewer than n
    words: it has no n-gram, so there is nothing to measure (not 0, not 1).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = text.split()
    if len(words) < n:
        return None
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def generation_values(prompt: str, row: dict) -> dict:
    """The per-item values of one generation row, answering `prompt` (the instruction).

    answered is the demo's `is_answer`, which counts a reply as finished when it ended at EOS or at
    a stop string (finish_reason other than "length").
    """
    reason = row["finish_reason"]
    if reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {reason!r}")
    output = row["output"]
    return {
        "ends_with_eos": None if reason == "ended" else reason == "eos",
        "stopped_at_stop_string": None if reason == "ended" else reason == "stop",
        "cut_at_length": reason == "length",
        "echoes_instruction": repeats_instruction(prompt, output),
        "writes_instruction": writes_instruction(output),
        "answered": is_answer(prompt, {"output": output, "finished": reason != "length"}),
        "distinct_2": distinct_n(output, 2),
        "distinct_3": distinct_n(output, 3),
        "length_tokens": row["num_tokens"],
    }


# key -> (kind, label, higher_is_better); None where neither direction is clearly better.
GENERATION_METRICS = {
    "ends_with_eos": ("rate", "ends with EOS", True),
    # A stop string is the next turn's header: the model stopped, but by starting a new turn.
    "stopped_at_stop_string": ("rate", "stopped at a stop string", None),
    "cut_at_length": ("rate", "cut at max_new_tokens", False),
    "echoes_instruction": ("rate", "echoes the instruction", False),
    "writes_instruction": ("rate", "writes an instruction", False),
    "answered": ("rate", "answered (heuristic: ends, neither echoes nor writes an instruction)", True),
    # Within one output repeated n-grams mean looping, so more distinct is better.
    "distinct_2": ("mean", "distinct-2 within an output", True),
    "distinct_3": ("mean", "distinct-3 within an output", True),
    "length_tokens": ("mean", "length (tokens)", None),
}


def summarise_generation(values_per_item: list[dict]) -> dict[str, dict]:
    """Every GENERATION_METRICS key as a metric with its bootstrap 95% interval.

    A mean is over the items where the value is not None (distinct-n of a short output); a metric
    with no such item is absent.
    """
    out = {}
    for key, (kind, label, higher_is_better) in GENERATION_METRICS.items():
        values = [item.get(key) for item in values_per_item]
        value, ci, n, method = estimate(values, kind)
        if n == 0:
            continue
        out[key] = metric(value, ci, n, kind=kind, label=label, higher_is_better=higher_is_better, ci_method=method)
    return out
