"""Generation for evaluation: rtune's own generation, cached per model, item and decoding settings.

Every prompt is rendered with the model's own template (a run or merged folder's; tulu for a plain
model) and decoded greedily by default, with the template's stop strings. Results go to an
append-only cache (rtune.eval.cache) under EVAL_DIR/cache/<model fingerprint>/generations-<key>.jsonl,
the key covering the decoding settings, the device type, a base loaded in NF4 or not and the
versions of torch, transformers and peft (rtune.fingerprint.output_environment). Items are keyed by
a hash of the prompt's token ids and of its batch: batches are formed from one benchmark's prompts
alone, so re-running, adding a model or a benchmark regenerates nothing already done, a
benchmark's outputs never depend on what else ran or was cached first, and a killed run resumes
where it stopped (finished batches are on disk).

Precision: `dtype="auto"` generates in bf16 on GPUs with bf16 and on CPUs with native bf16
(AMX, AVX512-BF16), where greedy bf16 outputs agree with fp32 on most prompts and decode several
times faster (perf/generate_throughput.py measures both and prints the agreement); fp32 elsewhere.
The dtype is part of the decoding key, so bf16 and fp32 generations never mix.

Backends (rtune.infer.backends): "hf" (transformers here, batched, length-sorted), "vllm" (GPUs;
token-id prompts, LoRA runs through a LoRA request) and "endpoint" (running OpenAI-compatible
servers, `--gen-url`). vLLM and servers batch continuously: their outputs are keyed by prompt alone,
and an endpoint's cache file is keyed by its model, fingerprint, dtype and prompt mode instead of
this machine's device and libraries.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rtune.errors import RtuneError
from rtune.eval.cache import JsonlCache
# The model fingerprint lives in rtune.fingerprint (full-content digests); importable from here too.
from rtune.fingerprint import model_fingerprint, output_environment  # noqa: F401
from rtune.infer.generate import GenerationConfig

DTYPES = ("auto", "fp32", "bf16")
BACKENDS = ("hf", "vllm", "endpoint")
GENERATION_FIELDS = {"output": str, "finish_reason": str, "num_tokens": int, "token_ids": list}


@dataclass
class EvalDecoding:
    """Decoding settings of an evaluation: everything that changes an output is in `key()`."""

    max_new_tokens: int = 512
    batch_size: int = 16
    dtype: str = "auto"  # auto | fp32 | bf16
    stop: list[str] = field(default_factory=list)  # extra stop strings (the template's always apply)
    backend: str = "hf"  # hf | vllm | endpoint (rtune.infer.backends)
    # Sampling is possible but evaluation is greedy by default (reproducible).
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    rules: "RulesConfig | None" = None  # the rule-based adapter (rtune.infer.rules), hf only; None: off

    def check(self) -> "EvalDecoding":
        if self.dtype not in DTYPES:
            raise RtuneError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise RtuneError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.rules is not None and self.backend != "hf":
            where = "--gen-url" if self.backend == "endpoint" else f"--backend {self.backend}"
            raise RtuneError(f"--rules needs --backend hf (the rules are a transformers logits processor); "
                             f"{where} cannot apply them: leave --rules out, or generate here without {where}")
        self.generation_config().check()
        return self

    def resolved(self, device_type: str) -> dict:
        """The settings that decide outputs, with the dtype resolved. The batch size is one of them:
        in bf16 a batch's shapes can change a greedy answer (in fp32 they do not: tested)."""
        d = asdict(self)
        d["dtype"] = resolve_dtype(self.dtype, device_type)
        if self.backend == "endpoint":  # the server's dtype is in the cache key's environment; no batches here
            del d["dtype"], d["batch_size"]
        if self.rules is None:
            del d["rules"]  # without rules, the keys of caches written before rules existed
        return d

    def key(self, device_type: str) -> str:
        return hashlib.sha256(json.dumps(self.resolved(device_type), sort_keys=True).encode()).hexdigest()[:16]

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, stop=list(self.stop),
                                do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
                                seed=self.seed, rules=self.rules)


def resolve_dtype(dtype: str, device_type: str) -> str:
    """auto -> bf16 where the hardware runs it natively (CUDA with bf16, AMX/AVX512-BF16 CPUs), else fp32."""
    if dtype != "auto":
        return dtype
    from rtune.train.model import resolve_precision

    return resolve_precision("auto", torch.device(device_type))


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def prompt_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]


# -- generating what the cache lacks ---------------------------------------------------------------
def cache_name(decoding: EvalDecoding, device_type: str, environment: dict) -> str:
    """The cache file's key: the decoding settings and what else changes outputs (rtune.fingerprint)."""
    payload = {"decoding": decoding.resolved(device_type), "environment": environment}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def generation_cache(eval_dir: str | os.PathLike, fingerprint: dict, decoding: EvalDecoding,
                     device_type: str, environment: dict) -> JsonlCache:
    folder = Path(eval_dir) / "cache" / fingerprint["id"]
    name = cache_name(decoding, device_type, environment)
    cache = JsonlCache(folder / f"generations-{name}.jsonl", GENERATION_FIELDS)
    settings = folder / f"generations-{name}.settings.json"
    if not settings.exists():
        from rtune.io import write_json_atomic

        write_json_atomic(settings, {"fingerprint": fingerprint, "decoding": decoding.resolved(device_type),
                                     "environment": environment})
    return cache


def fixed_batches(prompts: dict[str, list[int]], batch_size: int) -> list[list[str]]:
    """The batches of one benchmark, a pure function of its prompts: longest first, ties by key.

    In bf16 a prompt's greedy answer can depend on which prompts share its batch (other shapes,
    other kernels), so batches are formed from one benchmark's prompts alone (never from what else
    runs in the same call) and a resumed run forms the very batches an uninterrupted run forms."""
    keys = sorted(prompts, key=lambda k: (-len(prompts[k]), k))
    return [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]


def item_keys(prompts: dict[str, list[int]], decoding: EvalDecoding) -> dict[str, str]:
    """prompt key -> cache key. With the HF backend the cache key names the prompt's batch too, so an
    output made beside other neighbours (another --limit sample, another benchmark's run) is never
    served for this one. vLLM schedules prompts itself: its outputs are keyed by prompt alone."""
    if decoding.backend != "hf":
        return {k: k for k in prompts}
    out = {}
    for batch in fixed_batches(prompts, decoding.batch_size):
        batch_id = hashlib.sha256(",".join(batch).encode()).hexdigest()[:16]
        out.update({k: f"{k}@{batch_id}" for k in batch})
    return out


def cached_outputs(prompts: dict[str, list[int]], cache: JsonlCache, decoding: EvalDecoding) -> dict[str, dict]:
    """prompt key -> its cached generation (every prompt must be cached)."""
    return {k: cache.get(c) for k, c in item_keys(prompts, decoding).items()}


def missing(prompts: dict[str, list[int]], cache: JsonlCache, decoding: EvalDecoding) -> int:
    return sum(c not in cache for c in item_keys(prompts, decoding).values())


def generate_missing(backend, label: str, prompts: dict[str, list[int]], cache: JsonlCache,
                     decoding: EvalDecoding, progress: bool = True) -> dict:
    """Generate every prompt of one benchmark (key -> ids) the cache lacks with `backend`
    (rtune.infer.backends), appending each result as it comes (the HF backend: each finished batch)."""
    from tqdm.auto import tqdm

    keys = item_keys(prompts, decoding)
    todo = {k: ids for k, ids in prompts.items() if keys[k] not in cache}
    counts = {"items": len(prompts), "from_cache": len(prompts) - len(todo), "generated": 0,
              "corrupt_cache_lines": cache.corrupt, "seconds": 0.0, "new_tokens": 0}
    if not todo:
        return counts
    if backend.keyed_by_batch:
        # A batch is generated whole, with all its neighbours (its cache keys name the batch), and
        # appended at once, so after a kill it is all cached or all missing.
        batches = [{k: prompts[k] for k in batch} for batch in fixed_batches(prompts, decoding.batch_size)
                   if any(k in todo for k in batch)]
    else:
        batches = [todo]
    bar = tqdm(total=len(todo), desc=f"generate {label}", unit="prompt", disable=None if progress else True)

    def done(gens: dict) -> None:
        # Only the missing ones are appended (a corrupt line's neighbours are already cached).
        rows = {keys[k]: generation_row(g) for k, g in gens.items() if k in todo}
        cache.add_many(rows)
        bar.update(len(rows))

    start = time.perf_counter()
    try:
        backend.generate(batches, decoding.generation_config(), done)
    finally:
        bar.close()
    counts["generated"] = len(todo)
    counts["seconds"] = round(time.perf_counter() - start, 2)
    counts["new_tokens"] = sum(cache.get(keys[k])["num_tokens"] for k in todo)
    return counts


def generation_row(g) -> dict:
    """A cache record of one Generation (where another backend's token ids came from, when it says)."""
    row = {"output": g.text, "finish_reason": g.finish_reason, "num_tokens": g.num_tokens, "token_ids": g.token_ids}
    if g.token_ids_from is not None:
        row["token_ids_from"] = g.token_ids_from
    return row
