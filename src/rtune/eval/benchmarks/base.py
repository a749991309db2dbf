"""What every benchmark is: a named set of prompts (items), loaded from the hub or an offline source.

A benchmark module defines a `Benchmark` and registers it (`register`); `load_benchmark(spec)`
turns a name (or a local file) into items, drawing the same `--limit`/`--seed` subsample for every
model. Items say whether refusing them is desired (`harmful`), so refusal metrics know which
rate a refusal counts towards: refusal on harmful items, over-refusal on benign ones.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from rtune.data.sources import _string_field  # the strict field check rtune.data uses, same messages
from rtune.errors import DataError, RtuneError


@dataclass
class Item:
    id: str  # unique within its benchmark
    prompt: str  # the instruction exactly as the model gets it (a context already joined in)
    reference: str | None = None  # a reference response, where the set has one (held-out files)
    harmful: bool | None = None  # True: refusing is right; False: a benign request (refusing it is over-refusal)
    subset: str = ""  # e.g. "standard" / "contextual", "safe" / "unsafe", "regular" / "safety"
    meta: dict = field(default_factory=dict)  # category, source, ...

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "reference": self.reference, "harmful": self.harmful,
                "subset": self.subset, "meta": self.meta}


@dataclass
class Benchmark:
    name: str
    description: str  # one line for --help and reports
    source: str  # where the data comes from: hub dataset id and/or the offline package
    load: Callable[[], tuple[list[Item], dict]]  # -> (all items, {"source": ..., "sha256": ..., ...})


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def subsample(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """The same `limit` items for every model: a seeded draw, kept in the set's own order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise RtuneError(f"--limit must be >= 1, got {limit}")
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for i, item in enumerate(items) if i in keep]


@dataclass
class LoadedBenchmark:
    """What `load_benchmark` returns: the items to answer and the facts a results file records."""

    name: str
    description: str
    items: list[Item]  # after the seeded --limit draw
    info: dict  # {"name", "source", "sha256", "total", "limit", "seed", "selected"}


def prompt_text(row: dict, name: str, where: str) -> str:
    """A prompt field: a non-empty string (an empty prompt cannot be answered or judged)."""
    text = _string_field(row, name, where)
    if not text.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return text


def rows_sha256(rows: list[dict]) -> str:
    """A stable hash of rows read from the hub (there is no file to hash): canonical JSON lines."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    return h.hexdigest()


def hub_rows(bench: str, dataset_id: str, *, config: str | None = None, split: str | None = None
             ) -> tuple[list[tuple[str, dict]], str]:
    """Rows of a hub dataset as (location, row) pairs, and their hash.

    With no `split`, the dataset must have exactly one (these sets ship a single split whose name
    varies between uploads). Anything that stops the download becomes one clear RtuneError.
    """
    try:
        import datasets

        loaded = datasets.load_dataset(dataset_id, config)
    except Exception as e:  # offline, gated, renamed: all mean "cannot use this set now"
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        raise RtuneError(
            f"benchmark '{bench}': could not load '{dataset_id}' from the Hugging Face hub "
            f"({type(e).__name__}: {first_line}). Without the hub, export it to JSONL with an 'instruction' "
            f"field (and \"harmful\": true on harmful prompts) and pass the path to --bench."
        ) from e
    splits = list(loaded)
    if split is None and len(splits) != 1:
        raise RtuneError(f"benchmark '{bench}': '{dataset_id}' has splits {splits}, expected exactly one")
    chosen = split or splits[0]
    if chosen not in loaded:
        raise RtuneError(f"benchmark '{bench}': '{dataset_id}' has no split '{chosen}' (it has {splits})")
    rows = [dict(row) for row in loaded[chosen]]
    where = f"{dataset_id} ({chosen})"
    return [(f"{where}: row {i + 1}", row) for i, row in enumerate(rows)], rows_sha256(rows)
