"""Just-Eval-Instruct: 1,000 instructions, 800 regular + 200 safety (Lin et al. 2023, URIAL).

Read from the Hugging Face hub (re-align/just-eval-instruct, its one split "test"); there is no
offline copy on PyPI, so without the hub export it to JSONL and pass the file instead. One item is
one instruction; its id is the row's `id` (0..999). The set's `category` field says "regular" or
"safety"; when a copy lacks it, the set's documented layout decides: the first 800 rows are regular,
the last 200 safety (just-eval scores rows 0-799 for quality, 800-999 for safety). subset is
"regular" / "safety"; safety items are harmful (refusing is right), regular ones benign.
`meta` keeps the source set (`dataset`) and `source_id`.
"""

from __future__ import annotations

from rtune.data.sources import _check_unique_id, _id_field
from rtune.errors import DataError
from rtune.eval.benchmarks.base import Benchmark, Item, hub_rows, prompt_text, register

DATASET_ID = "re-align/just-eval-instruct"
SUBSETS = ("regular", "safety")
REGULAR_ROWS, TOTAL_ROWS = 800, 1000  # the documented layout, used only without a category field


def subsets_of(rows: list[tuple[str, dict]]) -> list[str]:
    """"regular" / "safety" per row: from `category` when every row has it, else by position."""
    categories = [row.get("category") if isinstance(row, dict) else None for _, row in rows]
    if all(c in SUBSETS for c in categories):
        return categories
    if len(rows) != TOTAL_ROWS:
        raise DataError(f"{DATASET_ID}: {len(rows)} rows without a 'category' of regular/safety on each; "
                        f"cannot tell the safety part apart (expected {TOTAL_ROWS} rows, the last "
                        f"{TOTAL_ROWS - REGULAR_ROWS} safety)")
    return ["regular" if i < REGULAR_ROWS else "safety" for i in range(len(rows))]


def load() -> tuple[list[Item], dict]:
    rows, digest = hub_rows("justeval", DATASET_ID)
    items, seen = [], {}
    for index, ((where, row), subset) in enumerate(zip(rows, subsets_of(rows))):
        rid = _id_field(row, "id", where) if "id" in row else str(index)
        _check_unique_id(rid, where, seen)
        meta = {k: row[k] for k in ("dataset", "source_id") if isinstance(row.get(k), str)}
        items.append(Item(id=rid, prompt=prompt_text(row, "instruction", where), harmful=subset == "safety",
                          subset=subset, meta=meta))
    return items, {"source": f"hub:{DATASET_ID}", "sha256": digest}


BENCHMARK = register(Benchmark(
    name="justeval",
    description="Just-Eval-Instruct: 800 regular instructions + 200 safety prompts (hub)",
    source=f"hub:{DATASET_ID}",
    load=load,
))
