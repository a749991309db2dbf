"""The `rtune` command: each subcommand parses flags and calls one plain function of the API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rtune.errors import RtuneError

EXAMPLES = {
    "data prepare": "rtune data prepare --source alpaca-demo --out data/train.jsonl --limit 200 --holdout 12",
    "data mix-refusals": "rtune data mix-refusals data/train.jsonl --refusals builtin --n 100 --seed 0 "
                         "--out data/train+refusals100.jsonl",
    "data refine": "rtune data refine data/train.jsonl --refiner-url http://127.0.0.1:8000/v1 "
                   "--refiner-model Llama-3.1-70B-Instruct --out data/train.refined.jsonl",
    "data inspect": "rtune data inspect data/train.jsonl --model gemma-3-270m --method rt --index 0",
    "train": "rtune train --model gemma-3-270m --data data/train.jsonl --method rt --out runs/rt --config cpu",
    "merge": "rtune merge runs/rt --out models/rt-merged",
    "generate": "rtune generate runs/rt --prompts data/train.heldout.jsonl --out gens/rt.jsonl",
    "chat": "rtune chat runs/rt",
    "demo": "rtune demo --out rtune-demo",
    "eval": "rtune eval gemma-3-270m runs/rt runs/it --names base,rt,it --bench advbench,data/train.heldout.jsonl "
            "--limit 100 --out evals/demo",
    "model fetch": "rtune model fetch gemma-3-270m",
    "report": "rtune report evals/demo --out reports/demo",
    "experiment": "rtune experiment examples/cpu-grid.yaml --out experiments/cpu-grid",
    "serve": "rtune serve base=gemma-3-270m urial=gemma-3-270m+urial-r rt=runs/rt it=runs/it --port 8000",
    "rate": "rtune rate evals/demo --port 8000",
}


def _parser(sub, name: str, help: str, description: str = "") -> argparse.ArgumentParser:
    return sub.add_parser(
        name.split()[-1],
        help=help,
        description=(description or help) + f"\n\nexample:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# -- data ---------------------------------------------------------------------------------------
def cmd_data_prepare(a) -> None:
    from rtune.data import prepare

    fields = {
        k: v
        for k, v in {
            "instruction_field": a.instruction_field,
            "input_field": a.input_field,
            "response_field": a.response_field,
            "id_field": a.id_field,
        }.items()
        if v is not None
    }
    summary = prepare(a.source, a.out, limit=a.limit, seed=a.seed, holdout=a.holdout, strict=a.strict,
                      max_response_chars=a.max_response_chars, **fields)
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def cmd_data_mix_refusals(a) -> None:
    from rtune.data.refusals import mix_refusals_file

    s = mix_refusals_file(a.data, a.out, a.refusals, a.n, seed=a.seed, filter=a.filter, method=a.method)
    if s["sampled"]:
        print(f"{s['refusals']}: {s['kept']} refusals, {s['after_filter']} after --filter {s['filter']}, "
              f"{s['sampled']} sampled (seed {s['seed']}) and appended to {s['training']} training records",
              file=sys.stderr)
    print(json.dumps(s, indent=2, ensure_ascii=False))


def cmd_data_refine(a) -> None:
    from rtune.data.refine import RefineConfig, refine_file

    config = RefineConfig(url=a.refiner_url, model=a.refiner_model, local=a.refiner, template=a.refiner_template,
                          max_tokens=a.refiner_max_tokens, concurrency=a.refiner_concurrency,
                          timeout=a.refiner_timeout)
    s = refine_file(a.data, a.out, config)
    print(f"refined {s['records']} records: {s['rewritten']} rewritten, {s['no_marker']} without the marker, "
          f"{s['cut']} cut at the token limit, {s['empty']} empty, {s['failed']} failed (kept as they were); "
          f"extraction rate {s['extraction_rate']:.1%}; mean length {s['mean_chars_before']:.0f} -> "
          f"{s['mean_chars_after']:.0f} characters; {s['asked']} asked, {s['from_cache']} from the cache",
          file=sys.stderr)
    print(json.dumps(s, indent=2, ensure_ascii=False))


def cmd_data_inspect(a) -> None:
    from rtune.data import read_records
    from rtune.infer.load import load_renderer
    from rtune.render.inspect import describe, visualize

    records = read_records(a.file)
    if not 0 <= a.index < len(records):
        raise RtuneError(f"{a.file}: --index {a.index} is out of range (the file has {len(records)} records)")
    renderer = load_renderer(a.model, a.template)
    seq = renderer.render_training(records[a.index], a.method, a.max_length)
    if seq is None:
        raise RtuneError(f"{a.file}: record {a.index} has nothing left to train at --max-length {a.max_length}")
    # With --max-length: what truncation does to the whole file, per method (the same responses are kept).
    counts = None
    if a.max_length is not None:
        from rtune.render import METHODS

        counts = {m: renderer.render_dataset(records, m, a.max_length)[1].as_dict() for m in METHODS
                  if m == a.method or not (m == "it" and not all(r["instruction"].strip() for r in records))}
    if a.json:
        print(json.dumps({**describe(renderer, seq), **({"file_counts": counts} if counts else {})},
                         ensure_ascii=False))
    else:
        color = sys.stdout.isatty() if a.color == "auto" else a.color == "always"
        print(visualize(renderer, seq, color=color))
        print(f"\n[{a.method}] {len(seq.input_ids)} tokens, {seq.num_trained} trained (highlighted)", file=sys.stderr)
        for method, c in (counts or {}).items():
            print(f"[{method}] {a.file} at --max-length {a.max_length}: {c['rendered']} of {c['records']} records "
                  f"trained, {c['truncated']} responses cut, {c['instruction_truncated']} instructions cut, "
                  f"{c['dropped_nothing_trained']} dropped", file=sys.stderr)


# -- training -----------------------------------------------------------------------------------
def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--lr, --lora-target, --packing/--no-packing, ...), help from the field.

    Values stay strings here: rtune.train.config coerces and checks them like a YAML file's, so a bad
    value gets the same message from a flag as from a config file."""
    from rtune.train.config import config_fields

    group = p.add_argument_group("config fields (override --config)")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.help} (default {f.default})" if f.help else f"default {f.default}"
        if f.type_text == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.metavar, help=help)


def cmd_train(a) -> None:
    from rtune.train.config import config_fields, load_config
    from rtune.train.recipe import train

    overrides = {f.name: getattr(a, f.name) for f in config_fields() if getattr(a, f.name) is not None}
    config = load_config(a.config, overrides)
    result = train(a.model, a.data, a.out, config, resume=a.resume, progress=not a.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary, not one per process
        print(json.dumps(result, indent=2, default=str))


def cmd_merge(a) -> None:
    from rtune.fingerprint import model_fingerprint
    from rtune.infer.load import load_renderer
    from rtune.infer.merge import merge_run

    out = merge_run(a.run, a.out)
    print(f"merged model written to {out}")
    # The id rtune serve reports for this folder; for another server of it: rtune eval --gen-fingerprint ID.
    print(f"fingerprint {model_fingerprint(str(out), load_renderer(str(out)))['id']}")


# -- inference ----------------------------------------------------------------------------------
def _add_icl_flags(p) -> None:
    from rtune.render.templates import ICL_TEMPLATES  # light: no torch, no transformers

    p.add_argument("--icl", default=None, choices=ICL_TEMPLATES,
                   help="prompt a plain (untrained) model in context, without a chat template: urial (query-answer "
                        "demonstrations), urial-r (their answers alone) or zero-shot (the query frame alone)")
    p.add_argument("--icl-file", default=None, metavar="FILE",
                   help="the demonstrations for --icl urial / urial-r: a JSON list of {\"query\", \"answer\"} "
                        "(default: rtune's own three)")


def _plain_format(a) -> tuple[str | None, str | None]:
    """(template, icl_file) for a plain model, from --template, --icl and --icl-file."""
    icl, icl_file = getattr(a, "icl", None), getattr(a, "icl_file", None)
    if icl_file and not icl:
        raise RtuneError("--icl-file FILE goes with --icl urial or --icl urial-r")
    if icl and a.template:
        raise RtuneError(f"--icl {icl} and --template {a.template} both choose the prompt format: give one of them")
    return icl or a.template, icl_file


def _add_rules_flags(p) -> None:
    group = p.add_argument_group("rule-based adapter (Hewitt et al. 2024; plain, untrained models only)")
    group.add_argument("--rules", default=None, metavar="eos,uniform,diversity",
                       help="add hand-written rules to the base model's log-probabilities: eos (the end token's bias "
                            "grows over the reply), uniform (fixed scores on a few chatty and structure tokens), "
                            "diversity (a penalty on tokens already in the instruction or the reply)")
    group.add_argument("--rules-eos-max", type=float, default=None, help="the end token's final bias (default 15)")
    group.add_argument("--rules-eos-tokens", type=int, default=None,
                       help="reply tokens over which it grows to that, then stays (default 250)")
    group.add_argument("--rules-uniform-scale", type=float, default=None, help="multiplies the uniform scores (default 1)")
    group.add_argument("--rules-diversity", type=float, default=None, help="the diversity penalty (default 1.5)")
    group.add_argument("--rules-show", action="store_true", help="print the rules and the token ids they found (stderr)")


def _rules_config(a):
    """RulesConfig from --rules and its strengths; None without --rules."""
    strengths = {"eos_max": a.rules_eos_max, "eos_tokens": a.rules_eos_tokens,
                 "uniform_scale": a.rules_uniform_scale, "diversity_penalty": a.rules_diversity}
    if not a.rules:
        if any(v is not None for v in strengths.values()) or a.rules_show:
            raise RtuneError("the --rules-* options go with --rules eos,uniform,diversity (or a subset)")
        return None
    from rtune.infer.rules import RulesConfig

    return RulesConfig.parse(a.rules, **strengths)


def _show_rules(specs, template, icl_file, rules) -> None:
    """--rules-show: each model's token sets, from its tokenizer alone (before any weights load)."""
    from rtune.infer.load import load_renderer
    from rtune.infer.rules import RuleModel, check_untrained

    for spec in specs:
        check_untrained(spec, rules)
        renderer = load_renderer(spec, template, icl_file=icl_file)
        print(f"{spec}: {RuleModel(renderer.tokenizer, renderer, rules).describe()}", file=sys.stderr)


def _add_generation_flags(p) -> None:
    p.add_argument("--template", default=None, help="for a plain model: tulu (default) or model; run folders use their own")
    _add_icl_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 512")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stop", action="append", default=None, metavar="STRING",
        help="also end a reply at this text, which is cut off (repeatable; taken literally: in bash, $'\\n\\n' "
        "is a blank line); the template's next-turn headers (tulu: <|user|>, <|assistant|>) always stop it",
    )  # fmt: skip
    _add_rules_flags(p)


def _generation_config(a):
    from rtune.infer.generate import GenerationConfig

    values = {
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "repetition_penalty": a.repetition_penalty,
        "seed": a.seed,
        "batch_size": getattr(a, "batch_size", None),
    }
    config = GenerationConfig(**{k: v for k, v in values.items() if v is not None})
    config.do_sample = a.sample
    config.stop = list(a.stop or [])
    config.rules = _rules_config(a)
    return config


def _add_endpoint_flags(p, scoring: bool) -> None:
    group = p.add_argument_group(
        "generation on running servers (any OpenAI-compatible /v1/completions: rtune serve, vllm serve, SGLang, "
        "TGI, llama.cpp; MODEL still gives the tokenizer and template; API key from $RTUNE_GEN_API_KEY or "
        "$OPENAI_API_KEY)")
    group.add_argument("--gen-url", default=None, metavar="URL[,URL...]",
                       help="generate there instead of here; several URLs are replicas of one model (requests spread "
                            "over them; a replica that dies has its requests retried on the others)")
    group.add_argument("--gen-model", default=None, metavar="NAME", help="the served model (default: the only one listed)")
    group.add_argument("--gen-prompt", default="ids", choices=("ids", "text"),
                       help="ids (default): rtune-rendered token ids; text: the rendered string, for servers that "
                            "take text only (special-token spellings in content can then differ)")
    group.add_argument("--gen-fingerprint", default=None, metavar="FP",
                       help="what identifies the served weights (the cache key), required for servers other than "
                            "rtune serve (which reports its own), e.g. the id `rtune merge` prints")
    group.add_argument("--gen-concurrency", type=int, default=32, help="requests in flight per replica (default 32)")
    group.add_argument("--gen-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    if scoring:
        group.add_argument("--score-local", action="store_true",
                           help="also load MODEL here for ranking, NLL and shift (without it they are reported as "
                                "not computed); also with --backend vllm")


def _endpoint_settings(a) -> dict | None:
    """The --gen-* flags as keyword arguments; None without --gen-url."""
    if not a.gen_url:
        given = [f for f, v in (("--gen-model", a.gen_model), ("--gen-fingerprint", a.gen_fingerprint),
                                ("--gen-prompt text", a.gen_prompt != "ids")) if v]
        if given:
            raise RtuneError(f"{', '.join(given)} go with --gen-url URL[,URL...]")
        return None
    from rtune.infer.backends.endpoint import split_urls

    if a.gen_concurrency < 1 or a.gen_timeout <= 0:
        raise RtuneError("--gen-concurrency must be >= 1 and --gen-timeout > 0")
    return {"urls": split_urls(a.gen_url), "model": a.gen_model, "fingerprint": a.gen_fingerprint,
            "prompt": a.gen_prompt, "concurrency": a.gen_concurrency, "timeout": a.gen_timeout}


def cmd_generate(a) -> None:
    from rtune.infer.answer import generate_file

    template, icl_file = _plain_format(a)
    config = _generation_config(a)
    if a.rules_show:
        _show_rules([a.model], template, icl_file, config.rules)
    summary = generate_file(a.model, a.prompts, a.out, config, template=template,
                            **({"icl_file": icl_file} if icl_file else {}), endpoint=_endpoint_settings(a))
    print(json.dumps(summary, indent=2))


def cmd_chat(a) -> None:
    from rtune.infer.chat import chat

    template, icl_file = _plain_format(a)
    config = _generation_config(a)
    if a.rules_show:
        _show_rules([a.model], template, icl_file, config.rules)
    chat(a.model, template=template, config=config, **({"icl_file": icl_file} if icl_file else {}))


def cmd_serve(a) -> None:
    from rtune.serve.server import api_key_from_env, serve

    if a.rules:
        raise RtuneError("--rules is not available on serve yet (its engine has no per-request logits processor); "
                         "use rtune generate, chat or eval with --rules")
    template, icl_file = _plain_format(a)
    if not a.models and not a.endpoint and not a.rate:
        raise RtuneError("serve what? give MODEL_OR_RUN (or NAME=MODEL_OR_RUN ...), --endpoint NAME=URL "
                         "or --rate EVAL_DIR")
    models = a.models[0] if len(a.models) == 1 else a.models
    extra = {"endpoints": a.endpoint} if a.endpoint else {}
    if a.rate:
        extra["rate_dir"] = a.rate
    serve(models, host=a.host, port=a.port, api_key=api_key_from_env(a.api_key), template=template,
          **({"icl_file": icl_file} if icl_file else {}), model_name=a.model_name, dtype=a.dtype, max_batch_size=a.max_batch_size, batch_wait_ms=a.batch_wait_ms,
          max_queue=a.max_queue, max_body_bytes=a.max_body_bytes, max_tokens=a.max_tokens,
          max_tokens_limit=a.max_tokens_limit, max_prompt_tokens=a.max_prompt_tokens, max_stop_chars=a.max_stop_chars,
          **extra)


def cmd_rate(a) -> None:
    from rtune.serve.server import api_key_from_env, serve

    serve([], host=a.host, port=a.port, api_key=api_key_from_env(a.api_key), rate_dir=a.eval_dir)


def cmd_model_fetch(a) -> None:
    from rtune.models.builtin import builtin_model_dir

    print(builtin_model_dir(a.name))


def cmd_eval(a) -> None:
    from rtune.eval.generation import EvalDecoding
    from rtune.eval.run import EvalConfig, run_eval

    from rtune.eval.run import EndpointConfig

    endpoint = _endpoint_settings(a)
    if endpoint and a.backend != "hf":
        raise RtuneError(f"--gen-url generates on the servers: leave --backend {a.backend} out")
    if a.score_local and not endpoint and a.backend == "hf":
        raise RtuneError("--score-local goes with --gen-url or --backend vllm (the HF backend always scores here)")
    decoding = EvalDecoding(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, dtype=a.dtype,
                            stop=list(a.stop or []), backend="endpoint" if endpoint else a.backend)
    decoding.rules = _rules_config(a)
    template, icl_file = _plain_format(a)
    if a.rules_show:
        _show_rules(a.models, template, icl_file, decoding.rules)
    config = EvalConfig(benches=[b for b in a.bench.split(",") if b], limit=a.limit, seed=a.seed, decoding=decoding,
                        template=template, icl_file=icl_file, ranking_k=a.ranking_k, shift=not a.no_shift,
                        relevance=not a.no_relevance)
    config.lm_eval_tasks = [t for t in (a.lm_eval_tasks or "").split(",") if t]
    config.lm_eval_include = list(a.lm_eval_include or [])
    config.lm_eval_dtype = a.lm_eval_dtype
    config.endpoint = EndpointConfig(**endpoint) if endpoint else None
    config.score_local = a.score_local
    if not config.benches and not config.lm_eval_tasks:
        raise RtuneError("nothing to evaluate: give --bench NAME[,NAME] and/or --lm-eval-tasks TASK[,TASK]")
    if a.judge_url or a.judge_model:
        from rtune.eval.judging import KINDS, JudgeConfig

        if not (a.judge_url and a.judge_model):
            raise RtuneError("--judge-url and --judge-model go together")
        price = tuple(float(x) for x in a.judge_price.split(",")) if a.judge_price else None
        if price is not None and len(price) != 2:
            raise RtuneError("--judge-price takes INPUT,OUTPUT dollars per million tokens, e.g. 2.5,10")
        config.judge = JudgeConfig(a.judge_url, a.judge_model, kinds=a.judge.split(",") if a.judge else list(KINDS),
                                   reference=a.reference, concurrency=a.judge_concurrency, timeout=a.judge_timeout,
                                   price_per_million=price)
    names = [n for n in a.names.split(",")] if a.names else None
    summaries = run_eval(a.models, config, a.out, labels=names)
    print(f"{len(summaries)} results in {a.out}/results; render them with: rtune report {a.out} --out REPORT_DIR")


def cmd_demo(a) -> None:
    from rtune.demo import DemoConfig, run_demo

    config = DemoConfig(out_dir=a.out)
    for field in ("train_size", "eval_size", "epochs", "lr", "max_new_tokens"):
        if getattr(a, field) is not None:
            setattr(config, field, getattr(a, field))
    run_demo(config)


def cmd_report(a) -> None:
    from pathlib import Path

    from rtune.report import build_report

    experiments = [d for d in a.eval_dirs if (Path(d) / "cells.json").is_file()]
    if experiments:  # an experiment folder: its reproduction report
        from rtune.experiment.report import build_reproduction_report

        if len(a.eval_dirs) != 1:
            raise RtuneError("an experiment folder is reported alone: rtune report EXPERIMENT_DIR --out DIR")
        path = build_reproduction_report(experiments[0], a.out, paper=a.paper)
    else:
        if a.paper:
            raise RtuneError("--paper goes with an experiment folder (rtune experiment's output)")
        path = build_report(a.eval_dirs, a.out)
    print(path)
    print(path.with_suffix(".html"))


def cmd_experiment(a) -> None:
    from pathlib import Path

    from rtune.experiment import run_experiment

    out = a.out or str(Path("experiments") / Path(a.grid).stem)
    run_experiment(a.grid, out, executor=a.executor, paper=a.paper, dry_run=a.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtune",
        description="Response Tuning: align a base language model by training on responses alone.",
    )
    from rtune import __version__

    parser.add_argument("--version", action="version", version=f"rtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let models run their own Python code from the hub or their folder (off by default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare, refine, mix and inspect training data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = _parser(data_sub, "data prepare", "normalise a dataset into rtune JSONL records",
                "Write {id, instruction, response, source} records. SRC: alpaca, dolly, lima (hub), "
                "alpaca-demo (offline), or a .json/.jsonl/.csv/.parquet file.")
    p.add_argument("--source", required=True, metavar="SRC")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--limit", type=int, default=None, help="keep N records (deterministic for --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=0, help="also write K held-out records to FILE.heldout.jsonl")
    p.add_argument("--strict", action="store_true", help="empty responses are errors instead of skipped")
    p.add_argument("--max-response-chars", type=int, default=None,
                   help="keep only training responses up to N characters (held-out records are drawn first)")
    p.add_argument("--instruction-field", default=None)
    p.add_argument("--input-field", default=None)
    p.add_argument("--response-field", default=None)
    p.add_argument("--id-field", default=None)
    p.set_defaults(func=cmd_data_prepare)

    p = _parser(data_sub, "data mix-refusals", "append N refusal examples to prepared training records",
                "Sample N refusals (seeded) and append them to DATA, written to --out. SRC: safety-tuned-llamas "
                "(the paper's, downloaded from GitHub), builtin (rtune's own, offline), or a .jsonl/.json/.csv "
                "file with a response field (and an instruction field for --method it). Each record keeps its "
                "origin in 'source'.")
    p.add_argument("data", metavar="DATA", help="rtune JSONL from `rtune data prepare`")
    p.add_argument("--refusals", required=True, metavar="SRC")
    p.add_argument("--n", type=int, required=True, help="refusals to append (the paper: 100, 200, 500)")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (the paper: 0)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--filter", choices=["paper", "none"], default=None,
                   help="paper: keep refusals whose response has the word 'ai' or 'sorry' (default for "
                        "safety-tuned-llamas and builtin); none: keep all (default for a file)")
    p.add_argument("--method", choices=["rt", "it", "rt-empty-user"], default="rt",
                   help="the method the mix is for: it needs an instruction with every refusal (default rt)")
    p.set_defaults(func=cmd_data_mix_refusals)

    p = _parser(data_sub, "data refine", "rewrite responses with a strong instruct model (clarity, structure, tone)",
                "Each response is shown with its request to the refiner, which reviews it and writes 'Refined "
                "response:' and the improved text; the original stays in 'source_response'. Any OpenAI-compatible "
                "endpoint (key from RTUNE_REFINER_API_KEY or OPENAI_API_KEY) or a local model. Resumable: replies "
                "are cached in OUT.refine-cache.jsonl as they arrive.")
    p.add_argument("data", metavar="DATA", help="rtune JSONL from `rtune data prepare`")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--refiner-url", default=None, metavar="URL", help="an OpenAI-compatible endpoint (.../v1)")
    p.add_argument("--refiner-model", default=None, metavar="NAME", help="the model the endpoint serves")
    p.add_argument("--refiner", default=None, metavar="MODEL_OR_RUN", help="or a local model (rtune's generation)")
    p.add_argument("--refiner-template", default=None, help="the local model's template (default: its own chat "
                                                           "template)")
    p.add_argument("--refiner-max-tokens", type=int, default=2048)
    p.add_argument("--refiner-concurrency", type=int, default=8)
    p.add_argument("--refiner-timeout", type=float, default=300.0, help="seconds per request")
    p.set_defaults(func=cmd_data_refine)

    p = _parser(data_sub, "data inspect", "show a rendered record with its trained tokens highlighted")
    p.add_argument("file")
    p.add_argument("--model", required=True, help="model spec or run folder (for its tokenizer and template)")
    p.add_argument("--method", default="rt", help="rt | it | rt-empty-user")
    p.add_argument("--template", default=None, help="tulu (default) | model")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print input_ids, labels and trained_text as JSON")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=cmd_data_inspect)

    p = _parser(sub, "train", "fine-tune a base model with RT or IT (LoRA by default)",
                "Settings come from --config (a preset: paper, cpu; or a YAML file), then the flags.")
    p.add_argument("--model", required=True, help="hub id, local folder, .gguf file, or gemma-3-270m")
    p.add_argument("--data", required=True, help="rtune JSONL from `rtune data prepare`")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", default="paper", help="paper (default) | cpu | FILE.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = _parser(sub, "merge", "merge a LoRA run into a standalone model folder")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = _parser(sub, "generate", "answer prompts with a model or run (batched, greedy by default)")
    p.add_argument("model", metavar="MODEL_OR_RUN")
    p.add_argument("--prompts", required=True, help="JSONL/JSON records with instruction (and id), or .txt")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=None)
    _add_generation_flags(p)
    _add_endpoint_flags(p, scoring=False)
    p.set_defaults(func=cmd_generate)

    p = _parser(sub, "chat", "multi-turn chat in the terminal (/reset, /exit)")
    p.add_argument("model", metavar="MODEL_OR_RUN")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = _parser(sub, "serve", "an OpenAI-compatible server and a side-by-side chat page (several models; batched)",
                "Serve /v1/models, /v1/chat/completions (rendered with each model's own template) and "
                "/v1/completions on HOST:PORT until Ctrl-C or SIGTERM, and a chat page at / that sends one "
                "prompt to 2-4 models side by side. Requests share one running batch per loaded model "
                "(continuous batching: they join and leave it between steps); a full queue answers 429, a "
                "request over the limits 400. Loopback only by default.")
    p.add_argument("models", nargs="*", metavar="[NAME=]MODEL_OR_RUN[+FORMAT]",
                   help="one model, or several each named: base=gemma-3-270m rt=runs/rt it=runs/it; +urial, "
                        "+urial-r or +zero-shot prompts a plain model in context (urial=gemma-3-270m+urial-r "
                        "shares the base's weights), +tulu or +model chooses its template")
    p.add_argument("--endpoint", action="append", default=None, metavar="NAME=URL[#MODEL]",
                   help="a model behind another OpenAI-compatible server, proxied for the page (repeatable); "
                        "its API key from $RTUNE_ENDPOINT_KEY_<NAME>")
    p.add_argument("--rate", default=None, metavar="EVAL_DIR",
                   help="blind pairwise rating of this rtune eval folder at /rate (ratings in EVAL_DIR/human/)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (logged)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: the RTUNE_API_KEY environment variable)")
    p.add_argument("--template", default=None, help="for a plain model: tulu (default) or model; run folders use their own")
    _add_icl_flags(p)
    p.add_argument("--rules", default=None, help="not available on serve yet (generate, chat and eval have it)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, else fp32) | fp32 | bf16 | fp16")
    p.add_argument("--max-tokens", type=int, default=512, help="a chat reply's length when a request sets none")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the longest reply any request may ask for (max_tokens; default 4096)")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longer prompts get 400 (default 8192)")
    p.add_argument("--max-stop-chars", type=int, default=4096,
                   help="a request's stop strings together, in characters (default 4096)")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows of the running batch (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long an idle server waits for more requests to start with (default 10)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 400 (default 1 MiB)")
    p.set_defaults(func=cmd_serve)

    p = _parser(sub, "rate", "blind human rating of an rtune eval folder in the browser (the rating page alone)",
                "Serve the rating page at http://HOST:PORT/rate: two models' answers to the same item, sides "
                "drawn at random and names hidden; the rater picks A, B or a tie and marks each answer "
                "acceptable or not. Ratings are appended to EVAL_DIR/human/<rater>.jsonl; rtune report shows "
                "them. Loopback only by default.")
    p.add_argument("eval_dir", metavar="EVAL_DIR")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (logged)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: the RTUNE_API_KEY environment variable)")
    p.set_defaults(func=cmd_rate)

    model = sub.add_parser("model", help="built-in offline models")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    p = _parser(model_sub, "model fetch", "convert a built-in model once into the cache and print its folder")
    p.add_argument("name", help="gemma-3-270m | smollm2-135m-instruct")
    p.set_defaults(func=cmd_model_fetch)

    p = _parser(sub, "eval", "evaluate models side by side on benchmarks (cached, resumable)",
                "Generate with each model's own template (greedy), cache every generation, and write per-item "
                "rows and summaries with bootstrap 95% intervals under OUT/results. Benchmarks: "
                "alpacaeval, justeval, advbench, harmbench, strongreject, malicious-instruct, xstest, or a "
                "local .jsonl/.json/.csv prompts file (an instruction field; a response field makes it a "
                "ranking set, e.g. the held-out file of `rtune data prepare --holdout`).")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_RUN")
    p.add_argument("--bench", default="",
                   help="NAME[:N][,NAME[:N]...]: benchmark names or prompt files, N a per-benchmark sample size; "
                        "core[:N]: the paper's core capabilities through lm-evaluation-harness (MMLU, OpenBookQA, "
                        "HellaSwag, ARC, PIQA 0-shot, GSM8K CoT 8-shot; hub datasets), N documents per task")
    p.add_argument("--lm-eval-tasks", default=None, metavar="TASK[,TASK]",
                   help="any lm-evaluation-harness tasks, run with each model's own chat template (extra 'lmeval'); "
                        "offline examples: rtune_demo_mc, rtune_demo_gen")
    p.add_argument("--lm-eval-include", action="append", default=None, metavar="DIR",
                   help="a folder of local lm-eval task YAMLs (repeatable)")
    p.add_argument("--lm-eval-dtype", default="checkpoint",
                   choices=("checkpoint", "auto", "fp32", "bf16", "fp16"),
                   help="dtype of the lm-eval tasks; default: the checkpoint's own, as lm_eval's CLI loads it "
                        "(auto: rtune's bf16-where-native, as --dtype)")
    p.add_argument("--out", required=True, metavar="EVAL_DIR")
    p.add_argument("--names", default=None, help="labels for the models, comma-separated (default: folder names)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of N items per benchmark")
    p.add_argument("--seed", type=int, default=0, help="the sample, ranking distractors and bootstrap seed")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware has it natively) | fp32 | bf16")
    p.add_argument("--stop", action="append", default=None, metavar="STRING", help="an extra stop string")
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                   help='hf (default) | vllm (CUDA, pip install -e ".[vllm]"; not run in CI, see docs/evaluation.md)')
    p.add_argument("--template", default=None, help="for plain models: tulu (default) | model")
    _add_icl_flags(p)  # the labels say the format: gemma-3-270m+urial-r
    _add_rules_flags(p)  # ... and the rules: gemma-3-270m+urial-r+rules
    p.add_argument("--ranking-k", type=int, default=7, help="other responses each reference is ranked against")
    p.add_argument("--no-shift", action="store_true", help="skip the distribution shift against the untuned base")
    p.add_argument("--no-relevance", action="store_true", help="skip MiniLM relevance")
    _add_endpoint_flags(p, scoring=True)
    judges = p.add_argument_group("LLM judges (any OpenAI-compatible endpoint; API key from $RTUNE_JUDGE_API_KEY "
                                  "or $OPENAI_API_KEY)")
    judges.add_argument("--judge-url", default=None, help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    judges.add_argument("--judge-model", default=None, help="the judge model's name at that endpoint")
    judges.add_argument("--judge", default=None, help="pairwise,aspects,refusal (default all three)")
    judges.add_argument("--reference", default=None,
                        help="pairwise: an evaluated model's name (e.g. it) or a JSONL file of {id, output}")
    judges.add_argument("--judge-concurrency", type=int, default=8)
    judges.add_argument("--judge-timeout", type=float, default=120.0,
                        help="seconds per judge request (raise it for a slow local judge)")
    judges.add_argument("--judge-price", default=None, metavar="IN,OUT",
                        help="dollars per million input,output tokens, for the cost counter")
    p.set_defaults(func=cmd_eval)

    p = _parser(sub, "demo", "RT vs IT vs base on the offline default (Gemma 3 270M + alpaca-demo)")
    p.add_argument("--out", default="rtune-demo")
    from rtune.demo import DemoConfig  # light: the defaults shown in --help are the ones used

    demo_defaults = DemoConfig()
    p.add_argument("--train-size", type=int, default=None,
                   help=f"training responses shared by RT and IT (default {demo_defaults.train_size})")
    p.add_argument("--eval-size", type=int, default=None,
                   help=f"held-out instructions every model answers (default {demo_defaults.eval_size})")
    p.add_argument("--epochs", type=float, default=None, help=f"default {demo_defaults.epochs}")
    p.add_argument("--lr", type=float, default=None, help=f"default {demo_defaults.lr:g}, for RT and IT alike")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"default {demo_defaults.max_new_tokens}")
    p.set_defaults(func=cmd_demo)

    p = _parser(sub, "report", "tables and plots of `rtune eval` results (Markdown, standalone HTML, PNG)",
                "Write report.md, report.html and PNG plots into --out. Several EVAL_DIRs merge into one report.")
    p.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--paper", action="store_true",
                   help="an experiment folder: the paper's figures beside ours where a cell matches")
    p.set_defaults(func=cmd_report)

    p = _parser(sub, "experiment", "run a grid of models x data x methods x refusal mixtures x refinement",
                "Every cell of GRID.yaml is prepared, trained and evaluated (each stage keyed by its inputs and "
                "skipped when done, so a killed run resumes), then RT vs IT and refined vs original are compared "
                "and a reproduction report is written to OUT/report.")
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--out", default=None, metavar="DIR", help="default: experiments/<grid file name>")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: cells one after another here; slurm: one SLURM job per cell (submitit)")
    p.add_argument("--paper", action="store_true", help="the paper's figures beside ours in the report")
    p.add_argument("--dry-run", action="store_true", help="print the cells, what is done and the estimated cost")
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the HTTP clients log every request at INFO: a judge run would drown in them
        for name in ("httpx", "httpx2", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.trust_remote_code:  # read by every model and tokenizer load (rtune.models.remote_code_allowed)
        os.environ["RTUNE_TRUST_REMOTE_CODE"] = "1"
    try:
        args.func(args)
    except RtuneError as e:
        print(f"rtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
