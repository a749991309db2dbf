"""Answer a file of prompts (`rtune generate`): with the model here (rtune.infer.generate), or on
running OpenAI-compatible servers (rtune.infer.backends.endpoint). Rows come back in input order and
the output file is written atomically."""

from __future__ import annotations

import time
from pathlib import Path

from rtune.data import read_prompts
from rtune.infer.generate import ENDED, FINISH_REASONS, GenerationConfig, generate_ids
from rtune.infer.load import load_for_inference
from rtune.io import write_jsonl_atomic


def generate_file(
    model_or_run: str,
    prompts_path: str,
    out_path: str,
    config: GenerationConfig | None = None,
    template: str | None = None,
    method_label: str | None = None,
    *,
    icl_file: str | None = None,
    endpoint: dict | None = None,
) -> dict:
    """Answer every prompt in a file and write JSONL {"id", "instruction", "output", "finished",
    "finish_reason", "num_tokens", "generator"} in input order, atomically. Returns a summary.

    endpoint: generate on running servers instead (rtune.infer.backends.endpoint.EndpointBackend's
    arguments: urls, model, fingerprint, prompt, concurrency, timeout); model_or_run then gives the
    tokenizer and template only."""
    config = (config or GenerationConfig()).check()
    from rtune.infer.rules import check_untrained

    check_untrained(model_or_run, config.rules)
    # Read the prompts before loading the model: a bad file fails in a second, not after a load.
    prompts = read_prompts(prompts_path)
    backend = None
    if endpoint is not None:
        from rtune.infer.backends import refuse_rules
        from rtune.infer.backends.endpoint import EndpointBackend
        from rtune.infer.load import load_renderer

        refuse_rules(config, "an endpoint")
        renderer = load_renderer(model_or_run, template, icl_file=icl_file)
        backend = EndpointBackend(endpoint["urls"], renderer, **{k: v for k, v in endpoint.items() if k != "urls"})
        backend.connect()  # replicas with different weights stop here, before any prompt is sent
        model = tokenizer = None
    else:
        model, tokenizer, renderer = load_for_inference(model_or_run, template=template, icl_file=icl_file)
    generator = method_label or Path(str(model_or_run).rstrip("/")).name
    if not method_label and not getattr(renderer, "trainable", True):
        generator += f"+{renderer.template_name}"  # e.g. gemma-3-270m+urial-r: the base in context
    if not method_label and config.rules is not None:
        generator += f"+{config.rules.label}"  # e.g. gemma-3-270m+urial-r+rules

    start = time.perf_counter()
    rows = answer_prompts(model, tokenizer, renderer, prompts, config, generator, progress=True, backend=backend)
    seconds = time.perf_counter() - start
    write_jsonl_atomic(out_path, rows)
    n = len(rows)
    reasons = FINISH_REASONS + ((ENDED,) if any(r["finish_reason"] == ENDED for r in rows) else ())
    summary = {
        "out": str(out_path),
        "count": n,
        "finished_share": sum(r["finished"] for r in rows) / n,
        "finish_reasons": {reason: sum(r["finish_reason"] == reason for r in rows) for reason in reasons},
        "mean_tokens": sum(r["num_tokens"] for r in rows) / n,
        "seconds": round(seconds, 3),
        "prompts_per_s": round(n / seconds, 3) if seconds > 0 else None,
    }
    if backend is not None:
        summary["generation_backend"] = backend.info()
    return summary


def answer_prompts(model, tokenizer, renderer, prompts: list[dict], config: GenerationConfig, generator: str,
                   *, progress: bool = False, backend=None) -> list[dict]:
    """Answer read_prompts() records: {"id", "instruction", "output", "finished", "finish_reason",
    "num_tokens", "generator"} each, in input order (the rows generate_file writes). finished is
    finish_reason != "length" ("eos": a stop id, "stop": a stop string, "length": max_new_tokens;
    "ended": a server's reply that stopped at one of the first two, it does not say which).
    backend: another generation backend (rtune.infer.backends) instead of `model`."""
    ids = [renderer.render_prompt(p["instruction"]) for p in prompts]
    if backend is None:
        gens = generate_ids(model, tokenizer, renderer, ids, config, progress=progress)
    else:
        found: dict = {}
        backend.generate([{str(i): p for i, p in enumerate(ids)}], config, found.update, progress=progress)
        gens = [found[str(i)] for i in range(len(ids))]
    return [
        {
            "id": p["id"],
            "instruction": p["instruction"],
            "output": g.text,
            "finished": g.finished,
            "finish_reason": g.finish_reason,
            "num_tokens": g.num_tokens,
            "generator": generator,
        }
        for p, g in zip(prompts, gens)
    ]
