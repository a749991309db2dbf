"""Generation backends: rtune-rendered token-id prompts in, `Generation`s out.

    backend.load()                                   # the heavy part, only when something is missing
    backend.generate(batches, config, done)          # done({key: Generation}) as results arrive
    backend.environment()                            # what else changes an output (the cache key)

- `hf` (rtune.infer.backends.hf): transformers, here; batches are generated whole, so a prompt's
  output may depend on its neighbours (bf16): `keyed_by_batch`, and the caller's cache keys name the batch.
- `vllm` (rtune.infer.backends.vllm): vLLM as a library on a CUDA machine; schedules prompts itself.
- `endpoint` (rtune.infer.backends.endpoint): any OpenAI-compatible server, one or several replicas
  (`rtune serve`, `vllm serve`, SGLang, TGI, llama.cpp's server, a hosted endpoint).

Every backend ends a reply where `rtune generate` does: the template's stop ids, its stop strings
(those that are special tokens as ids) and the user's, cut as rtune.infer.generate cuts them. The
rule-based adapter (GenerationConfig.rules, a transformers logits processor) runs on `hf` only.
"""

from __future__ import annotations

from typing import Callable, Protocol

from rtune.errors import RtuneError
from rtune.infer.generate import Generation, GenerationConfig, _finish, _Stops

BACKENDS = ("hf", "vllm", "endpoint")
Done = Callable[[dict[str, Generation]], None]


class Backend(Protocol):
    name: str
    keyed_by_batch: bool  # outputs depend on batch neighbours: cache keys must name the batch

    def environment(self) -> dict: ...

    def load(self) -> None: ...

    def generate(self, batches: list[dict[str, list[int]]], config: GenerationConfig, done: Done,
                 progress: bool = False) -> None: ...

    def close(self) -> None: ...


def refuse_rules(config: GenerationConfig, backend: str) -> None:
    if config.rules is not None:
        raise RtuneError(f"--rules runs on the HF backend only (the rules are a transformers logits processor); "
                         f"{backend} cannot apply them: leave --rules out or generate here without it")


def reply_stops(tokenizer, renderer, config: GenerationConfig) -> _Stops:
    """The stops of rtune.infer.generate: `.strings` (text), `.all_ids` (end ids + special-token stop strings)."""
    return _Stops(tokenizer, renderer, config)


def finish_ids(tokenizer, ids: list[int], stops: _Stops, ended: bool, stop_reason=None) -> Generation:
    """An engine's generated ids cut exactly as rtune.infer.generate cuts HF's. `ended`: the engine
    says the reply ended by itself; when the ids do not show why (an engine that drops the end id),
    its stop_reason does (vLLM: None for EOS, the stop id or string)."""
    gen = _finish(tokenizer, list(ids), stops)
    if gen.finish_reason == "length" and ended:
        gen.finish_reason = reason_from(stop_reason, stops)
    return gen


def reason_from(stop_reason, stops: _Stops) -> str:
    """rtune's finish reason from vLLM's stop_reason (None: EOS; an id; a string)."""
    if stop_reason is None or (isinstance(stop_reason, int) and stop_reason in stops.eos_ids):
        return "eos"
    return "stop"
