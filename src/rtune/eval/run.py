"""`rtune eval MODEL_OR_RUN... --bench NAME[,NAME] --out EVAL_DIR`: models side by side on benchmarks.

For each model: render every benchmark's prompts with the model's own template, generate what the
cache lacks (rtune.eval.generation), score what needs the model (response ranking and reference
NLL where items have references, distribution shift against the untuned base for tuned models;
also cached), then compute the per-item values and the summaries with bootstrap intervals and
write them in the results layout (rtune.eval.results). A model is loaded only when something is
missing, so re-running a finished evaluation only recomputes the summaries.

Generation runs on a backend (rtune.infer.backends): hf here (default), vllm, or running servers
(`EvalConfig.endpoint`, `rtune eval --gen-url`). The scores need the weights here: on the other
backends they run only with `score_local` (the HF model is loaded for them after generation), and
are otherwise listed under "not_computed" in each summary, never silently left out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import rtune
from rtune import run_folder
from rtune.errors import RtuneError
from rtune.eval.cache import JsonlCache
from rtune.eval.generation import (
    EvalDecoding,
    cache_name,
    cached_outputs,
    default_device_type,
    generate_missing,
    generation_cache,
    item_keys,
    missing,
    prompt_key,
    resolve_dtype,
)
from rtune.eval.results import EVAL_INFO, metric, safe_name, write_result
from rtune.fingerprint import model_fingerprint, output_environment
from rtune.io import write_json_atomic
from rtune.redact import redact_url

if TYPE_CHECKING:
    from rtune.eval.judging import JudgeConfig

log = logging.getLogger("rtune")
SCORE_FIELDS = {"values": dict}
# What the model-based scores add, and when: items with references; tuned models (shift).
REFERENCE_SCORES = ("ranking_top1", "ranking_pairwise", "nll_given_instruction", "nll_no_instruction", "nll_gain")
SHIFT_SCORES = ("shift_top1_differs", "shift_outside_top3")


@dataclass
class EndpointConfig:
    """Generation by running OpenAI-compatible servers (rtune.infer.backends.endpoint)."""

    urls: list[str]  # replicas of one model
    model: str | None = None  # the served model's name (default: the only one listed)
    fingerprint: str | None = None  # required for servers that report none (rtune serve does)
    prompt: str = "ids"  # ids | text
    concurrency: int = 32  # requests in flight per replica
    timeout: float = 600.0  # seconds per request


@dataclass
class EvalConfig:
    benches: list[str]
    limit: int | None = None
    seed: int = 0
    decoding: EvalDecoding = field(default_factory=EvalDecoding)
    template: str | None = None  # for plain models (runs and merged folders bring their own)
    icl_file: str | None = None  # demonstrations for the in-context formats urial / urial-r (default rtune's)
    ranking_k: int = 7  # distractor responses per instruction in response ranking
    shift: bool = True  # token distribution shift against the untuned base (tuned models)
    relevance: bool = True  # MiniLM instruction/output similarity
    progress: bool = True
    judge: "JudgeConfig | None" = None  # LLM judges over an OpenAI-compatible endpoint (rtune.eval.judging)
    # lm-evaluation-harness tasks (rtune.eval.lm_eval), beside "core" in benches; local task folders.
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: list[str] = field(default_factory=list)
    lm_eval_dtype: str = "checkpoint"  # checkpoint: the dtype lm_eval's own CLI loads the model in
    endpoint: EndpointConfig | None = None  # generate on running servers (--gen-url) instead of here
    score_local: bool = False  # vllm / endpoint: load the HF model here for ranking, NLL and shift


@dataclass
class LoadedModel:
    label: str
    spec: str
    renderer: object
    model: object = None  # the HF model that scores (the HF backend's own, or loaded for --score-local)
    tokenizer: object = None
    backend: object = None  # the generation backend (rtune.infer.backends)
    base_spec: str | None = None  # the untuned base of a tuned model (distribution shift)
    template: str | None = None  # a plain model's template (None: tulu); urial, urial-r, zero-shot: in context
    icl_file: str | None = None  # the in-context demonstrations (None: rtune's own)


def bench_and_limit(spec: str, limit: int | None) -> tuple[str, int | None]:
    """"advbench:100" -> ("advbench", 100): a per-benchmark sample size; else the common --limit."""
    name, _, n = spec.rpartition(":")
    return (name, int(n)) if name and n.isdigit() else (spec, limit)


def default_label(spec: str) -> str:
    return Path(str(spec).rstrip("/")).name or str(spec)


def run_eval(models: list[str], config: EvalConfig, out_dir: str | os.PathLike, labels: list[str] | None = None,
             templates: list[str | None] | None = None) -> list[dict]:
    """Evaluate every model on every benchmark; returns the summaries (also written under out_dir).

    templates: per model, the template of a plain model (None: config.template), e.g. the same base
    twice, as it is and in context: [base, base], templates=[None, "urial-r"]. A model prompted in
    context is labelled with its format (gemma-3-270m+urial-r) unless its label already ends so."""
    from rtune.eval.benchmarks import load_benchmark, local_names
    from rtune.infer.load import load_renderer
    from rtune.render import ICL_TEMPLATES

    if config.endpoint is not None:
        config.decoding.backend = "endpoint"
        if len(models) != 1:
            raise RtuneError(f"--gen-url generates for one model (MODEL gives its tokenizer and template), got "
                             f"{len(models)}: run one `rtune eval` per served model into the same --out")
    elif config.decoding.backend == "endpoint":
        raise RtuneError("the endpoint backend needs --gen-url URL[,URL...]")
    config.decoding.check()
    rules = config.decoding.rules
    if rules is not None:
        from rtune.infer.rules import check_untrained

        for spec in models:  # the rule-based baseline is for untrained models
            check_untrained(spec, rules)
    labels = labels or [default_label(m) for m in models]
    if len(labels) != len(models):
        raise RtuneError(f"{len(models)} models but {len(labels)} names")
    templates = [t or config.template for t in (templates or [None] * len(models))]
    if len(templates) != len(models):
        raise RtuneError(f"{len(models)} models but {len(templates)} templates")
    labels = [f"{x}+{t}" if t in ICL_TEMPLATES and not x.endswith(f"+{t}") else x for x, t in zip(labels, templates)]
    if rules is not None:  # base+rules, base+urial-r+rules
        labels = [x if x.endswith(f"+{rules.label}") else f"{x}+{rules.label}" for x in labels]
    if len({safe_name(x) for x in labels}) != len(labels):
        raise RtuneError(f"model names must differ: {labels} (name them with --names)")
    if config.judge is not None:
        config.judge.check(labels)
    # lm-eval tasks (--bench core, --lm-eval-tasks) take their own path (rtune.eval.lm_eval), after
    # rtune's benchmarks and without the generation cache; their data is checked here, before any load.
    from rtune.eval.lm_eval import LmEvalPlan

    lm_plan = LmEvalPlan.from_config(config)
    if lm_plan and config.endpoint is not None:
        raise RtuneError("--bench core / --lm-eval-tasks run MODEL's weights here, not the --gen-url servers: run "
                         "them in an `rtune eval` without --gen-url")
    lm_plan.prepare(out_dir)
    # Everything that can fail fast, before any model is loaded: benchmarks, renderers, fingerprints.
    specs = [bench_and_limit(b, config.limit) for b in lm_plan.benches]
    names = local_names([spec for spec, _ in specs])
    benches = [load_benchmark(spec, limit, config.seed, name=names.get(spec)) for spec, limit in specs]
    seen = [b.name for b in benches]
    if len(set(seen)) != len(seen):
        twice = sorted({n for n in seen if seen.count(n) > 1})
        raise RtuneError(f"--bench names {', '.join(twice)} more than once")
    device_type = default_device_type()
    out_dir = Path(out_dir)
    entries = []
    for spec, label, template in zip(models, labels, templates):
        icl_file = config.icl_file if template in ICL_TEMPLATES else None
        renderer = load_renderer(spec, template, icl_file=icl_file)
        loaded = LoadedModel(label, str(spec), renderer, base_spec=tuned_base(str(spec)), template=template,
                             icl_file=icl_file)
        loaded.backend = make_backend(loaded, config, device_type)
        # An endpoint's outputs are identified by what it serves (asked now: replicas with different
        # weights stop everything here, before anything is generated).
        fp = (loaded.backend.model_fingerprint() if config.endpoint is not None
              else model_fingerprint(str(spec), renderer))
        entries.append((loaded, fp))
    write_json_atomic(out_dir / EVAL_INFO, {
        "rtune_version": rtune.__version__, "models": {m.label: {"spec": m.spec, "fingerprint": fp} for m, fp in entries},
        "benchmarks": [b.info for b in benches] + ([{"name": "lm-eval", "tasks": lm_plan.tasks}] if lm_plan else []),
        "lm_eval": lm_plan.info(), "decoding": config.decoding.resolved(device_type),
        "limit": config.limit, "seed": config.seed, "ranking_k": config.ranking_k, "time": run_folder.now(),
        "judge": None if config.judge is None else {"url": redact_url(config.judge.url), "model": config.judge.model,
                                                    "kinds": config.judge.kinds, "reference": config.judge.reference},
        "generation": {m.label: backend_info(m) for m, _ in entries},
    })
    # 1. Each model in turn: generations and model-based scores (a model is loaded only if needed).
    data = {}
    for loaded, fp in (entries if benches else []):
        try:
            data[loaded.label] = collect(loaded, fp, benches, config, out_dir, device_type)
        finally:
            unload(loaded)
    # 2. The LLM judges, over every model's outputs at once (pairwise needs the reference's).
    judged = {}
    if config.judge is not None:
        from rtune.eval.judging import run_judges

        judged = run_judges(config.judge, {m: {b: {"items": d["bench"].items, "rows": d["rows"]} for b, d in
                                               benches_.items()} for m, benches_ in data.items()},
                            out_dir, config.seed, config.progress)
    # 3. Per-item values, summaries with intervals, written in the results layout.
    summaries = []
    for loaded, fp in entries:
        for name, d in data.get(loaded.label, {}).items():
            t = time.perf_counter()
            summary, item_rows = summarise_bench(loaded, fp, d["bench"], d["rows"], d["scored"], config, device_type)
            if judged:
                add_judgments(summary, item_rows, judged, loaded.label, name, config)
            summary["generation"] = d["counts"]
            summary["environment"] = d["environment"]
            summary["generation_backend"] = backend_info(loaded)
            summary["timings"] = {**d["timings"], "metrics_s": round(d["timings"]["scores_s"]
                                                                     + time.perf_counter() - t, 2)}
            folder = write_result(out_dir, loaded.label, name, item_rows, summary)
            if d["bench"].info.get("builtin") and name == "alpacaeval":  # for alpaca_eval's own pipeline
                from rtune.eval.benchmarks.alpacaeval import MODEL_OUTPUTS, export_model_outputs

                export_model_outputs(d["bench"].items, [r["output"] for r in d["rows"]], loaded.label,
                                     folder / MODEL_OUTPUTS)
            summaries.append(summary)
    if lm_plan:
        summaries += lm_plan.run(entries, config, out_dir, device_type)
    if benches:
        from rtune.eval.comparisons import write_comparisons

        write_comparisons(out_dir, config.seed)
    return summaries


def add_judgments(summary: dict, item_rows: list[dict], judged: dict, label: str, bench: str,
                  config: EvalConfig) -> None:
    """The LLM judges' metrics and per-item labels; their settings and counters (no API key) in "judges"."""
    found = judged[label][bench]
    summary["metrics"].update(found["metrics"])
    for row, judgment in zip(item_rows, found["judgments"]):
        row["judgments"][config.judge.model] = judgment
    summary["judges"]["llm"] = {"url": redact_url(config.judge.url), "model": config.judge.model, "kinds": config.judge.kinds,
                                "reference": judged["_reference"], "stats": judged["_stats"]}


def collect(loaded: LoadedModel, fp: dict, benches, config: EvalConfig, out_dir: Path, device_type: str) -> dict:
    """{bench name: {"bench", "rows", "scored", "counts", "timings"}}: generations, then model-based scores."""
    timings: dict[str, float] = {}
    backend = loaded.backend
    environment = backend.environment()
    cache = generation_cache(out_dir, fp, config.decoding, device_type, environment)
    scores = scores_cache(out_dir, fp, loaded, config, device_type, environment)
    prompts = {b.name: [loaded.renderer.render_prompt(item.prompt) for item in b.items] for b in benches}
    # Per benchmark: its prompts alone decide its batches (rtune.eval.generation.fixed_batches).
    wanted = {b.name: {prompt_key(ids): ids for ids in prompts[b.name]} for b in benches}
    gen_keys = {b.name: item_keys(wanted[b.name], config.decoding) for b in benches}
    score_keys = {b.name: [_score_key(b, i, config, gen_keys[b.name][prompt_key(ids)])
                           for i, ids in enumerate(prompts[b.name])] for b in benches}
    needs_scores = scores is not None and any(
        score_keys[b.name][i] not in scores for b in benches for i in range(len(b.items))
        if _scored(loaded, b.items[i], config))
    # 1. Generations (the backend loads only when something is missing).
    if any(missing(wanted[b.name], cache, config.decoding) for b in benches):
        t = time.perf_counter()
        backend.load()
        timings["load_s"] = round(time.perf_counter() - t, 2)
    counts = {}
    for bench in benches:
        counts[bench.name] = generate_missing(backend, loaded.label, wanted[bench.name], cache, config.decoding,
                                              config.progress)
    # 2. Scores, with the HF model: the HF backend's own, else loaded here for them (--score-local)
    # once the other backend has let go of the GPU.
    if needs_scores:
        if backend.name == "hf":
            backend.load()
        else:
            backend.close()
            t = time.perf_counter()
            backend = scorer_backend(loaded, config, device_type)
            backend.load()
            timings["scorer_load_s"] = round(time.perf_counter() - t, 2)
        loaded.model, loaded.tokenizer = backend.model, backend.tokenizer
    out = {}
    total = {"from_cache": 0, "generated": 0}
    for bench in benches:
        t = time.perf_counter()
        total = {k: total[k] + counts[bench.name][k] for k in total}
        found = cached_outputs(wanted[bench.name], cache, config.decoding)
        rows = [{"id": item.id, **found[prompt_key(ids)]} for item, ids in zip(bench.items, prompts[bench.name])]
        scored = (score_items(loaded, bench, prompts[bench.name], rows, scores, score_keys[bench.name], config)
                  if scores is not None else [{} for _ in rows])
        out[bench.name] = {"bench": bench, "rows": rows, "scored": scored, "counts": counts[bench.name],
                           "environment": environment,
                           "timings": {**timings, "scores_s": round(time.perf_counter() - t, 2)}}
    log.info("%s: %d from the cache, %d generated (%d corrupt cache lines redone)", loaded.label,
             total["from_cache"], total["generated"], cache.corrupt)
    if config.progress:
        print(f"[eval] {loaded.label}: generations {total['from_cache']} cached, {total['generated']} generated, "
              f"{cache.corrupt} corrupt cache lines skipped and redone", flush=True)
        if scores is None and any(_scored(loaded, item, config) for b in benches for item in b.items):
            print(f"[eval] {loaded.label}: ranking, NLL and shift not computed ({not_computed_reason(config)})",
                  flush=True)
    return out


def scores_cache(out_dir: Path, fp: dict, loaded: LoadedModel, config: EvalConfig, device_type: str,
                 environment: dict) -> JsonlCache | None:
    """The model-based scores' cache; None where they are not computed (another backend, no --score-local).

    HF: keyed like the generations. Otherwise the scores come from the HF model loaded here, so the
    key names it (its fingerprint), its dtype and this machine's environment besides the generations'."""
    folder = out_dir / "cache" / fp["id"]
    if config.decoding.backend == "hf":
        return JsonlCache(folder / f"scores-{cache_name(config.decoding, device_type, environment)}.jsonl",
                          SCORE_FIELDS)
    if not config.score_local:
        return None
    scorer = {"model": model_fingerprint(loaded.spec, loaded.renderer)["id"],
              "dtype": resolve_dtype(config.decoding.dtype, device_type),
              "environment": output_environment(device_type, quantization(loaded.spec), "hf"),
              "generations": environment, "decoding": config.decoding.resolved(device_type)}
    name = hashlib.sha256(json.dumps(scorer, sort_keys=True).encode()).hexdigest()[:16]
    return JsonlCache(folder / f"scores-local-{name}.jsonl", SCORE_FIELDS)


def not_computed_reason(config: EvalConfig) -> str:
    where = "on --gen-url servers" if config.decoding.backend == "endpoint" else f"with --backend {config.decoding.backend}"
    return f"they need the model's weights here and generation ran {where}; add --score-local to compute them"


def quantization(spec: str) -> str | None:
    """"nf4" when a QLoRA run's base will load in 4 bits here (CUDA), else None (rtune.run_folder)."""
    if run_folder.is_run_dir(spec):
        return run_folder.base_quantization(run_folder.read_run_info(spec), "evaluating")
    return None


# -- loading ---------------------------------------------------------------------------------------
def tuned_base(spec: str) -> str | None:
    """The untuned base of a run or merged folder (for distribution shift); None for a plain model."""
    if run_folder.is_run_dir(spec):
        return run_folder.read_run_info(spec)["base_model"]["load"]
    if run_folder.is_merged_dir(spec):
        return run_folder.read_template_info(spec).get("base_model", {}).get("load")
    return None


def make_backend(loaded: LoadedModel, config: EvalConfig, device_type: str):
    """The generation backend of one model (rtune.infer.backends); nothing heavy is loaded yet."""
    dtype = resolve_dtype(config.decoding.dtype, device_type)
    if config.endpoint is not None:
        from rtune.infer.backends.endpoint import EndpointBackend

        e = config.endpoint
        return EndpointBackend(e.urls, loaded.renderer, model=e.model, fingerprint=e.fingerprint, prompt=e.prompt,
                               concurrency=e.concurrency, timeout=e.timeout)
    if config.decoding.backend == "vllm":
        from rtune.infer.backends.vllm import VLLMBackend

        return VLLMBackend(loaded.spec, loaded.renderer, loaded.label,
                           dtype="bfloat16" if dtype == "bf16" else "float32", device_type=device_type)
    return scorer_backend(loaded, config, device_type)


def scorer_backend(loaded: LoadedModel, config: EvalConfig, device_type: str):
    """The HF backend: it generates (default backend) and it scores (always)."""
    from rtune.infer.backends.hf import HFBackend

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_dtype(config.decoding.dtype, device_type)]
    return HFBackend(loaded.spec, loaded.renderer, template=loaded.template, icl_file=loaded.icl_file, dtype=dtype,
                     device=device_type, merge_lora=True, quantization=quantization(loaded.spec))


def backend_info(loaded: LoadedModel) -> dict:
    info = getattr(loaded.backend, "info", None)
    return info() if info is not None else {"backend": loaded.backend.name}


def unload(loaded: LoadedModel) -> None:
    if loaded.backend is not None:
        loaded.backend.close()
    loaded.model = loaded.tokenizer = None
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- scores that need the model (cached) -----------------------------------------------------------
def _scored(loaded: LoadedModel, item, config: EvalConfig) -> bool:
    return item.reference is not None or (config.shift and loaded.base_spec is not None)


def _score_key(bench, index: int, config: EvalConfig, generation_key: str) -> str:
    """Everything an item's scores depend on: prompt, reference, distractors (the set), settings, and
    the generation the shift is measured on (its cache key)."""
    item = bench.items[index]
    refs = [i.reference for i in bench.items] if item.reference is not None else []
    text = json.dumps([item.prompt, item.reference, refs, config.ranking_k, config.seed, config.shift,
                       generation_key if config.shift else None])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def score_items(loaded: LoadedModel, bench, prompt_ids: list[list[int]], rows: list[dict], scores: JsonlCache,
                keys: list[str], config: EvalConfig) -> list[dict]:
    """Per item: ranking / NLL values (items with references) and shift values (tuned models)."""
    from rtune.eval import instructability as ins

    todo = [i for i, item in enumerate(bench.items) if _scored(loaded, item, config) and keys[i] not in scores]
    if todo:
        values = {i: {} for i in todo}
        ref_items = [i for i in todo if bench.items[i].reference is not None]
        if ref_items:
            pairs = [(it.prompt, it.reference) for it in bench.items if it.reference is not None]
            index = {i: n for n, i in enumerate(j for j, it in enumerate(bench.items) if it.reference is not None)}
            # Ranking and NLL in one pass over the model (the own response's score is both).
            found = ins.reference_values(loaded.model, loaded.renderer, pairs, config.ranking_k, config.seed,
                                         only=[index[i] for i in ref_items])
            for i, v in zip(ref_items, found):
                values[i].update(v)
        if config.shift and loaded.base_spec is not None:
            with _base_model(loaded) as base:
                shift = ins.shift_values(base, [prompt_ids[i] for i in todo], [rows[i]["token_ids"] for i in todo])
            for i, v in zip(todo, shift):
                values[i].update(v)
        scores.add_many({keys[i]: {"values": values[i]} for i in todo})
    return [scores.get(k)["values"] if k in scores else {} for k in keys]


class _base_model:
    """The untuned base of a tuned model: the LoRA model with its adapter off, else the base loaded alone."""

    def __init__(self, loaded: LoadedModel):
        self.loaded, self.own = loaded, None

    def __enter__(self):
        from rtune.eval.instructability import base_of

        model = self.loaded.model
        if hasattr(model, "disable_adapter"):
            self.context = base_of(model)
            self.context.__enter__()
            return model
        from rtune.models import load_model

        param = next(model.parameters())
        self.own = load_model(self.loaded.base_spec, dtype=param.dtype, device=param.device)
        return self.own

    def __exit__(self, *exc):
        if self.own is None:
            self.context.__exit__(*exc)
        self.own = None
        return False


# -- per-item values and summaries -----------------------------------------------------------------
def summarise_bench(loaded: LoadedModel, fp: dict, bench, rows: list[dict], scored: list[dict], config: EvalConfig,
                    device_type: str) -> tuple[dict, list[dict]]:
    """(summary, per-item rows) of one model on one benchmark."""
    from rtune.eval.metrics.generation import generation_values, summarise_generation
    from rtune.eval.metrics.intervals import estimate
    from rtune.eval.metrics.refusal import JUDGE, is_refusal, refusal_rates

    items = bench.items
    values = [generation_values(item.prompt, row) for item, row in zip(items, rows)]
    refs = [i for i, item in enumerate(items) if item.reference is not None]
    if config.relevance:
        from rtune.eval.metrics.relevance import Embedder

        relevance = Embedder().relevance
        for v, r in zip(values, relevance([i.prompt for i in items], [row["output"] for row in rows])):
            v["relevance"] = r
        if refs:
            rel = relevance([items[i].prompt for i in refs], [items[i].reference for i in refs])
            for i, r in zip(refs, rel):
                values[i]["reference_relevance"] = r
    if refs:  # reference-based quality: what the format heuristics cannot see
        from rtune.eval.metrics.reference import rouge_l

        for i in refs:
            values[i]["rouge_l"] = rouge_l(rows[i]["output"], items[i].reference)
        if config.relevance:
            similarity = relevance([items[i].reference for i in refs], [rows[i]["output"] for i in refs])
            for i, sim in zip(refs, similarity):
                values[i]["reference_similarity"] = 0.0 if sim is None else sim  # an empty answer resembles nothing
    for v, s in zip(values, scored):
        v.update(s)
    refusals = [is_refusal(row["output"]) for row in rows]
    metrics = summarise_generation(values)
    metrics.update(refusal_rates(rows, [item.harmful for item in items]))
    labels = {
        "rouge_l": ("ROUGE-L F1 against the reference (rouge-score, stemmed)", True),
        "reference_similarity": ("similarity to the reference (MiniLM cosine)", True),
        "relevance": ("relevance (instruction-output cosine, MiniLM)", True),
        "reference_relevance": ("relevance of the reference responses (MiniLM)", None),
        "ranking_top1": ("response ranking: own response above all K others", True),
        "ranking_pairwise": ("response ranking: share of the K others below the own response", True),
        "nll_given_instruction": ("reference NLL per token given the instruction", False),
        "nll_no_instruction": ("reference NLL per token without instruction", False),
        "nll_gain": ("NLL gain from the instruction (nats per token)", True),
        "shift_top1_differs": ("shift: base top-1 differs from the answer token", None),
        "shift_outside_top3": ("shift: answer token outside the base's top 3", None),
    }
    for name, (label, better) in labels.items():
        kind = "rate" if name.startswith(("ranking", "shift")) else "mean"
        value, ci, n, method = estimate([v.get(name) for v in values], kind, seed=config.seed)
        if n:
            metrics[name] = metric(value, ci, n, kind, label, better, ci_method=method)
    # What is least flattering leads: content against the reference before the format heuristics.
    lead = [k for k in ("rouge_l", "reference_similarity") if k in metrics]
    metrics = {k: metrics[k] for k in lead} | {k: v for k, v in metrics.items() if k not in lead}
    item_rows = [
        {"id": item.id, "prompt": item.prompt, "subset": item.subset, "harmful": item.harmful,
         "reference": item.reference, "output": row["output"], "finish_reason": row["finish_reason"],
         "num_tokens": row["num_tokens"], "judgments": {JUDGE: "refusal" if refused else "compliance"},
         "values": v}
        for item, row, v, refused in zip(items, rows, values, refusals)
    ]
    summary = {
        "model": {"label": loaded.label, "spec": loaded.spec, "fingerprint": fp,
                  "template": loaded.renderer.template_name},
        "benchmark": {**bench.info, "description": bench.description},
        "decoding": config.decoding.resolved(device_type),
        "judges": {"refusal": JUDGE},
        "settings": {"ranking_k": config.ranking_k, "shift": config.shift, "relevance": config.relevance,
                     "intervals": "95%: Wilson for rates of 0/1 items, percentile bootstrap over items (2000 "
                                  f"resamples, seed {config.seed}) for means; each metric's ci_method says which"},
        "metrics": metrics,
        "rtune_version": rtune.__version__,
        "time": run_folder.now(),
    }
    if config.decoding.backend != "hf" and not config.score_local:  # said, never silently left out
        names = (REFERENCE_SCORES if refs else ()) + (SHIFT_SCORES if config.shift and loaded.base_spec else ())
        if names:
            summary["not_computed"] = {name: not_computed_reason(config) for name in names}
    return summary, item_rows
