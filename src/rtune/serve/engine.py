"""The model side of the server: token-id prompts in, one batched forward step at a time, replies
and per-token log-probabilities out.

One `Engine` wraps (model, tokenizer, renderer). Its tokenizer is touched by two threads only, each
with its own copy: the render thread (`chat_prompt`, `text_prompt`, `decode`) uses a private copy,
the model thread (the scheduler's steps, `result`, `token_logprobs`) the original, so a fast
tokenizer is never used by two threads at once (its settings are mutable state shared with Rust,
which refuses concurrent borrows).

The scheduler (rtune.serve.scheduler) decides what runs; the engine gives it `forward` (one step
of a padded batch through a KV cache), `stops` (what ends a request's reply) and `result` (the
reply cut as `rtune generate` cuts it, with log-probabilities when asked: one more forward pass
over prompt + reply, in chunks continued through the KV cache, so the logits of a long prompt
never exist at once). Log-probabilities are those of the model's own distribution, before
temperature and top-p, as vLLM reports them by default.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtune.infer.generate import Generation, _finish
from rtune.serve.text import StopSet, special_token_ids, stop_set

LOGIT_BUDGET = 1 << 26  # fp32 logits held at once by a log-probability pass (256 MiB)


@dataclass(frozen=True)
class Settings:
    """One request's decoding settings (each row of a running batch has its own)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: more ids that end the reply (finish "stop")
    seed: int | None = None
    raw: bool = False  # /v1/completions: only the end ids and `stop` end a reply, not the template's turn headers

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def key(self) -> tuple:
        """Equal keys: the same decoding (for the scheduler's count of mixed batches)."""
        sampling = () if self.greedy else (self.temperature, self.top_p, self.top_k, self.seed)
        return (self.max_tokens, self.stop, self.stop_token_ids, self.raw, self.repetition_penalty, sampling)


@dataclass(eq=False)
class Job:
    """One prompt to answer."""

    prompt_ids: list[int]
    settings: Settings
    logprobs: int | None = None  # None: none; k: each token's log-prob and the k most likely alternatives
    echo: bool = False  # with logprobs: the prompt tokens' log-probs too (the first is None)
    on_text: object | None = None  # a stream: called (on the model thread) with each new piece of the reply
    cancelled: bool = False  # set by the client side: the job leaves the queue or the running batch
    arrived: float = 0.0  # monotonic time when queued
    future: object | None = field(default=None, repr=False)
    # The engine the request named when it shares the scheduler's weights under another template
    # (base and base+urial-r): its template's stops apply. None: the scheduler's own engine.
    stops_from: Engine | None = field(default=None, repr=False)


MIN_LOGPROB = -9999.0  # a token of probability 0 (a masked logit): JSON has no -Infinity


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None: the first prompt token (nothing predicts it)
    bytes: list[int] | None = None  # the token's UTF-8 bytes (None: unknown)
    top: list[tuple[str, float, list[int] | None]] = field(default_factory=list)  # (token, logprob, bytes), most likely first
    token_id: int = -1
    special: bool = False  # a special token (BOS, EOS): not in the reply's text, which skips them


@dataclass
class Result:
    text: str  # the reply (special tokens skipped, cut before a stop string)
    finish_reason: str  # OpenAI's: "stop" (an end id or a stop string) or "length"
    completion_tokens: int  # reply tokens plus the end token when the model generated one
    logprobs: list[TokenLogprob] | None = None  # (prompt if echo) + reply (+ end token on /v1/completions)
    # vLLM's: what ended the reply (None: the model's end id, or "length"; an id; a stop string)
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # the reply's ids, the end id last when it ended on one


class _EndIdsOnly:
    """A renderer stand-in for raw completions: the model's end ids stop a reply, no turn headers."""

    def __init__(self, stop_ids: list[int]):
        self.stop_ids = list(stop_ids)
        self.stop_strings: list[str] = []


def context_length(model) -> int | None:
    """The model's context window (max_position_embeddings), or None when it does not say."""
    config = getattr(model, "config", None)
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def default_model_name(model_or_run) -> str:
    return Path(str(model_or_run).rstrip("/")).name or str(model_or_run)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def fingerprint_id(spec: str, renderer) -> str:
    """The model's output fingerprint, as `rtune eval` keys its cache (weights and template)."""
    from rtune.fingerprint import model_fingerprint  # imported here: only a server that names its spec needs it

    return model_fingerprint(spec, renderer)["id"]


class Engine:
    """(model, tokenizer, renderer) behind the server, with the served name and the context window.

    spec: what was loaded (a model name, run or folder), for the fingerprint; None: no fingerprint."""

    def __init__(self, model, tokenizer, renderer, name: str, context: int | None = None, spec: str | None = None):
        from rtune.render import Renderer

        self.model, self.tokenizer, self.renderer, self.name = model, tokenizer, renderer, name
        self.context = context if context is not None else context_length(model)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.spec = spec
        self._fingerprint: str | None = None
        self._raw_stops = _EndIdsOnly(renderer.stop_ids)
        # The render thread's own tokenizer and renderer (see the module docstring).
        self._render_tokenizer = copy.deepcopy(tokenizer)
        self._render_renderer = Renderer.from_dict(renderer.to_dict(), self._render_tokenizer)
        self._pieces: dict[int, tuple[str, list[int] | None]] = {}
        self._special_ids = set(tokenizer.all_special_ids)
        self._special_text = special_token_ids(tokenizer)
        self._byte_level = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__ == "ByteLevel"
        self._bytes_map = _byte_decoder() if self._byte_level else {}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.device = next(model.parameters()).device
        param_dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
        self.dtype = _DTYPE_NAMES.get(param_dtype, str(param_dtype).removeprefix("torch."))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0  # fills left padding; masked, so never seen

    @property
    def fingerprint(self) -> str | None:
        """`fingerprint_id(spec, renderer)`, computed once (it reads the weights' digests)."""
        if self._fingerprint is None and self.spec is not None:
            self._fingerprint = fingerprint_id(self.spec, self.renderer)
        return self._fingerprint

    # -- render thread ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A conversation ending with a user turn -> prompt ids, in the model's own rtune template."""
        return self._render_renderer.render_chat_prompt(messages)

    def text_prompt(self, text: str) -> list[int]:
        """Raw prompt text -> ids, as the tokenizer encodes it (a BOS where the model wants one)."""
        return list(self._render_tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._render_tokenizer.decode(ids, skip_special_tokens=True)

    # -- model thread -----------------------------------------------------------------------------
    def stops(self, settings: Settings) -> StopSet:
        """What ends this request's reply: the template's stops (raw completions: the end ids only),
        the request's stop strings and stop_token_ids. No vocabulary scan (see rtune.serve.text)."""
        return stop_set(self._raw_stops if settings.raw else self.renderer, self._special_text, settings.stop,
                        settings.stop_token_ids)

    def decode_reply(self, ids: list[int]) -> str:
        """Reply ids -> text on the model thread (its own tokenizer)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One step of a left-padded batch through `cache` (which grows): the fp32 logits of each row's
        last position, [rows, vocab] (fp32 as HF generate casts them before choosing a token)."""
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache, use_cache=True, **kwargs)
        return out.logits[:, -1].float()

    def result(self, job: Job, ids: list[int], stops: StopSet) -> Result:
        """The reply to a job from its generated ids (the end id last, if it ended on one)."""
        gen = _finish(self.tokenizer, ids, stops) if ids else Generation(text="", token_ids=[], finish_reason="length")
        ended = gen.stop_id is not None
        result = Result(text=gen.text, finish_reason="length" if gen.finish_reason == "length" else "stop",
                        completion_tokens=gen.num_tokens + ended,
                        # vLLM's stop_reason: None for the model's end id (and "length"), else the stop id or string
                        stop_reason=None if gen.finish_reason in ("eos", "length") else (
                            gen.stop_id if gen.stop_id is not None else gen.stop_string),
                        token_ids=gen.token_ids + ([gen.stop_id] if ended else []))
        if job.logprobs is not None:
            # /v1/completions also shows the end token (likelihood clients drop the last entry).
            reply = gen.token_ids + ([gen.stop_id] if ended and job.settings.raw else [])
            start = 0 if job.echo else len(job.prompt_ids)
            result.logprobs = self.token_logprobs(job.prompt_ids + reply, start, job.logprobs)
        return result

    def _forward(self, ids: list[int], cache, keep: int | None):
        kwargs = {"logits_to_keep": keep} if keep is not None and self._logits_to_keep else {}
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True, **kwargs)
        return out.logits[0], out.past_key_values

    @torch.inference_mode()
    def token_logprobs(self, ids: list[int], start: int, top: int) -> list[TokenLogprob]:
        """log p(ids[t] | ids[:t]) for t >= start, with the `top` most likely tokens at each t.

        t = 0 has no prediction: its entry (when start is 0) has logprob None."""
        out: list[TokenLogprob] = []
        if start == 0 and ids:
            text, raw = self.piece(ids[0])
            out.append(TokenLogprob(text, None, raw, [], ids[0], ids[0] in self._special_ids))
        first = max(start, 1)  # the first predicted position
        if first >= len(ids):
            return out
        cache = None
        pos = 0
        if first - 1 > 0:  # the context before the first prediction: its KV cache only
            _, cache = self._forward(ids[: first - 1], None, 1)
            pos = first - 1
        chunk = max(16, LOGIT_BUDGET // self.vocab_size)
        while pos < len(ids) - 1:
            end = min(len(ids) - 1, pos + chunk)  # feed ids[pos:end]: they predict ids[pos + 1 : end + 1]
            logits, cache = self._forward(ids[pos:end], cache, None)
            logits = logits[-(end - pos):].float()  # fp32 for the normalisation, whatever the model's dtype
            lse = torch.logsumexp(logits, dim=-1)
            targets = torch.tensor(ids[pos + 1 : end + 1], device=logits.device)
            chosen = (logits.gather(-1, targets[:, None]).squeeze(-1) - lse).clamp(min=MIN_LOGPROB).tolist()
            if top > 0:
                values, indices = logits.topk(min(top, logits.shape[-1]), dim=-1)
                values, indices = (values - lse[:, None]).clamp(min=MIN_LOGPROB).tolist(), indices.tolist()
            for row, token_id in enumerate(ids[pos + 1 : end + 1]):
                alts = [(self.piece(i)[0], v, self.piece(i)[1]) for i, v in zip(indices[row], values[row])] if top else []
                text, raw = self.piece(token_id)
                out.append(TokenLogprob(text, chosen[row], raw, alts, token_id, token_id in self._special_ids))
            pos = end
        return out

    def piece(self, token_id: int) -> tuple[str, list[int] | None]:
        """(text, UTF-8 bytes) of one token; the bytes are exact for byte-level and byte-fallback tokens
        (whose text alone is a replacement character), None where they are not known."""
        hit = self._pieces.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw: list[int] | None = list(text.encode("utf-8"))
            if "\ufffd" in text:
                token = self.tokenizer.convert_ids_to_tokens(token_id) or ""
                m = _BYTE_PIECE.fullmatch(token)
                if m:
                    raw = [int(m.group(1), 16)]
                elif self._byte_level and token and all(c in self._bytes_map for c in token):
                    raw = [self._bytes_map[c] for c in token]
                else:
                    raw = None
            hit = self._pieces[token_id] = (text, raw)
        return hit

