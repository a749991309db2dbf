"""Core capabilities through lm-evaluation-harness: rtune loads and prompts the model, lm-eval does the rest.

    run_lm_eval("runs/rt", ["rtune_demo_mc"])            -> {"tasks": {task: {"metrics", "n", ...}}, ...}
    rtune eval base runs/rt runs/it --bench core --out evals/core
    rtune eval runs/rt --lm-eval-tasks my_task --lm-eval-include my_tasks/ --out evals/mine

Who does what. rtune loads the model (a run folder with its adapter merged in memory, a merged folder
or a plain model; rtune.infer.load), sets the tokenizer's `chat_template` to the model's own rtune
template exported as Jinja (`Renderer.chat_template()`: the prompt rtune trained and generates with)
and hands the model object and tokenizer to lm-eval's `HFLM`. lm-evaluation-harness (pinned 0.4.13,
the `lmeval` extra) owns everything else: the task definitions and datasets, few-shot sampling (as
multi-turn chat with `fewshot_as_multiturn`), the chat-template application, log-likelihood scoring,
greedy generation, filters, metrics and their standard errors. rtune only turns the numbers into its
results layout: one result per model, EVAL_DIR/results/<model>/lm-eval/summary.json, every task metric
a record with a 95% interval of value +- 1.96 x lm-eval's stderr (rates clipped to [0, 1]), plus
"average": the mean of each task's primary metric (PRIMARY).

`--bench core` is the paper's set (CORE_TASKS): MMLU, OpenBookQA, HellaSwag, ARC (easy and challenge),
PIQA 0-shot, GSM8K chain of thought 8-shot (`gsm8k_cot_llama`, its few-shot examples as earlier chat
turns). Their datasets come from the Hugging Face hub; offline, without them in the datasets cache,
the run stops before any model is loaded and says which datasets it needs. Local tasks run offline:
see lm_eval_tasks/ (rtune_demo_mc, rtune_demo_gen) and export_builtin_tasks().
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from rtune import run_folder
from rtune.errors import RtuneError

log = logging.getLogger("rtune")

LM_EVAL_VERSION = "0.4.13"  # the version pinned in the `lmeval` extra, and the one this module was checked against
BENCH_NAME = "lm-eval"  # the results folder and benchmark name of every lm-eval result
CORE = "core"  # the --bench name of the paper's tasks
# The paper's core capabilities (the authors' scripts/eval/core.sh): ai2_arc is lm-eval's tag for
# arc_easy + arc_challenge, listed here by name; gsm8k_cot_llama is 8-shot by its own config, the rest 0-shot.
CORE_TASKS = ("mmlu", "openbookqa", "hellaswag", "arc_easy", "arc_challenge", "piqa", "gsm8k_cot_llama")
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"  # rtune's offline example tasks (package data)
# Each task's headline number (the first of these it reports), averaged into "average": normalised
# accuracy where a task has it (HellaSwag, ARC, OpenBookQA, PIQA), accuracy (MMLU), and for
# generative tasks exact match after the task's strict answer filter, else its flexible one.
PRIMARY = ("acc_norm", "acc", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match")
# Metrics that are shares in [0, 1] (their intervals are clipped to it); anything else is a "mean".
RATE_METRICS = {"acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mc1", "mc2", "mcc",
                "inst_level_strict_acc", "inst_level_loose_acc", "prompt_level_strict_acc",
                "prompt_level_loose_acc", "pass@1", "contains"}
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
Z95 = 1.959963984540054
GREEDY = {"do_sample": False, "temperature": 0.0}  # lm-eval gen_kwargs: greedy for every generative task
ITEM_TEXT_LIMIT = 4000  # characters of a prompt kept in items.jsonl


# -- lm-eval itself ---------------------------------------------------------------------------------
def require_lm_eval():
    """The lm_eval module, or a clear error naming the extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise RtuneError("lm-evaluation-harness is not installed: pip install 'rtune[lmeval]' "
                         f"(lm_eval=={LM_EVAL_VERSION})") from None
    version = getattr(lm_eval, "__version__", "unknown")
    if version != LM_EVAL_VERSION:
        log.warning("lm_eval %s is installed; rtune was checked against %s", version, LM_EVAL_VERSION)
    return lm_eval


def lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "unknown")


def split_tasks(tasks) -> list[str]:
    """"a,b" or ["a", "core"] -> ["a", "b", ...]: comma lists split, "core" expanded, duplicates dropped."""
    if isinstance(tasks, str):
        tasks = [tasks]
    out = []
    for t in tasks:
        for name in str(t).split(","):
            name = name.strip()
            out += list(CORE_TASKS) if name == CORE else [name] if name else []
    if not out:
        raise RtuneError("no lm-eval task given")
    return list(dict.fromkeys(out))


# -- rtune's example tasks --------------------------------------------------------------------------
def builtin_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def export_builtin_tasks(dest: str | os.PathLike) -> Path:
    """Write rtune's example tasks into `dest` with their data files as absolute paths; returns dest.

    The shipped YAMLs name their JSONL files relative to their own folder, which lm-eval (the
    `datasets` json builder) would resolve against the working directory; the exported copies point
    at the installed files, so `lm_eval --include_path DEST --tasks rtune_demo_mc` runs from anywhere."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        cfg["dataset_kwargs"]["data_files"] = {split: str((TASKS_DIR / f).resolve()) for split, f in files.items()}
        text = (f"# Written by rtune from {path} (rtune.eval.lm_eval.export_builtin_tasks).\n"
                + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        tmp = dest / f".{path.name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dest / path.name)
    return dest


def make_task_manager(builtin_dir: str | os.PathLike, include_path=None, tasks: list[str] | None = None):
    """lm-eval's TaskManager over its own tasks, rtune's exported examples and the user's folders.

    Indexing lm-eval's ~15,000 task files takes about 5 s; when `tasks` are all plain tasks of the
    local folders, the index holds those folders only (the same YAML files, so the same tasks)."""
    from lm_eval.tasks import TaskManager

    extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    for folder in extra:
        if not Path(folder).is_dir():
            raise RtuneError(f"--lm-eval-include {folder}: not a folder")
    paths = [str(builtin_dir), *(str(Path(f).resolve()) for f in extra)]
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(getattr((local.task_index.get(t) or object()), "kind", None) is not None
               and local.task_index[t].kind.name in ("TASK", "PY_TASK") for t in tasks):
            return local
    return TaskManager(include_path=paths)


# -- checking tasks before any model is loaded ------------------------------------------------------
def _datasets_of(tm, name: str, seen: set | None = None) -> list[tuple[str, str | None]]:
    """(dataset_path, dataset_name) of every leaf task under a task, group or tag name (from lm-eval's index)."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    index = tm.task_index
    entry = index.get(name)
    if entry is None:
        return []
    cfg = entry.cfg or {}
    kind = getattr(entry.kind, "name", str(entry.kind))
    if kind == "TAG":
        return [d for n, e in index.items() if name in (e.tags or ()) and n != name for d in _datasets_of(tm, n, seen)]
    if kind == "GROUP":
        children = cfg.get("task") or []
        out = []
        for child in children if isinstance(children, list) else [children]:
            if isinstance(child, str):
                out += _datasets_of(tm, child, seen)
            elif isinstance(child, dict):
                if child.get("dataset_path"):
                    out.append((str(child["dataset_path"]), child.get("dataset_name")))
                elif isinstance(child.get("task"), str):
                    out += _datasets_of(tm, child["task"], seen)
        return out
    if cfg.get("custom_dataset") is not None:
        return [("custom_dataset", None)]
    return [(str(cfg["dataset_path"]), cfg.get("dataset_name"))] if cfg.get("dataset_path") else []


def _is_local(dataset_path: str) -> bool:
    return dataset_path in LOCAL_BUILDERS or dataset_path == "custom_dataset" or Path(dataset_path).exists()


def hub_datasets(tm, tasks: list[str]) -> dict[str, list[str]]:
    """{task: ["cais/mmlu (57 configurations)", ...]}: the hub datasets each task reads."""
    out = {}
    for task in tasks:
        counts: dict[str, set] = {}
        for path, name in _datasets_of(tm, task):
            if not _is_local(path):
                counts.setdefault(path, set()).add(name)
        out[task] = [p + (f" ({len(n)} configurations)" if len(n) > 1 else f" ({next(iter(n))})" if None not in n
                          else "") for p, n in counts.items()]
    return out


def _offline() -> bool:
    try:
        import datasets
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - only decides the wording of a message
        return False


def check_tasks(tm, tasks: list[str]) -> None:
    """Every task known to lm-eval and its data loadable; else one RtuneError that says what to do.

    Loading builds lm-eval's Task objects, which fetches (or reads from the datasets cache) their
    data: done once here, before any model is loaded, so a missing dataset fails in seconds."""
    import difflib

    unknown = [t for t in tasks if t not in tm.task_index]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, tm.all_tasks, n=3)
            hints.append(t + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise RtuneError("unknown lm-eval task(s): " + "; ".join(hints) + ". List them with `lm_eval ls tasks`; "
                         "local tasks need --lm-eval-include DIR (a folder of task YAMLs); rtune's examples: "
                         + ", ".join(builtin_task_names()))
    failed, loaded = {}, set()
    for t in tasks:
        try:
            with _quiet_lm_eval():
                tm.load([t])
            loaded.add(t)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds (offline, missing config, network)
            failed[t] = e
            if hub_datasets(tm, [t])[t]:
                # Without the hub every other hub task fails too, each after the hub client's retries:
                # name them all now rather than trying each.
                break
    if not failed:
        return
    untried = [t for t in tasks if t not in loaded and t not in failed]
    needs = hub_datasets(tm, list(failed) + untried)
    hub = {t: d for t, d in needs.items() if d}
    first = next(iter(failed.values()))
    reason = f"{type(first).__name__}: {str(first).strip().splitlines()[0] if str(first).strip() else ''}"
    if hub:
        listing = "; ".join(f"{t}: {', '.join(d)}" for t, d in hub.items())
        where = os.environ.get("HF_DATASETS_CACHE") or "the Hugging Face datasets cache"
        mode = ("the hub is switched off here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline()
                else "the hub could not be reached or the dataset failed to load")
        raise RtuneError(
            f"lm-eval could not load {', '.join(failed)} ({reason}): {', '.join(hub)} read their data from the "
            f"Hugging Face hub and {mode}. Datasets needed: {listing}. Either run once where the hub is reachable "
            f"(the datasets then stay in {where} and later runs work offline), or evaluate local tasks instead: "
            "--lm-eval-tasks NAME --lm-eval-include DIR, DIR holding task YAMLs with `dataset_path: json` and "
            "`dataset_kwargs: {data_files: {test: /absolute/path.jsonl}}`; examples in "
            f"{TASKS_DIR} ({', '.join(builtin_task_names())}) and in docs/core-capabilities.md.")
    raise RtuneError(f"lm-eval could not load {', '.join(failed)}: {reason}")


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs every task's configuration at INFO/WARNING; keep rtune's output readable."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


# -- loading the model as rtune prompts it ----------------------------------------------------------
CHECKPOINT_DTYPE = "checkpoint"
LM_EVAL_DTYPES = (CHECKPOINT_DTYPE, "auto", "fp32", "bf16", "fp16")
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def checkpoint_dtype(spec: str) -> str:
    """The dtype lm_eval's own CLI (`--model hf`, dtype "auto") loads a model in: its config's dtype,
    fp32 when the config names none. A LoRA run: its base's (lm_eval loads the base, then the adapter)."""
    from transformers import AutoConfig

    from rtune.models import remote_code_allowed, resolve_model

    spec = str(spec)
    if run_folder.is_run_dir(spec):
        info = run_folder.read_run_info(spec)
        folder = (run_folder.weights_dir(spec, info) if info["weights"] != "adapter"
                  else resolve_model(info["base_model"]["load"]).path)
    elif run_folder.is_merged_dir(spec):
        folder = spec
    else:
        ref = resolve_model(spec)
        if ref.gguf_file:
            return "fp32"  # transformers de-quantises GGUF weights to fp32
        folder = ref.path
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote_code_allowed())
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return _DTYPE_NAMES.get(name, "fp32")


def _torch_dtype(dtype, device) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from rtune.eval.generation import resolve_dtype

    device_type = torch.device(device).type if device is not None else (
        "cuda" if torch.cuda.is_available() else "cpu")
    name = resolve_dtype(str(dtype), device_type)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise RtuneError(f"unknown dtype {dtype!r}: auto, fp32, bf16 or fp16")
    return table[name]


def load_for_lm_eval(model_or_run, template: str | None = None, dtype=None, device=None, icl_file=None):
    """(model, tokenizer, renderer): a LoRA run merged in memory, the tokenizer carrying rtune's template.

    The tokenizer's `chat_template` becomes the renderer's Jinja export, so lm-eval's
    `apply_chat_template` renders exactly the prompt rtune trains and generates with (a run or
    merged folder's own template; for a plain model the --template asked for, tulu by default)."""
    from rtune.infer.load import load_for_inference

    spec = str(model_or_run)
    extra = {"icl_file": icl_file} if icl_file is not None else {}
    model, _, renderer = load_for_inference(spec, template, dtype=_torch_dtype(dtype, device), device=device, **extra)
    if hasattr(model, "merge_and_unload") and not (
            run_folder.is_run_dir(spec) and run_folder.base_quantization(run_folder.read_run_info(spec), "evaluating")):
        # One matmul per layer instead of three; an NF4 (QLoRA on CUDA) base keeps its adapter separate.
        model = model.merge_and_unload()
    model.eval()
    tokenizer = renderer.tokenizer
    tokenizer.chat_template = renderer.chat_template()
    return model, tokenizer, renderer


# -- running lm-eval --------------------------------------------------------------------------------
def run_lm_eval(model_or_run, tasks, *, template: str | None = None, limit: float | None = None,
                batch_size: int | str = 8, include_path=None, dtype=None, device=None,
                fewshot_as_multiturn: bool = True, apply_chat_template: bool = True, num_fewshot: int | None = None,
                log_samples: bool = True, task_manager=None, progress: bool = True, icl_file=None) -> dict:
    """Evaluate one model with lm-evaluation-harness; returns its metrics per task and the settings.

    model_or_run: a run folder (its adapter included), a merged folder or a plain model spec.
    tasks: lm-eval task, group or tag names ("a,b" or a list; "core" is the paper's set), rtune's
    examples (rtune_demo_mc, rtune_demo_gen) and tasks under include_path (a folder or a list).
    limit: the first N documents of every task (lm-eval's own --limit; a fraction when < 1).
    num_fewshot: None keeps each task's own (gsm8k_cot_llama 8, most others 0).
    dtype: torch dtype or "auto"/"fp32"/"bf16"; device: e.g. "cuda", "cpu" (default: a GPU if any).

    Returns {"lm_eval_version", "tasks": {task: {"metrics": {key: {"value", "stderr", "metric",
    "filter", "higher_is_better"}}, "n", "num_fewshot", "version", "primary", "subtasks"}},
    "settings", "results" (lm-eval's raw "results"), "samples" (per task, compact rows; with log_samples)}.
    A metric's key is lm-eval's without ",none" (e.g. "acc", "exact_match,strict-match").
    """
    require_lm_eval()
    tasks = split_tasks(tasks)
    with contextlib.ExitStack() as stack:
        if task_manager is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rtune-lm-eval-tasks-"))
            task_manager = make_task_manager(export_builtin_tasks(tmp), include_path, tasks)
            check_tasks(task_manager, tasks)
        t = time.perf_counter()
        model, tokenizer, renderer = load_for_lm_eval(model_or_run, template, dtype, device, icl_file)
        load_s = time.perf_counter() - t
        try:
            out = evaluate_loaded(model, tokenizer, tasks, task_manager, limit=limit, batch_size=batch_size,
                                  fewshot_as_multiturn=fewshot_as_multiturn, apply_chat_template=apply_chat_template,
                                  num_fewshot=num_fewshot, log_samples=log_samples, progress=progress)
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    out["settings"].update(model=str(model_or_run), template=renderer.template_name,
                           include_path=[str(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike))
                                                          else include_path or [])])
    out["timings"]["load_s"] = round(load_s, 2)
    return out


def evaluate_loaded(model, tokenizer, tasks: list[str], task_manager, *, limit=None, batch_size: int | str = 8,
                    fewshot_as_multiturn: bool = True, apply_chat_template: bool = True, num_fewshot=None,
                    log_samples: bool = True, progress: bool = True) -> dict:
    """lm-eval's simple_evaluate on a loaded model (HFLM around the model object), condensed."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    t = time.perf_counter()
    with _quiet_lm_eval(logging.WARNING if progress else logging.ERROR):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  apply_chat_template=apply_chat_template,
                                  fewshot_as_multiturn=fewshot_as_multiturn and apply_chat_template,
                                  gen_kwargs=dict(GREEDY), task_manager=task_manager, log_samples=log_samples)
    eval_s = time.perf_counter() - t
    out = condense(results, tasks)
    template = tokenizer.chat_template if apply_chat_template else None
    out["settings"] = {
        "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
        "apply_chat_template": apply_chat_template,
        "fewshot_as_multiturn": fewshot_as_multiturn and apply_chat_template,
        "gen_kwargs": dict(GREEDY), "chat_template": template,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(model.device),
        "seeds": {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234},  # simple_evaluate's defaults
    }
    out["timings"] = {"eval_s": round(eval_s, 2)}
    return out


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _json_safe(obj):
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable, ensure_ascii=False))


def condense(results: dict, requested: list[str]) -> dict:
    """lm-eval's results -> rtune's view: the requested tasks and groups (subtasks of a reported group
    left out, a tag's tasks each shown), each metric with its stderr, n and the task's primary metric."""
    res = results.get("results") or {}
    group_subtasks = results.get("group_subtasks") or {}
    n_samples = results.get("n-samples") or {}

    def leaves(name: str, seen=()) -> list[str]:
        if name in group_subtasks and name not in seen:
            return [x for child in group_subtasks[name] for x in leaves(child, (*seen, name))]
        return [name]

    members = {child for children in group_subtasks.values() for child in children}
    order = {name: i for i, name in enumerate(requested)}
    top = sorted((n for n in res if n not in members or n in order), key=lambda n: (order.get(n, len(order)), n))
    tasks = {}
    for name in top:
        metrics = {}
        for key, value in res[name].items():
            metric, sep, flt = key.partition(",")
            if not sep or metric.endswith("_stderr") or _number(value) is None:
                continue
            se = _number(res[name].get(f"{metric}_stderr,{flt}"))
            metrics[metric if flt == "none" else f"{metric},{flt}"] = {
                "value": float(value), "stderr": se, "metric": metric, "filter": flt,
                "higher_is_better": (results.get("higher_is_better") or {}).get(name, {}).get(metric)}
        n = sum(int((n_samples.get(leaf) or {}).get("effective", 0)) for leaf in leaves(name))
        tasks[name] = {"metrics": metrics, "n": n, "num_fewshot": (results.get("n-shot") or {}).get(name),
                       "version": (results.get("versions") or {}).get(name),
                       "primary": next((k for k in PRIMARY if k in metrics), next(iter(metrics), None)),
                       "subtasks": [x for x in leaves(name) if x != name]}
    samples = {}
    for task, rows in (results.get("samples") or {}).items():
        samples[task] = [_sample_row(task, s) for s in rows]
    return {"lm_eval_version": lm_eval_version(), "tasks": tasks, "results": _json_safe(res),
            "n_shot": _json_safe(results.get("n-shot") or {}), "samples": samples}


def _sample_row(task: str, s: dict) -> dict:
    """One logged document, compact: its prompt (the chat-templated context), target, responses, values."""
    args = s.get("arguments") or []
    first = args[0] if args else None
    if isinstance(first, dict):  # newer layouts name the argument fields
        first = list(first.values())
    prompt = first[0] if isinstance(first, (list, tuple)) and first else None
    values = {m: _number(s.get(m)) for m in (s.get("metrics") or []) if _number(s.get(m)) is not None}
    return _json_safe({
        "id": f"{task}/{s.get('doc_id')}", "task": task, "doc_id": s.get("doc_id"), "filter": s.get("filter"),
        "prompt": prompt[:ITEM_TEXT_LIMIT] if isinstance(prompt, str) else None,
        "continuations": [a[1] for a in args if isinstance(a, (list, tuple)) and len(a) > 1
                          and isinstance(a[1], str)] or None,
        "target": s.get("target"), "filtered_resps": s.get("filtered_resps"), "values": values,
    })


# -- rtune's results layout -------------------------------------------------------------------------
def interval(value: float, stderr: float | None, rate: bool) -> list[float] | None:
    """value +- 1.96 stderr (a normal approximation from lm-eval's stderr), clipped to [0, 1] for rates."""
    if stderr is None:
        return None
    lo, hi = value - Z95 * stderr, value + Z95 * stderr
    return [max(0.0, lo), min(1.0, hi)] if rate else [lo, hi]


def to_metrics(out: dict) -> dict:
    """run_lm_eval's tasks as rtune metric records: "<task>/<metric>" per metric, then "average"."""
    from rtune.eval.results import metric

    records, primaries = {}, []
    dtype = str(out.get("settings", {}).get("dtype", "?"))  # shown beside every number: lm-eval's scores move with it
    dtype = _DTYPE_NAMES.get(dtype, dtype)
    method = "normal approximation, value +- 1.96 x lm-eval's stderr"
    for task, t in out["tasks"].items():
        for key, m in t["metrics"].items():
            rate = m["metric"] in RATE_METRICS
            records[f"{task}/{key}"] = metric(m["value"], interval(m["value"], m["stderr"], rate), t["n"],
                                              "rate" if rate else "mean", f"{task} {key} ({dtype})",
                                              m["higher_is_better"], ci_method=method)
        if t["primary"] is not None:
            primaries.append((task, t["primary"], t["metrics"][t["primary"]], t["n"]))
    if primaries:
        value = sum(m["value"] for _, _, m, _ in primaries) / len(primaries)
        ses = [m["stderr"] for _, _, m, _ in primaries]
        # Tasks are independent samples: the mean's stderr is sqrt(sum se^2) / k.
        se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / len(ses)
        rate = all(m["metric"] in RATE_METRICS for _, _, m, _ in primaries)
        label = "average over tasks (" + ", ".join(f"{task} {key}" for task, key, _, _ in primaries) + f") ({dtype})"
        records["average"] = metric(value, interval(value, se, rate), sum(n for *_, n in primaries),
                                    "rate" if rate else "mean", label, True, ci_method=method)
    return records


def summary_of(out: dict, label: str, spec: str, fingerprint: dict | None, key: dict | None = None) -> dict:
    """The summary.json of one model's lm-eval result (rtune.eval.results layout)."""
    import rtune

    settings = out["settings"]
    tasks = list(out["tasks"])
    return {
        "model": {"label": label, "spec": spec, "fingerprint": fingerprint, "template": settings.get("template")},
        "benchmark": {"name": BENCH_NAME, "source": f"lm-evaluation-harness {out['lm_eval_version']}",
                      "tasks": tasks, "count": sum(t["n"] for t in out["tasks"].values()),
                      "description": "lm-evaluation-harness tasks (" + ", ".join(tasks) + ") on the model's own "
                                     "chat template" + (", few-shot examples as multi-turn chat"
                                                        if settings["fewshot_as_multiturn"] else "")
                                     + "; intervals here: value +- 1.96 x lm-eval's stderr"},
        "decoding": {"greedy": True, "gen_kwargs": settings["gen_kwargs"], "dtype": settings["dtype"],
                     "device": settings["device"], "batch_size": settings["batch_size"]},
        "judges": {},
        "settings": {"interval": "normal approximation: value +- 1.96 x lm-eval's stderr (rates clipped to [0, 1])",
                     "primary_metrics": {t: v["primary"] for t, v in out["tasks"].items()},
                     "average": "unweighted mean of each task's primary metric"},
        "lm_eval": {"version": out["lm_eval_version"], **{k: v for k, v in settings.items() if k != "chat_template"},
                    "n_shot": out["n_shot"], "tasks": {t: {k: v for k, v in d.items() if k != "metrics"}
                                                       for t, d in out["tasks"].items()},
                    "results": out["results"], "key": key},
        "metrics": to_metrics(out),
        "timings": out.get("timings", {}),
        "rtune_version": rtune.__version__,
        "time": run_folder.now(),
    }


def item_rows(out: dict) -> list[dict]:
    return [row for rows in out.get("samples", {}).values() for row in rows]


# -- `rtune eval`: lm-eval tasks beside rtune's own benchmarks --------------------------------------
@dataclass
class LmEvalPlan:
    """The lm-eval part of an `rtune eval` (--bench core[:N], --lm-eval-tasks); `benches` the rest of --bench."""

    tasks: list[str]
    benches: list[str]
    limit: int | None = None
    include: list[str] = field(default_factory=list)
    task_manager: object = None
    tasks_dir: Path | None = None

    @classmethod
    def from_config(cls, config) -> LmEvalPlan:
        tasks, rest, limit = [], [], config.limit
        for spec in config.benches:
            name, _, n = str(spec).rpartition(":")
            name, n = (name, int(n)) if name and n.isdigit() else (str(spec), None)
            if name == CORE:
                tasks += list(CORE_TASKS)
                limit = n if n is not None else limit
            else:
                rest.append(spec)
        asked = list(getattr(config, "lm_eval_tasks", None) or [])
        tasks = split_tasks(tasks + asked) if tasks or asked else []
        return cls(tasks, rest, limit, [str(p) for p in getattr(config, "lm_eval_include", None) or []])

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def prepare(self, out_dir: str | os.PathLike) -> None:
        """Export rtune's example tasks into EVAL_DIR/lm_eval_tasks and check every task's data: before any load."""
        if not self.tasks:
            return
        require_lm_eval()
        self.tasks_dir = export_builtin_tasks(Path(out_dir) / "lm_eval_tasks")
        with _quiet_lm_eval():
            self.task_manager = make_task_manager(self.tasks_dir, self.include, self.tasks)
        check_tasks(self.task_manager, self.tasks)

    def info(self) -> dict | None:
        if not self.tasks:
            return None
        return {"tasks": self.tasks, "limit": self.limit, "include": self.include,
                "tasks_dir": str(self.tasks_dir) if self.tasks_dir else None, "version": lm_eval_version()}

    def run(self, entries, config, out_dir: str | os.PathLike, device_type: str) -> list[dict]:
        """Per model (entries: (LoadedModel, fingerprint)): lm-eval, then its result under results/<model>/lm-eval.

        A model whose result was made with the same fingerprint and settings is not evaluated again."""
        from rtune.eval.generation import resolve_dtype
        from rtune.eval.results import SUMMARY, result_dir, write_result

        summaries = []
        for loaded, fp in entries:
            # lm_eval's own CLI loads a checkpoint in its own dtype: so does rtune unless told otherwise.
            asked = getattr(config, "lm_eval_dtype", CHECKPOINT_DTYPE)
            dtype = checkpoint_dtype(loaded.spec) if asked == CHECKPOINT_DTYPE else resolve_dtype(asked, device_type)
            key = {"fingerprint": fp, "tasks": self.tasks, "limit": self.limit, "dtype": dtype,
                   "lm_eval": lm_eval_version(), "include": self.include}
            path = result_dir(out_dir, loaded.label, BENCH_NAME) / SUMMARY
            if path.is_file():
                with contextlib.suppress(ValueError, OSError):
                    old = json.loads(path.read_text(encoding="utf-8"))
                    if (old.get("lm_eval") or {}).get("key") == _json_safe(key):
                        if config.progress:
                            print(f"[eval] {loaded.label}: lm-eval result already there ({path})", flush=True)
                        summaries.append(old)
                        continue
            if config.progress:
                print(f"[eval] {loaded.label}: lm-eval {', '.join(self.tasks)}", flush=True)
            out = run_lm_eval(loaded.spec, self.tasks, template=getattr(loaded, "template", None) or config.template,
                              icl_file=getattr(loaded, "icl_file", None), limit=self.limit,
                              batch_size=config.decoding.batch_size, dtype=dtype, device=device_type,
                              task_manager=self.task_manager, progress=config.progress)
            out["settings"]["include_path"] = self.include
            summary = summary_of(out, loaded.label, loaded.spec, fp, _json_safe(key))
            write_result(out_dir, loaded.label, BENCH_NAME, item_rows(out), summary)
            summaries.append(summary)
        return summaries
