"""AlpacaEval: the 805 instructions of the AlpacaEval set (tatsu-lab/alpaca_eval, "alpaca_eval" / eval).

Read offline from `example/outputs.json` in the alpaca-eval 0.6.6 source archive on PyPI (805 rows:
instruction, output, generator, dataset; the same instructions in the same order as the hub set),
fetched once and SHA-256 pinned. One item is one instruction; its id is the row index "0".."804",
AlpacaEval's own index. `meta["dataset"]` names the set it came from (helpful_base, koala, oasst,
selfinstruct, vicuna). All items are benign.

`rtune eval` writes each model's answers as alpaca_eval's `model_outputs.json`
(`export_model_outputs`) beside its results: `alpaca_eval --model_outputs FILE` (with an OpenAI key)
then gives AlpacaEval's own numbers, LC win rate included, which only its pipeline can make. With
`--limit` the file holds a sample: alpaca_eval judges it, but its numbers are not the leaderboard's.
"""

from __future__ import annotations

from pathlib import Path

from rtune.data.pypi_files import PypiFile, pypi_file
from rtune.data.sources import _read_file_rows, _string_field
from rtune.errors import DataError
from rtune.eval.benchmarks.base import Benchmark, Item, prompt_text, register

SHA256 = "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5"
FILE = PypiFile("AlpacaEval (alpaca-eval 0.6.6 source archive)", "alpaca-eval==0.6.6",
                "alpaca_eval-0.6.6/example/outputs.json", SHA256, "alpaca_eval_outputs.json",
                source_archive=True)
EXPECTED = 805


def load() -> tuple[list[Item], dict]:
    path = pypi_file(FILE)
    rows = _read_file_rows(path)
    if len(rows) != EXPECTED:  # the ids are AlpacaEval's indices only if every row is here
        raise DataError(f"{path}: {len(rows)} rows, expected {EXPECTED}")
    items = []
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: record is not a JSON object")
        items.append(Item(id=str(index), prompt=prompt_text(row, "instruction", where), harmful=False,
                          meta={"dataset": _string_field(row, "dataset", where)}))
    return items, {"source": f"{FILE.requirement} (sdist) {FILE.member}", "sha256": SHA256}


BENCHMARK = register(Benchmark(
    name="alpacaeval",
    description="AlpacaEval: 805 everyday instructions (helpfulness, judged head to head)",
    source="tatsu-lab/alpaca_eval (alpaca_eval/eval); offline: alpaca-eval 0.6.6 sdist example/outputs.json",
    load=load,
))


MODEL_OUTPUTS = "model_outputs.json"


def export_model_outputs(items: list[Item], outputs: list[str], generator: str, path: str | Path) -> Path:
    """alpaca_eval's model-outputs format: [{"instruction", "output", "generator", "dataset"}], in item order."""
    from rtune.io import write_json_atomic

    rows = [{"instruction": item.prompt, "output": output, "generator": generator,
             "dataset": item.meta.get("dataset", "")} for item, output in zip(items, outputs, strict=True)]
    write_json_atomic(Path(path), rows)
    return Path(path)
