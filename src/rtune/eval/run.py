"""`rtune eval MODEL_OR_RUN... --bench NAME[,NAME] --out EVAL_DIR`: models side by side on benchmarks.

For each model: render every benchmark's prompts with the model's own template, generate what the
cache lacks (rtune.eval.generation), score what needs the model (response ranking and reference
NLL where items have references, distribution shift against the untuned base for tuned models;
also cached), then compute the per-item values and the summaries with bootstrap intervals and
write them in the results layout (rtune.eval.results). A model is loaded only when something is
missing, so re-running a finished evaluation only recomputes the summaries.
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


@dataclass
class LoadedModel:
    label: str
    spec: str
    renderer: object
    model: object = None
    tokenizer: object = None
    lora_request: object = None  # vLLM
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
        entries.append((loaded, model_fingerprint(str(spec), renderer)))
    write_json_atomic(out_dir / EVAL_INFO, {
        "rtune_version": rtune.__version__, "models": {m.label: {"spec": m.spec, "fingerprint": fp} for m, fp in entries},
        "benchmarks": [b.info for b in benches] + ([{"name": "lm-eval", "tasks": lm_plan.tasks}] if lm_plan else []),
        "lm_eval": lm_plan.info(), "decoding": config.decoding.resolved(device_type),
        "limit": config.limit, "seed": config.seed, "ranking_k": config.ranking_k, "time": run_folder.now(),
        "judge": None if config.judge is None else {"url": redact_url(config.judge.url), "model": config.judge.model,
                                                    "kinds": config.judge.kinds, "reference": config.judge.reference},
    })
    # 1. Each model in turn: generations and model-based scores (a model is loaded only if needed).
    data = {}
    for loaded, fp in (entries if benches else []):
        data[loaded.label] = collect(loaded, fp, benches, config, out_dir, device_type)
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
    """{bench name: {"bench", "rows", "scored", "counts", "timings"}}: generations and model-based scores."""
    timings: dict[str, float] = {}
    environment = output_environment(device_type, quantization(loaded.spec), config.decoding.backend)
    cache = generation_cache(out_dir, fp, config.decoding, device_type, environment)
    scores = JsonlCache(out_dir / "cache" / fp["id"] /
                        f"scores-{cache_name(config.decoding, device_type, environment)}.jsonl", SCORE_FIELDS)
    prompts = {b.name: [loaded.renderer.render_prompt(item.prompt) for item in b.items] for b in benches}
    # Per benchmark: its prompts alone decide its batches (rtune.eval.generation.fixed_batches).
    wanted = {b.name: {prompt_key(ids): ids for ids in prompts[b.name]} for b in benches}
    gen_keys = {b.name: item_keys(wanted[b.name], config.decoding) for b in benches}
    score_keys = {b.name: [_score_key(b, i, config, gen_keys[b.name][prompt_key(ids)])
                           for i, ids in enumerate(prompts[b.name])] for b in benches}
    needs_model = any(missing(wanted[b.name], cache, config.decoding) for b in benches) or any(
        score_keys[b.name][i] not in scores for b in benches for i in range(len(b.items))
        if _scored(loaded, b.items[i], config))
    if needs_model:
        t = time.perf_counter()
        load(loaded, config, device_type)
        timings["load_s"] = round(time.perf_counter() - t, 2)
    out = {}
    total = {"from_cache": 0, "generated": 0}
    for bench in benches:
        t = time.perf_counter()
        counts = generate_missing(loaded, wanted[bench.name], cache, config.decoding, config.progress)
        total = {k: total[k] + counts[k] for k in total}
        found = cached_outputs(wanted[bench.name], cache, config.decoding)
        rows = [{"id": item.id, **found[prompt_key(ids)]} for item, ids in zip(bench.items, prompts[bench.name])]
        scored = score_items(loaded, bench, prompts[bench.name], rows, scores, score_keys[bench.name], config)
        out[bench.name] = {"bench": bench, "rows": rows, "scored": scored, "counts": counts,
                           "environment": environment,
                           "timings": {**timings, "scores_s": round(time.perf_counter() - t - counts["seconds"], 2)}}
    log.info("%s: %d from the cache, %d generated (%d corrupt cache lines redone)", loaded.label,
             total["from_cache"], total["generated"], cache.corrupt)
    if config.progress:
        print(f"[eval] {loaded.label}: generations {total['from_cache']} cached, {total['generated']} generated, "
              f"{cache.corrupt} corrupt cache lines skipped and redone", flush=True)
    return out


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


def load(loaded: LoadedModel, config: EvalConfig, device_type: str) -> None:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_dtype(config.decoding.dtype, device_type)]
    if config.decoding.backend == "vllm":
        _load_vllm(loaded, dtype)
        return
    from rtune.infer.load import load_for_inference

    loaded.model, loaded.tokenizer, _ = load_for_inference(loaded.spec, loaded.template, dtype=dtype,
                                                           device=device_type, icl_file=loaded.icl_file)
    if hasattr(loaded.model, "merge_and_unload") and run_folder.base_quantization(
            run_folder.read_run_info(loaded.spec), "evaluating") is None:
        # A LoRA run decodes about twice as fast merged (one matmul per layer, not three); the
        # distribution shift then loads the untuned base on its own.
        loaded.model = loaded.model.merge_and_unload()


def _load_vllm(loaded: LoadedModel, dtype: torch.dtype) -> None:
    """vLLM serves a plain or merged folder as it is, a LoRA run as its base plus a LoRA request."""
    try:
        from vllm import LLM
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise RtuneError("--backend vllm needs vLLM on a CUDA machine, installed beside rtune (there is no "
                         "'vllm' extra: no vLLM release accepts rtune's transformers pin yet; see README)") from None
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    if run_folder.is_run_dir(loaded.spec):
        info = run_folder.read_run_info(loaded.spec)
        if info["weights"] == "adapter":
            rank = info["config"]["lora_r"]
            loaded.model = LLM(model=_vllm_path(info["base_model"]["load"]), dtype=dtype_name, enable_lora=True,
                               max_lora_rank=max(16, rank))
            loaded.lora_request = LoRARequest(loaded.label, 1, str(run_folder.weights_dir(loaded.spec, info)))
        else:
            loaded.model = LLM(model=str(run_folder.weights_dir(loaded.spec, info)), dtype=dtype_name)
    else:
        loaded.model = LLM(model=_vllm_path(loaded.spec), dtype=dtype_name)
    loaded.tokenizer = loaded.renderer.tokenizer


def _vllm_path(spec: str) -> str:
    from rtune.models import resolve_model

    ref = resolve_model(spec)
    if ref.gguf_file:
        raise RtuneError(f"--backend vllm: {spec} is a .gguf file; convert it to a model folder first")
    return ref.path


def unload(loaded: LoadedModel) -> None:
    loaded.model = loaded.tokenizer = loaded.lora_request = None
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
    if todo and loaded.model is not None and config.decoding.backend == "hf":
        values = {i: {} for i in todo}
        ref_items = [i for i in todo if bench.items[i].reference is not None]
        if ref_items:
            pairs = [(it.prompt, it.reference) for it in bench.items if it.reference is not None]
            index = {i: n for n, i in enumerate(j for j, it in enumerate(bench.items) if it.reference is not None)}
            ranking = ins.ranking_values(loaded.model, loaded.renderer, pairs, config.ranking_k, config.seed)
            nll = ins.nll_values(loaded.model, loaded.renderer, [pairs[index[i]] for i in ref_items])
            for i, v in zip(ref_items, nll):
                values[i].update(ranking[index[i]], **v)
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
    return summary, item_rows
