"""The grid file of `rtune experiment GRID.yaml`, checked whole before anything runs, and its cells.

    models:    [gemma-3-270m, meta-llama/Llama-3.1-8B]      base model specs
    data:      [alpaca-demo:256, lima]                      sources as `rtune data prepare` takes them;
                                                            ":N" a sample size (several sizes of one
                                                            source make the data-size axis)
      or       {sources: [...], holdout: K, max_response_chars: C}
    holdout:   24               K instructions held out per source, evaluated as the benchmark "heldout"
    methods:   [rt, it]                                     rt | it | rt-empty-user
    refusals:  {source: builtin, counts: [0, 100], filter: paper}
    refined:   [false, true]                                with a `refiner` block when true is listed
    refiner:   {url: ..., model: ..., max_tokens: 2048}     or {local: MODEL_OR_RUN}
    train:     {config: cpu, epochs: 3, lr: 2.0e-3}         any `rtune train` field, spelled as the field
    eval:      {bench: [advbench:32, rtune-xs-safe], max_new_tokens: 192, judge_url: ..., ...}
    baselines: [base, base+urial-r]                         untuned references, evaluated alike
    seed:      0                                            data sample, refusal sample, training
    slurm:     {partition: gpu, gpus_per_node: 1, timeout_min: 720}   for --executor slurm

Unknown keys anywhere are errors naming the key and the file. A cell is one model x source x size x
method x refusal count x refined flag.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rtune.errors import RtuneError
from rtune.render import METHODS

TOP_KEYS = ("models", "data", "holdout", "methods", "refusals", "refined", "refiner", "train", "eval", "baselines",
            "seed", "slurm")
DATA_KEYS = ("sources", "holdout", "max_response_chars")
REFUSAL_KEYS = ("source", "counts", "filter")
REFINER_KEYS = ("url", "model", "local", "template", "max_tokens", "concurrency", "timeout")
BASELINES = ("base", "base+urial-r", "base+urial", "base+zero-shot", "base+rules")
SLURM_KEYS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "account", "qos",
              "constraint")
# rtune eval's options as a grid spells them (the EvalConfig / EvalDecoding / JudgeConfig field names).
EVAL_KEYS = {
    "bench": "benchmarks (list), as --bench takes them", "limit": "--limit", "max_new_tokens": "--max-new-tokens",
    "batch_size": "--batch-size", "dtype": "--dtype", "stop": "--stop (list)", "ranking_k": "--ranking-k",
    "shift": "distribution shift on/off", "relevance": "MiniLM relevance on/off",
    "lm_eval_tasks": "--lm-eval-tasks (list)", "lm_eval_dtype": "--lm-eval-dtype",
    "judge_url": "--judge-url", "judge_model": "--judge-model", "judge": "--judge kinds (list)",
    "judge_concurrency": "--judge-concurrency", "judge_timeout": "--judge-timeout",
}


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RtuneError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float, bool)):
        return [value]
    if not isinstance(value, list):
        raise RtuneError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _unknown(found: dict, known, where: str) -> None:
    for key in found:
        if key not in known:
            raise RtuneError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")


@dataclass(frozen=True)
class Source:
    """One data point of the data axis: a source and its sample size (None: all of it)."""

    spec: str
    size: int | None

    @property
    def name(self) -> str:
        base = Path(self.spec).stem if (os.sep in self.spec or "." in Path(self.spec).name) else self.spec
        return f"{base}:{self.size}" if self.size is not None else base


def parse_source(text, where: str) -> Source:
    text = str(text)
    spec, _, n = text.rpartition(":")
    if spec and n.isdigit():
        if int(n) < 1:
            raise RtuneError(f"{where}: sample size must be >= 1 in {text!r}")
        return Source(spec, int(n))
    return Source(text, None)


@dataclass(frozen=True)
class Cell:
    model: str
    source: Source
    method: str
    refusals: int
    refined: bool

    @property
    def name(self) -> str:
        """A readable, unique-in-the-grid label: model/source/method/N/refined."""
        model = Path(self.model.rstrip("/")).name
        parts = [model, self.source.name.replace(":", "-n"), self.method, f"refusals{self.refusals}"]
        return "_".join(parts) + ("_refined" if self.refined else "")

    def to_dict(self) -> dict:
        return {"model": self.model, "source": self.source.spec, "size": self.source.size, "method": self.method,
                "refusals": self.refusals, "refined": self.refined}


@dataclass
class Grid:
    path: str
    models: list[str]
    sources: list[Source]
    methods: list[str]
    holdout: int = 0
    max_response_chars: int | None = None
    refusal_source: str = "builtin"
    refusal_counts: list[int] = field(default_factory=lambda: [0])
    refusal_filter: str | None = None
    refined: list[bool] = field(default_factory=lambda: [False])
    refiner: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)
    seed: int = 0
    slurm: dict = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        return [Cell(m, s, method, n, r) for m in self.models for s in self.sources for method in self.methods
                for n in self.refusal_counts for r in self.refined]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = [{"spec": s.spec, "size": s.size} for s in self.sources]
        return d


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid file; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise RtuneError(f"{path}: grid file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RtuneError(f"{path}: not valid YAML: {e}") from None
    where = str(path)
    raw = _mapping(raw, where)
    _unknown(raw, TOP_KEYS, where)
    for key in ("models", "data", "methods"):
        if not raw.get(key):
            raise RtuneError(f"{where}: '{key}' is required")

    data = raw["data"]
    data = {"sources": data} if isinstance(data, (list, str)) else _mapping(data, f"{where}: data")
    _unknown(data, DATA_KEYS, f"{where}: data")
    sources = [parse_source(s, f"{where}: data") for s in _list(data.get("sources"), f"{where}: data.sources")]
    if not sources:
        raise RtuneError(f"{where}: data: no sources")
    if len(set(sources)) != len(sources):
        raise RtuneError(f"{where}: data: a source is listed twice")
    holdout = raw.get("holdout", data.get("holdout", 0))
    if not isinstance(holdout, int) or holdout < 0:
        raise RtuneError(f"{where}: holdout must be a whole number >= 0, got {holdout!r}")

    methods = [str(m) for m in _list(raw["methods"], f"{where}: methods")]
    for m in methods:
        if m not in METHODS:
            raise RtuneError(f"{where}: methods: unknown method {m!r}; choose from {', '.join(METHODS)}")

    refusals = _mapping(raw.get("refusals"), f"{where}: refusals")
    _unknown(refusals, REFUSAL_KEYS, f"{where}: refusals")
    counts = _list(refusals.get("counts", [0]), f"{where}: refusals.counts")
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise RtuneError(f"{where}: refusals.counts must be whole numbers >= 0, got {counts!r}")
    if any(counts) and not refusals.get("source"):
        raise RtuneError(f"{where}: refusals.source is required when a count is above 0")

    refined = _list(raw.get("refined", [False]), f"{where}: refined")
    if not refined or not all(isinstance(r, bool) for r in refined):
        raise RtuneError(f"{where}: refined must be a list of true/false, got {refined!r}")
    refiner = _mapping(raw.get("refiner"), f"{where}: refiner")
    _unknown(refiner, REFINER_KEYS, f"{where}: refiner")
    if True in refined and not (refiner.get("url") and refiner.get("model") or refiner.get("local")):
        raise RtuneError(f"{where}: refined lists true, so a refiner block with url and model (or local) is needed")

    train = _mapping(raw.get("train"), f"{where}: train")
    from rtune.train.config import load_config

    if "method" in train:
        raise RtuneError(f"{where}: train.method: the grid's 'methods' axis sets the method")
    try:  # every field checked now, not when the first cell trains
        load_config(train.get("config"), {k: v for k, v in train.items() if k != "config"})
    except RtuneError as e:
        raise RtuneError(f"{where}: train: {e}") from None

    evals = _mapping(raw.get("eval"), f"{where}: eval")
    _unknown(evals, EVAL_KEYS, f"{where}: eval")
    if not _list(evals.get("bench"), f"{where}: eval.bench") and not holdout and not evals.get("lm_eval_tasks"):
        raise RtuneError(f"{where}: nothing to evaluate: give eval.bench, holdout or eval.lm_eval_tasks")
    if "pairwise" in _list(evals.get("judge"), f"{where}: eval.judge"):
        raise RtuneError(f"{where}: eval.judge: pairwise is the grid's comparison stage (RT vs IT, refined vs "
                         "original); list refusal and aspects here")

    baselines = [str(b) for b in _list(raw.get("baselines"), f"{where}: baselines")]
    for b in baselines:
        if b not in BASELINES:
            raise RtuneError(f"{where}: baselines: unknown baseline {b!r}; choose from {', '.join(BASELINES)}")
    slurm = _mapping(raw.get("slurm"), f"{where}: slurm")
    _unknown(slurm, SLURM_KEYS, f"{where}: slurm")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RtuneError(f"{where}: seed must be a whole number")
    models = [str(m) for m in _list(raw["models"], f"{where}: models")]
    return Grid(path=str(path), models=models, sources=sources, methods=methods, holdout=holdout,
                max_response_chars=data.get("max_response_chars"), refusal_source=str(refusals.get("source", "")),
                refusal_counts=[int(n) for n in counts], refusal_filter=refusals.get("filter"),
                refined=[bool(r) for r in refined], refiner=refiner, train=train, eval=evals, baselines=baselines,
                seed=seed, slurm=slurm)
