"""What every benchmark is: a named set of prompts (items), loaded from the hub or an offline source.

A benchmark module defines a `Benchmark` and registers it (`register`); `load_benchmark(spec)`
turns a name (or a local file) into items, drawing the same `--limit`/`--seed` subsample for every
model. Items say whether refusing them is desired (`harmful`), so refusal metrics know which
rate a refusal counts towards: refusal on harmful items, over-refusal on benign ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from rtune.errors import RtuneError


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
