"""XSTest: 250 safe prompts that merely sound unsafe + 200 unsafe contrasts (Röttger et al. 2024).

Read from the Hugging Face hub (walledai/XSTest: prompt, focus, type, note, label; its one split);
without the hub export it to JSONL (with "harmful") and pass the file instead. One item is one
prompt; its id is its row position; `label` ("safe" / "unsafe") gives subset and harmful: refusing
a safe prompt is over-refusal, refusing an unsafe one is right. `meta` keeps `type` and `focus`.
"""

from __future__ import annotations

from rtune.data.sources import _string_field
from rtune.errors import DataError
from rtune.eval.benchmarks.base import Benchmark, Item, hub_rows, prompt_text, register

DATASET_ID = "walledai/XSTest"
LABELS = ("safe", "unsafe")


def load() -> tuple[list[Item], dict]:
    rows, digest = hub_rows("xstest", DATASET_ID)
    items = []
    for index, (where, row) in enumerate(rows):
        label = _string_field(row, "label", where)
        if label not in LABELS:
            raise DataError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {label!r}")
        meta = {k: row[k] for k in ("type", "focus") if isinstance(row.get(k), str)}
        items.append(Item(id=str(index), prompt=prompt_text(row, "prompt", where), harmful=label == "unsafe",
                          subset=label, meta=meta))
    return items, {"source": f"hub:{DATASET_ID}", "sha256": digest}


BENCHMARK = register(Benchmark(
    name="xstest",
    description="XSTest: 250 safe prompts that sound unsafe + 200 unsafe ones (over-refusal, hub)",
    source=f"hub:{DATASET_ID}",
    load=load,
))
