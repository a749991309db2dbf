"""Where `rtune eval` (and the demo's evaluation) spends its time: each stage's seconds and share.

    python perf/eval_stages.py --demo rtune-demo          # the demo's evaluation and report, from scratch
    python perf/eval_stages.py --models gemma-3-270m,runs/rt --bench heldout.jsonl,advbench:16

It runs rtune's own `run_eval` (and, with --demo, `build_report`) into a fresh folder, so nothing
comes from an earlier run's caches, with a clock around the functions each stage calls:

    load          loading a model for generation and scoring (its backend's load)
    generation    generating the answers
    ranking+nll   response ranking and reference NLL (rtune.eval.instructability.reference_values)
    shift base    loading the untuned base for the distribution shift (merged runs)
    shift         the distribution shift's forward passes
    similarity    MiniLM relevance and similarity to the reference (loading it included)
    rouge         ROUGE-L against the reference
    summaries     the rest of the per-benchmark summaries (intervals, heuristics)
    judges, comparisons, report
    other         the rest: benchmarks, fingerprints, caches, writing results

A stage's time excludes the stages it calls (similarity and rouge are not counted in summaries).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

SPENT: dict[str, float] = {}
_STACK: list[list] = []  # [stage, start, seconds spent in stages it called]


@contextmanager
def stage(name: str):
    frame = [name, time.perf_counter(), 0.0]
    _STACK.append(frame)
    try:
        yield
    finally:
        _STACK.pop()
        total = time.perf_counter() - frame[1]
        SPENT[name] = SPENT.get(name, 0.0) + total - frame[2]
        if _STACK:
            _STACK[-1][2] += total


def clock(owner, attribute: str, name: str) -> None:
    """Time every call of owner.attribute as stage `name` (left alone when it does not exist)."""
    original = getattr(owner, attribute, None)
    if original is None:
        print(f"(no {getattr(owner, '__name__', owner)}.{attribute} in this version: '{name}' not timed)")
        return

    @functools.wraps(original)
    def timed(*args, **kwargs):
        with stage(name):
            return original(*args, **kwargs)

    setattr(owner, attribute, timed)


def install_clocks() -> None:
    import rtune.eval.comparisons as comparisons
    import rtune.eval.instructability as ins
    import rtune.eval.metrics.reference as reference
    import rtune.eval.metrics.relevance as relevance
    import rtune.eval.run as run

    for module, cls in (("hf", "HFBackend"), ("vllm", "VLLMBackend"), ("endpoint", "EndpointBackend")):
        try:  # loading a model (or reaching a server) for generation and scoring
            backend = getattr(__import__(f"rtune.infer.backends.{module}", fromlist=[cls]), cls)
        except (ImportError, AttributeError):
            continue
        clock(backend, "load", "load")
    clock(run, "generate_missing", "generation")
    clock(ins, "reference_values", "ranking+nll")
    clock(run._base_model, "__enter__", "shift base")
    clock(ins, "shift_values", "shift")
    clock(relevance.Embedder, "__init__", "similarity")
    clock(relevance.Embedder, "relevance", "similarity")
    clock(reference, "rouge_l", "rouge")
    clock(run, "summarise_bench", "summaries")
    clock(comparisons, "write_comparisons", "comparisons")
    try:
        import rtune.eval.judging as judging

        clock(judging, "run_judges", "judges")
    except ImportError:
        pass


def demo_eval(demo_dir: Path):
    """(models, labels, templates, EvalConfig) as `rtune demo` evaluates them (rtune.demo.run_demo)."""
    from rtune.demo import DemoConfig
    from rtune.eval.generation import EvalDecoding
    from rtune.eval.run import EvalConfig

    config = DemoConfig()
    heldout = demo_dir / "data" / "train.heldout.jsonl"
    runs = {m: demo_dir / "runs" / m for m in ("rt", "it")}
    missing = [str(p) for p in [heldout, *runs.values()] if not p.exists()]
    if missing:
        raise SystemExit(f"not a finished demo folder ({', '.join(missing)} missing); run `rtune demo` first")
    benches = [str(heldout), f"advbench:{config.safety_size}", f"harmbench:{config.safety_size}"]
    eval_config = EvalConfig(benches=benches, seed=config.seed, ranking_k=config.ranking_k,
                             decoding=EvalDecoding(max_new_tokens=config.max_new_tokens,
                                                   batch_size=config.eval_batch_size))
    models = [config.model, str(runs["rt"]), str(runs["it"]), config.model]
    return models, ["base", "rt", "it", "base+urial-r"], [None, None, None, "urial-r"], eval_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", help="a finished `rtune demo` folder: time its evaluation and report")
    p.add_argument("--models", help="comma-separated models (instead of --demo)")
    p.add_argument("--bench", help="comma-separated benchmarks (with --models)")
    p.add_argument("--limit", type=int, help="items per benchmark (with --models)")
    p.add_argument("--out", help="a new folder for the results (default: a temporary one, deleted)")
    a = p.parse_args()
    if bool(a.demo) == bool(a.models):
        p.error("give --demo DIR or --models (with --bench)")

    from rtune.eval.run import EvalConfig, run_eval

    if a.demo:
        models, labels, templates, config = demo_eval(Path(a.demo))
    else:
        if not a.bench:
            p.error("--models needs --bench")
        models, labels, templates = a.models.split(","), None, None
        config = EvalConfig(benches=a.bench.split(","), limit=a.limit)
    install_clocks()
    with tempfile.TemporaryDirectory(prefix="rtune-eval-stages-") as tmp:
        out = Path(a.out) if a.out else Path(tmp) / "eval"
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} is not empty: the stages are timed from scratch, without caches")
        load_before = os.getloadavg()
        start = time.perf_counter()
        with stage("other"):
            run_eval(models, config, out, labels=labels, templates=templates)
            if a.demo:
                from rtune.report import build_report

                with stage("report"):
                    build_report([out], out.parent / "report")
        total = time.perf_counter() - start
    print(f"\nload average (1, 5, 15 min) before: {' '.join(f'{v:.2f}' for v in load_before)}; "
          f"after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'stage':<14} {'seconds':>8} {'share':>6}")
    for name, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"{name:<14} {seconds:>8.1f} {seconds / total:>6.1%}")
    print(f"{'total':<14} {total:>8.1f}")


if __name__ == "__main__":
    main()
