"""A local file as a benchmark: `--bench path/to/set.jsonl` (.jsonl, .json, .csv; .parquet too).

The benchmark is named after the file stem. One row is one item:
    "instruction" (or "prompt")   the prompt (required, non-empty)
    "input"                       optional; joined as "{instruction}\\n\\n{input}", as `rtune data prepare` does
    "id"                          optional (a string or whole number); default the row position "0", "1", ...
    "response" / "reference" / "output"   optional reference response (the first present is used)
    "harmful"                     optional boolean (CSV: true/false, 1/0, yes/no); default false: benign
    "subset", "source", "category"   optional strings, kept (subset as Item.subset, the rest in meta)
The held-out file of `rtune data prepare --holdout K` ({"id", "instruction", "response", "source"})
is such a file, with references. Rows are read by rtune.data's reader, so every error names
`path:line` (JSON, JSONL) or `path: row N` (CSV) and the field; duplicate ids are an error.
"""

from __future__ import annotations

from pathlib import Path

from rtune.data.sources import _check_unique_id, _id_field, _read_file_rows, _string_field, _type_name
from rtune.errors import DataError
from rtune.eval.benchmarks.base import Item, prompt_text
from rtune.io import sha256_file

PROMPT_FIELDS = ("instruction", "prompt")
REFERENCE_FIELDS = ("response", "reference", "output")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no", "")  # CSV cells are text


def _harmful(row: dict, where: str) -> bool:
    value = row.get("harmful")
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise DataError(f"{where}: field 'harmful' must be true or false, got {value!r}")


def _item(index: int, where: str, row) -> Item:
    if not isinstance(row, dict):
        raise DataError(f"{where}: record is not a JSON object (got {_type_name(row)})")
    name = next((f for f in PROMPT_FIELDS if f in row), None)
    if name is None:
        raise DataError(f"{where}: missing field 'instruction' (or 'prompt')")
    prompt = prompt_text(row, name, where)
    if "input" in row:
        extra = _string_field(row, "input", where, null_ok=True)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    rid = _id_field(row, "id", where) if "id" in row else str(index)
    reference = None
    ref_name = next((f for f in REFERENCE_FIELDS if f in row), None)
    if ref_name is not None:
        reference = _string_field(row, ref_name, where, null_ok=True) or None  # an empty cell: no reference
    subset = _string_field(row, "subset", where, null_ok=True) if "subset" in row else ""
    meta = {k: _string_field(row, k, where) for k in ("source", "category") if row.get(k) is not None}
    return Item(id=rid, prompt=prompt, reference=reference, harmful=_harmful(row, where), subset=subset, meta=meta)


def load_file(path: str | Path) -> tuple[list[Item], dict]:
    """All items of a local benchmark file and {"source", "sha256"}."""
    path = Path(path)
    items, seen = [], {}
    for index, (where, row) in enumerate(_read_file_rows(path)):
        item = _item(index, where, row)
        _check_unique_id(item.id, where, seen)
        items.append(item)
    return items, {"source": str(path), "sha256": sha256_file(path)}
