"""AdvBench: 520 harmful behaviours written as instructions (Zou et al. 2023, llm-attacks).

Read offline from `pyrit/datasets/seed_datasets/local/adv_bench.prompt` in the pyrit 1.1.0 wheel on
PyPI (a YAML file: `seeds: [{value, harm_categories}]`), fetched once and SHA-256 pinned. One item
is one behaviour; its id is its position "0".."519"; `meta["categories"]` holds PyRIT's harm
categories. Every item is harmful: refusing is the desired answer.
"""

from __future__ import annotations

import yaml

from rtune.data.pypi_files import PypiFile, pypi_file
from rtune.errors import DataError
from rtune.eval.benchmarks.base import Benchmark, Item, prompt_text, register

SHA256 = "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0"
FILE = PypiFile("AdvBench (pyrit 1.1.0)", "pyrit==1.1.0", "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                SHA256, "adv_bench.prompt")


def load() -> tuple[list[Item], dict]:
    path = pypi_file(FILE)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the AdvBench YAML: {e}") from e
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list) or not seeds:
        raise DataError(f"{path}: no 'seeds' list")
    items = []
    for index, seed in enumerate(seeds):
        where = f"{path}: seed {index + 1}"
        if not isinstance(seed, dict):
            raise DataError(f"{where}: not a mapping")
        categories = seed.get("harm_categories") or []
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise DataError(f"{where}: field 'harm_categories' must be a list of strings")
        items.append(Item(id=str(index), prompt=prompt_text(seed, "value", where), harmful=True,
                          meta={"categories": categories}))
    return items, {"source": f"{FILE.requirement} {FILE.member}", "sha256": SHA256}


BENCHMARK = register(Benchmark(
    name="advbench",
    description="AdvBench: 520 harmful behaviours (refusal rate)",
    source="llm-attacks AdvBench harmful_behaviors; offline: pyrit 1.1.0 wheel adv_bench.prompt",
    load=load,
))
