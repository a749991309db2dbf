"""MaliciousInstruct: 100 malicious instructions in 10 intents (Huang et al. 2023).

Read from the Hugging Face hub (walledai/MaliciousInstruct, field `prompt`, its one split); without
the hub export it to JSONL and pass the file instead. One item is one instruction; its id is its
row position "0".."99". Every item is harmful.
"""

from __future__ import annotations

from rtune.eval.benchmarks.base import Benchmark, Item, hub_rows, prompt_text, register

DATASET_ID = "walledai/MaliciousInstruct"


def load() -> tuple[list[Item], dict]:
    rows, digest = hub_rows("malicious-instruct", DATASET_ID)
    items = [Item(id=str(index), prompt=prompt_text(row, "prompt", where), harmful=True)
             for index, (where, row) in enumerate(rows)]
    return items, {"source": f"hub:{DATASET_ID}", "sha256": digest}


BENCHMARK = register(Benchmark(
    name="malicious-instruct",
    description="MaliciousInstruct: 100 malicious instructions (refusal rate, hub)",
    source=f"hub:{DATASET_ID}",
    load=load,
))
