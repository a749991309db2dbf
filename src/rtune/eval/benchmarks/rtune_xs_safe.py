"""rtune-xs-safe: rtune's own safe prompts that look unsafe, for over-refusal offline.

XSTest's idea (a harmless prompt with a trap word: "kill" a process, "shoot" fireworks), but
written for rtune and shipped with it (rtune_xs_safe.yaml, package data), because XSTest itself is
only on the hub. Every item is safe (`harmful: false`), so the refusal rate on this set, keyword or
LLM judged, is the false-refusal rate. One item is one prompt; id and `subset` ("safe") come with
it; `meta` keeps the trap's `category` (homonyms, figurative-language, safe-targets, ...) and the
`trap` word itself.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rtune.data.sources import _check_unique_id, _string_field
from rtune.errors import DataError
from rtune.eval.benchmarks.base import Benchmark, Item, prompt_text, register
from rtune.io import sha256_file

FILE = Path(__file__).with_name("rtune_xs_safe.yaml")


def load() -> tuple[list[Item], dict]:
    try:
        data = yaml.safe_load(FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{FILE}: cannot read rtune-xs-safe: {e}") from e
    entries = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{FILE}: no 'prompts' list")
    items, seen = [], {}
    for number, entry in enumerate(entries, start=1):
        where = f"{FILE}: prompt {number}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: not a mapping")
        item_id = prompt_text(entry, "id", where)
        _check_unique_id(item_id, where, seen)
        items.append(Item(id=item_id, prompt=prompt_text(entry, "prompt", where), harmful=False, subset="safe",
                          meta={"category": _string_field(entry, "category", where),
                                "trap": _string_field(entry, "trap", where)}))
    return items, {"source": f"rtune package data {FILE.name}", "sha256": sha256_file(FILE)}


BENCHMARK = register(Benchmark(
    name="rtune-xs-safe",
    description="rtune-xs-safe: rtune's own safe prompts that look unsafe (false-refusal rate, offline)",
    source="rtune package data rtune_xs_safe.yaml (written for rtune, XSTest's idea)",
    load=load,
))
