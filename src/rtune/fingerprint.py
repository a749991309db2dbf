"""Which model made an output: a fingerprint that changes whenever the weights or the template change.

Weights are identified by their full content, never by a sample of it: two fine-tunes of one base
can differ anywhere in a file. A file's digest is a SHA-256 tree hash: the file is read in 64 MiB
chunks, the chunks are hashed in parallel threads (hashlib releases the GIL), and the digest is the
SHA-256 of the file size and the chunk digests. Digests are remembered in rtune's cache
(`$RTUNE_HOME/digests/`) under the file's real path, size, modification time and inode, so a model
is read once, read-only folders and the hub cache work, and a changed file is read again.
Hub models are identified by the commit their name resolves to.

`model_fingerprint(spec, renderer)` -> {"kind", "renderer", "weights" | "id" ..., "id"}; "id" is a
short hash of the rest. A LoRA run's fingerprint includes its base model's.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rtune import run_folder
from rtune.errors import RtuneError
from rtune.io import write_json_atomic
from rtune.paths import rtune_home

CHUNK = 64 * 2**20
DIGEST_METHOD = "sha256-tree-64MiB"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json")


def _chunk_digest(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        h = hashlib.sha256()
        left = CHUNK
        while left > 0:
            block = f.read(min(left, 8 * 2**20))
            if not block:
                break
            h.update(block)
            left -= len(block)
        return h.digest()


def _hash_file(path: Path, workers: int | None = None) -> str:
    size = path.stat().st_size
    offsets = range(0, max(size, 1), CHUNK)
    workers = workers or min(len(offsets), os.cpu_count() or 1, 16)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        chunks = list(pool.map(lambda o: _chunk_digest(path, o), offsets))
    h = hashlib.sha256(f"{DIGEST_METHOD}:{size}:".encode())
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _memo_path(path: Path) -> tuple[Path, dict]:
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
           "method": DIGEST_METHOD}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return rtune_home() / "digests" / f"{name}.json", key


def file_digest(path: str | os.PathLike) -> str:
    """The full-content digest of a file, read once and then remembered (see the module docstring)."""
    path = Path(path)
    memo, key = _memo_path(path)
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if saved.get("key") == key and isinstance(saved.get("digest"), str):
            return saved["digest"]
    except (OSError, ValueError):
        pass
    digest = _hash_file(path)
    try:
        write_json_atomic(memo, {"key": key, "digest": digest})
    except OSError:  # a read-only cache only costs a re-read next time
        pass
    return digest


def folder_digest(folder: str | os.PathLike) -> dict:
    """{file name: digest} of a model folder's weight and config files (sub-folders not included)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and (
        p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_FILES))
    if not any(Path(n).suffix in WEIGHT_SUFFIXES for n in names):
        raise RtuneError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to identify the model by")
    return {name: file_digest(folder / name) for name in names}


def hub_commit(repo_id: str) -> str:
    """The commit a hub model id resolves to: asked of the hub, else read from the local hub cache."""
    import huggingface_hub

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        try:
            return huggingface_hub.HfApi().model_info(repo_id).sha
        except Exception:  # noqa: BLE001 (offline, gated, rate-limited: the cache may still say)
            pass
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    raise RtuneError(f"cannot tell which commit of {repo_id!r} would be loaded: the hub is unreachable and the "
                     "model is not in the local hub cache; download it once, or pass a local folder")


def weights_identity(spec: str) -> dict:
    """What identifies a plain model spec's weights."""
    from rtune.models import resolve_model

    ref = resolve_model(spec)
    if ref.kind == "hub":
        return {"kind": "hub", "id": ref.path, "commit": hub_commit(ref.path)}
    if ref.gguf_file:
        return {"kind": "gguf", "weights": {ref.gguf_file: file_digest(Path(ref.path) / ref.gguf_file)}}
    return {"kind": ref.kind, "weights": folder_digest(ref.path)}


def model_fingerprint(spec: str, renderer) -> dict:
    """What identifies a model's outputs: its weights (a LoRA run: its base's and its adapter's) and template."""
    fp: dict = {"renderer": hashlib.sha256(json.dumps(renderer.to_dict(), sort_keys=True).encode()).hexdigest(),
                "digest": DIGEST_METHOD}
    spec = str(spec)
    if run_folder.is_run_dir(spec):
        info = run_folder.read_complete_run_info(spec, "finish training first (rtune train --resume)")
        fp.update(kind="run", method=info["method"], weights=folder_digest(run_folder.weights_dir(spec, info)))
        if info["weights"] == "adapter":
            fp["base"] = {"spec": info["base_model"]["load"], **weights_identity(info["base_model"]["load"])}
    elif run_folder.is_merged_dir(spec):
        fp.update(kind="merged", weights=folder_digest(spec))
    else:
        fp.update(weights_identity(spec))
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def output_environment(device_type: str, quantization: str | None, backend: str = "hf") -> dict:
    """What besides the model and the settings changes a generated token: the device type, a base loaded
    in NF4 or not, and the versions of the libraries that compute the logits."""
    import importlib.metadata

    versions = {}
    packages = ("torch", "transformers", "peft") + (("bitsandbytes",) if quantization else ()) + (
        ("vllm",) if backend == "vllm" else ())
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"device_type": device_type, "quantization": quantization, "versions": versions}
