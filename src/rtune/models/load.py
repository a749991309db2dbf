"""What `--model` accepts, and loading tokenizers and models from it.

A model spec is one of, checked in this order:
    a built-in name      gemma-3-270m, smollm2-135m-instruct (rtune.models.builtin; converted once, cached)
    a folder             a transformers model folder (rtune run folders have their own loader,
                         rtune.run_folder.load_run, which knows about adapters and the template)
    a .gguf file         loaded through transformers' GGUF support, de-quantised
    owner/name           a Hugging Face hub id (needs the hub, or its local cache)
"""

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rtune.errors import RtuneError
from rtune.models import builtin

# owner/name as the hub spells them: letters, digits, '-', '_', '.'; no leading '.' or '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user typed
    path: str  # local folder, or hub id
    gguf_file: str | None  # file name inside `path` when loading a GGUF
    kind: str  # "builtin" | "folder" | "gguf" | "hub"


def _no_such_model(spec: str, why: str = "") -> RtuneError:
    return RtuneError(
        f"no such model: {spec!r}{why} (not a folder, .gguf file, built-in name "
        f"[{', '.join(builtin.builtin_names())}], or hub id)"
    )


def resolve_model(spec: str) -> ModelRef:
    """Decide what `spec` names. A built-in name is converted on first use (about a minute)."""
    spec = str(spec)
    if spec in builtin.BUILTIN_MODELS:
        return ModelRef(spec, str(builtin.builtin_model_dir(spec)), None, "builtin")

    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelRef(spec, str(path), None, "folder")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise _no_such_model(spec, ": the .gguf file does not exist")
        return ModelRef(spec, str(path.parent), path.name, "gguf")
    if path.exists():
        raise _no_such_model(spec, ": it is a file but not a .gguf file")
    if _HUB_ID.match(spec):
        return ModelRef(spec, spec, None, "hub")
    raise _no_such_model(spec)


def _as_ref(spec_or_ref: "str | os.PathLike | ModelRef") -> ModelRef:
    if isinstance(spec_or_ref, ModelRef):
        return spec_or_ref
    return resolve_model(str(spec_or_ref))


def _load_error(ref: ModelRef, what: str, error: Exception) -> RtuneError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "trust_remote_code" in str(error):
        return RtuneError(
            f"{ref.spec} comes with its own Python code, which rtune runs only if you ask: add "
            f"--trust-remote-code (CLI) or trust_remote_code=True (API) if you trust its source"
        )
    if ref.kind == "hub":
        return RtuneError(
            f"could not load the {what} of hub model {ref.path!r}: the Hugging Face hub could not "
            f"be reached, or has no such model ({first_line}). Offline, use a local folder, a "
            f".gguf file or a built-in model ({', '.join(builtin.builtin_names())})"
        )
    where = f"{ref.path}/{ref.gguf_file}" if ref.gguf_file else ref.path
    return RtuneError(f"could not load the {what} from {where}: {first_line}")


def remote_code_allowed(asked: bool = False) -> bool:
    """Whether a model's own Python code may run: asked in the call, or RTUNE_TRUST_REMOTE_CODE=1
    (which `rtune --trust-remote-code` sets, so every load of the command, run folders included, agrees)."""
    return asked or os.environ.get("RTUNE_TRUST_REMOTE_CODE", "") == "1"


def load_tokenizer(spec_or_ref: "str | os.PathLike | ModelRef", *, trust_remote_code: bool = False):
    """The model's tokenizer, as saved (padding side included).

    If it has no pad token, the eos token is used as pad. That is safe in rtune: training labels
    and attention masks come from rendering, never from comparing ids with the pad id.
    """
    from transformers import AutoTokenizer

    # Built-ins: the tokenizer alone is extracted, so the weights are not converted for it.
    name = spec_or_ref.spec if isinstance(spec_or_ref, ModelRef) else str(spec_or_ref)
    if name in builtin.BUILTIN_MODELS:
        ref = ModelRef(name, str(builtin.builtin_tokenizer_dir(name)), None, "builtin")
    else:
        ref = _as_ref(spec_or_ref)

    kwargs = {"trust_remote_code": remote_code_allowed(trust_remote_code)}
    if ref.gguf_file:
        kwargs["gguf_file"] = ref.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(ref, "tokenizer", e) from e

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _as_dtype(dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise RtuneError(f"unknown dtype {dtype!r} (use float32, bfloat16, float16 or auto)")
    return value


def _nf4_config():
    """4-bit NF4 with double quantization and bf16 compute (QLoRA). Checks come first so that a
    machine without CUDA gets a clear message and bitsandbytes is never imported there."""
    if not torch.cuda.is_available():
        raise RtuneError("QLoRA (--peft qlora) needs a CUDA GPU; none is available here. "
                         "Use --peft lora, or run on a machine with an NVIDIA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RtuneError("QLoRA (--peft qlora) needs bitsandbytes: pip install 'rtune[gpu]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_model(
    spec_or_ref: "str | os.PathLike | ModelRef",
    *,
    dtype=torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
):
    """Load a causal LM in eval mode.

    device: None leaves it where transformers puts it (CPU); otherwise it is moved there.
    quantization: None, or "nf4" for QLoRA (CUDA only; the model is placed on `device` or the
    current CUDA device, since 4-bit weights cannot be moved afterwards).
    """
    from transformers import AutoModelForCausalLM

    trust_remote_code = remote_code_allowed(trust_remote_code)
    kwargs = {"dtype": _as_dtype(dtype), "trust_remote_code": trust_remote_code}
    if quantization is not None:
        if quantization != "nf4":
            raise RtuneError(f"unknown quantization {quantization!r} (supported: nf4)")
        # Before resolving: a built-in would otherwise be converted only to fail here.
        kwargs["quantization_config"] = _nf4_config()
        target = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        kwargs["device_map"] = {"": target}

    ref = _as_ref(spec_or_ref)
    if ref.gguf_file and quantization is not None:
        raise RtuneError(
            f"{ref.spec}: QLoRA cannot start from a .gguf file; convert it to a model folder "
            f"first (rtune.models.builtin.convert_gguf)"
        )
    try:
        if ref.gguf_file:
            # De-quantised and rebuilt as a plain model: a GGUF-loaded one cannot be trained or saved.
            model, _ = builtin.gguf_to_plain_model(Path(ref.path) / ref.gguf_file,
                                                  trust_remote_code=trust_remote_code)
            if kwargs["dtype"] != "auto":  # "auto" keeps the de-quantised float32
                model.to(kwargs["dtype"])
        else:
            model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(ref, "model", e) from e

    if device is not None and quantization is None:
        model.to(device)
    model.eval()
    return model


def library_versions() -> dict:
    """Versions of the libraries that decide a run's numbers, for the run folder."""
    import rtune

    versions = {"python": sys.version.split()[0], "rtune": rtune.__version__}
    for dist in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 probes a transformers attribute deprecated in 5.x; the warning is noise for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
