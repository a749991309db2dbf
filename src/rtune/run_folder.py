"""The run folder: what `rtune train` writes, and the one place that knows its layout.

A run folder describes itself, so inference always uses the training template:

    rtune_run.json    method, renderer (template), config, base model, data hash and counts,
                      library versions, times, final loss; "status": "complete" is written last
    config.yaml       the resolved config (copy it to repeat the run)
    tokenizer/        the tokenizer (save_pretrained)
    adapter/          LoRA weights (peft save_pretrained), or model/ for full fine-tuning
    log.jsonl         one row per logged step
    checkpoints/step-NNNNNN/   the newest save_total_limit checkpoints (rtune.train.checkpoint)
    merged/           with config.merge: base + adapter as a standalone model folder

A merged folder (`rtune merge`) is a plain transformers model folder plus `rtune_template.json`,
which carries the run's renderer, so rtune prompts it exactly as the run.

Everything else in rtune asks this module for file names, for reading and writing the run file,
and for loading a run or merged folder with its renderer.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from rtune.errors import RtuneError
from rtune.io import atomic_dir, write_json_atomic, write_text_atomic

RUN_INFO = "rtune_run.json"
RUN_FORMAT_VERSION = 1
TEMPLATE_INFO = "rtune_template.json"  # in merged model folders
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
TOKENIZER_DIR = "tokenizer"
MERGED_DIR = "merged"

log = logging.getLogger("rtune")


def now() -> str:
    """A timestamp for the run file (UTC, ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- what a folder is ------------------------------------------------------------------------------
def is_run_dir(path: str | os.PathLike) -> bool:
    """True for an rtune run folder (it carries rtune_run.json)."""
    return (Path(path) / RUN_INFO).is_file()


def is_merged_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by `rtune merge` (a model folder with rtune_template.json)."""
    return (Path(path) / TEMPLATE_INFO).is_file()


def has_template(path: str | os.PathLike) -> bool:
    """A run or merged folder: it brings the renderer it was trained with."""
    return is_run_dir(path) or is_merged_dir(path)


def check_base_model_spec(spec: str) -> None:
    """A run folder is not a base model: refuse it where a plain model is expected."""
    if is_run_dir(spec):
        raise RtuneError(
            f"{spec} is an rtune run folder ({RUN_INFO}), not a plain model folder: merge it first "
            f"(rtune merge {spec} --out DIR) to train from it, or give it to generate/chat/eval directly"
        )


# -- the run file ----------------------------------------------------------------------------------
def read_run_info(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        raise RtuneError(f"{run_dir} is not an rtune run folder (no {RUN_INFO})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RtuneError(f"{path}: not valid JSON: {e}") from None


def write_run_info(run_dir: str | os.PathLike, info: dict) -> None:
    write_json_atomic(Path(run_dir) / RUN_INFO, info)


def run_is_complete(run_dir: str | os.PathLike) -> bool:
    return is_run_dir(run_dir) and read_run_info(run_dir).get("status") == "complete"


def read_complete_run_info(run_dir: str | os.PathLike, doing: str) -> dict:
    """The run file of a finished run; an unfinished one is an error that says what to do."""
    info = read_run_info(run_dir)
    if info.get("status") != "complete":
        raise RtuneError(f"{run_dir}: training has not finished (status {info.get('status')!r}); {doing}")
    return info


def read_template_info(folder: str | os.PathLike) -> dict:
    """What a merged folder carries: method, renderer, base model, source run, config, dtype."""
    path = Path(folder) / TEMPLATE_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RtuneError(f"{path}: not valid JSON: {e}") from None


def describe_base_model(model_spec: str) -> dict:
    """What a run was trained from, and the spec that loads it again from any working directory."""
    from rtune.models import resolve_model

    ref = resolve_model(model_spec)
    local = ref.kind in ("folder", "gguf")
    path = str(Path(ref.path).resolve()) if local else ref.path
    load = str(Path(path) / ref.gguf_file) if ref.gguf_file else (path if local else ref.spec)
    return {"spec": model_spec, "kind": ref.kind, "path": path, "gguf_file": ref.gguf_file, "load": load}


def weights_dir(run_dir: str | os.PathLike, info: dict) -> Path:
    """adapter/ (LoRA, QLoRA) or model/ (full fine-tuning)."""
    return Path(run_dir) / info["weights"]


# -- writing a run ---------------------------------------------------------------------------------
def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        what = "is a file" if not run_dir.is_dir() else "exists and is not empty"
        raise RtuneError(f"{run_dir} {what}; use --resume to continue that run, or another --out")


def save_tokenizer(tokenizer, renderer, folder: Path) -> None:
    """The tokenizer with the run's template exported as its Jinja `chat_template`, so that plain
    transformers, vLLM and lm-evaluation-harness prompt the model as rtune does."""
    saved = tokenizer.chat_template
    tokenizer.chat_template = renderer.chat_template()
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = saved


def write_run_header(run_dir: Path, info: dict, config_yaml: str, tokenizer, renderer) -> None:
    """config.yaml, the tokenizer and then the run file (its presence means the header is complete)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, config_yaml)
    if not (run_dir / TOKENIZER_DIR).is_dir():
        with atomic_dir(run_dir / TOKENIZER_DIR) as tmp:
            save_tokenizer(tokenizer, renderer, tmp)
    write_run_info(run_dir, info)


def trim_log(run_dir: Path, last_step: int) -> None:
    """Keep the log rows up to the resumed step (later ones will be logged again); drop a torn last line."""
    path = run_dir / LOG_FILE
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            rows.append(line)
    write_text_atomic(path, "".join(r + "\n" for r in rows))


def write_merged_info(folder: Path, info: dict, run_dir: Path, dtype: torch.dtype) -> None:
    """The merged folder's rtune_template.json: the run's renderer and provenance."""
    write_json_atomic(
        folder / TEMPLATE_INFO,
        {
            "format": "rtune-merged",
            "method": info["method"],
            "renderer": info["renderer"],
            "base_model": info["base_model"],
            "source_run": str(run_dir.resolve()),
            "config": info["config"],
            "dtype": str(dtype).replace("torch.", ""),
        },
    )


# -- loading ---------------------------------------------------------------------------------------
def base_quantization(info: dict, doing: str) -> str | None:
    """"nf4" for a QLoRA run on a CUDA machine: its adapter was trained against the 4-bit base.

    Without CUDA there is no NF4: the base loads unquantised, with a warning, and the model differs
    slightly from the one that was trained."""
    if info.get("config", {}).get("peft") != "qlora":
        return None
    if torch.cuda.is_available():
        return "nf4"
    log.warning("this QLoRA run was trained against a 4-bit NF4 base, which needs CUDA: %s an unquantised "
                "base here, so outputs differ slightly from the trained model's", doing)
    return None



def load_tokenizer_and_info(folder: str | os.PathLike) -> tuple:
    """(tokenizer, info) of a run or merged folder; info carries "renderer"."""
    from transformers import AutoTokenizer

    from rtune.models import remote_code_allowed

    folder = Path(folder)
    if is_merged_dir(folder):
        info, tok_dir = read_template_info(folder), folder
    else:
        info, tok_dir = read_run_info(folder), folder / TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=remote_code_allowed()), info


def load_renderer(folder: str | os.PathLike, template: str | None = None):
    """The renderer a run or merged folder was trained with; a conflicting `template` is refused."""
    from rtune.render import Renderer

    tokenizer, info = load_tokenizer_and_info(folder)
    renderer = Renderer.from_dict(info["renderer"], tokenizer)
    check_template(template, renderer, folder)
    return renderer


def check_template(template: str | None, renderer, folder) -> None:
    # A trained model must be prompted in its training format; refuse a conflicting flag loudly.
    if template is not None and template != renderer.template_name:
        raise RtuneError(
            f"{folder} was trained with --template {renderer.template_name}; "
            f"it cannot be prompted with --template {template} (leave the flag out)"
        )


def load_run(run_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device=None):
    """(model, tokenizer, renderer, info) of a finished run folder or of a merged model folder.

    The renderer comes from the folder, never from defaults: inference uses the training template.
    """
    from transformers import AutoModelForCausalLM

    from rtune.models import load_model, quiet_peft, remote_code_allowed
    from rtune.render import Renderer

    run_dir = Path(run_dir)
    if not is_merged_dir(run_dir):
        read_complete_run_info(run_dir, "resume it with --resume")
    tokenizer, info = load_tokenizer_and_info(run_dir)
    if is_merged_dir(run_dir):
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=dtype, trust_remote_code=remote_code_allowed())
    elif info["weights"] == "model":
        model = AutoModelForCausalLM.from_pretrained(weights_dir(run_dir, info), dtype=dtype,
                                                     trust_remote_code=remote_code_allowed())
    else:
        from peft import PeftModel

        quantization = base_quantization(info, "generating and scoring with")
        base = load_model(info["base_model"]["load"], dtype=dtype, device=device, quantization=quantization)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, weights_dir(run_dir, info))
        if quantization:
            device = None  # 4-bit weights are placed when loaded and cannot be moved
    if device is not None:
        model.to(device)
    model.eval()
    renderer = Renderer.from_dict(info["renderer"], tokenizer)
    return model, tokenizer, renderer, info
