"""The LLM judges' client: chat completions from any OpenAI-compatible endpoint, cached and retried.

One `JudgeClient` talks to one endpoint and one judge model (a GPT-4-class API, a local vLLM or
llama.cpp server, `rtune serve`) through the `openai` SDK's AsyncOpenAI, with the SDK's own retries
turned off (max_retries=0): rtune retries itself, so that it can count and bound every retry.

    client = JudgeClient("http://127.0.0.1:8000/v1", "judge-model", "out/judge_cache.jsonl",
                         price_per_million=(2.50, 10.00))
    results = client.judge_many([JudgeRequest({"id": "q1"}, messages, {"max_tokens": 1},
                                              template_version="pairwise-v1"), ...])
    client.stats  # -> a dict for results files

API key: read from the environment variable `api_key_env` (default RTUNE_JUDGE_API_KEY), else
OPENAI_API_KEY, else a placeholder (a local server may need none). It is held privately, sent only
in the Authorization header, and never logged, never put in `stats`, a result or the cache; an error
message that echoes it has it masked.

Cache key
---------
sha256 of the canonical JSON (sorted keys, no whitespace) of
{"model": judge model, "template_version": the caller's prompt-template version,
 "messages": the messages, "params": the normalised params}.
The params are normalised first: temperature defaults to 0, and top_logprobs implies logprobs=True.
`key_fields` (the caller's item identifiers: benchmark, prompt id, system...) are stored with the
record for traceability but are NOT part of the key: the same messages judged for two items are
asked once. Neither is the endpoint URL: a judge model's name must identify it (name a snapshot).
Bump the template version whenever a prompt or its parsing changes.

The cache is an append-only JSONL file (rtune.eval.cache.JsonlCache): each successful judgment is
appended and fsync'ed AS IT ARRIVES, so a run killed at any moment (kill -9 included) loses at most
the requests in flight, and the next run asks only for what is missing. A corrupt or torn line is
dropped on opening (counted in stats["cache_corrupt_lines"]) and its item asked again. Failed items
are never cached, so a re-run asks them again.

Retry policy
------------
The requests go through rtune.transport (shared with generation through endpoints), whose policy is:
every attempt is one HTTP request, at most `concurrency` in flight, each bounded by `timeout`
seconds in all. An attempt fails for one of these reasons (the keys of stats["errors"],
stats["retries"] and stats["failure_reasons"]):
  transient   "timeout" (no complete answer within `timeout`, or HTTP 408), "connection" (refused,
              reset), "rate_limit" (HTTP 429), "server_error" (HTTP 5xx), "conflict" (HTTP 409);
  persistent  "client_error" (any other HTTP 4xx: bad request, auth, unknown model),
              "invalid_response" (HTTP 2xx whose body is not a chat completion: not JSON,
              truncated JSON, no choices[0].message.content string, malformed logprobs).
An item is retried while it has made at most `max_retries` retries in all AND at most
`max_invalid_retries` retries after persistent failures (they rarely heal, so they get a small
budget). The wait before retry n (n = 0, 1, ...) is exponential backoff with full jitter,
uniform(0, min(max_backoff, backoff * 2**n)), unless the failed response carried Retry-After
(or Retry-After-Ms; seconds or an HTTP date), which is honoured but capped at max_backoff.

What counts as a failure
------------------------
An item whose last allowed attempt failed. It comes back with ok=False and `error` (the last
attempt's reason and detail), is counted in stats["failures"] and stats["failure_reasons"] (by the
last attempt's reason), is logged as a warning, and is NOT cached. Every item of a call ends either
as a result (ok=True, from the endpoint or the cache) or as such a failure; an unexpected exception
(a bug) propagates, after every judgment that arrived before it was cached.

Results
-------
`judge_many` returns one JudgeResult (a dict) per request, in order:
  {"key", "key_fields", "ok", "text", "top_logprobs", "usage", "finish_reason", "cached", "error",
   "attempts"}
text is the first choice's message content; top_logprobs is, for each generated token position, a
list of {"token", "logprob"} (the endpoint's top alternatives; the chosen token alone where it gave
none at that position), or None when logprobs were not asked for or the endpoint gave none; usage is
{"prompt_tokens", "completion_tokens"} (0 where the endpoint reported no usage, counted in
stats["responses_without_usage"]); cached tells whether it came from the cache; attempts is the
number of requests sent for it by this call. Requests with the same key in one call are sent once
and share the result (stats["duplicates"]).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TypedDict

from rtune.eval.cache import JsonlCache
from rtune.redact import redact_url
# The transport (retries, Retry-After, timeouts, replicas) is shared with generation through endpoints;
# its names stay importable from here.
from rtune.transport import (  # noqa: F401
    PERSISTENT,
    PLACEHOLDER_API_KEY,
    TRANSIENT,
    AttemptError,
    Transport,
    backoff_delay,
    is_number,
    parse_retry_after,
    run_sync,
)

_AttemptError = AttemptError  # the name tests and older callers use

log = logging.getLogger("rtune.eval.judges")

# Request params passed to the SDK by name; any other key goes in the request body as is (extra_body),
# e.g. vLLM's "top_k". "stream", "n" and the request's own fields are refused.
_SDK_PARAMS = frozenset({
    "temperature", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "top_p", "seed", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
})
_REFUSED_PARAMS = frozenset({"stream", "stream_options", "model", "messages", "n"})

# Cache record fields and their types (a line without them is corrupt and is redone).
_CACHE_FIELDS = {
    "key_fields": dict,
    "model": str,
    "template_version": str,
    "text": str,
    "top_logprobs": (list, type(None)),
    "usage": dict,
    "finish_reason": (str, type(None)),
}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def normalise_params(params: dict | None) -> dict:
    """The params a request is sent (and keyed) with: temperature 0 unless given; top_logprobs -> logprobs."""
    params = dict(params or {})
    refused = sorted(_REFUSED_PARAMS & set(params))
    if refused and not (refused == ["n"] and params["n"] == 1):
        raise ValueError(f"judge request params may not set {refused}")
    params.setdefault("temperature", 0)
    if params.get("top_logprobs") is not None:
        params.setdefault("logprobs", True)
    return params


@dataclass(frozen=True)
class JudgeRequest:
    """One judgment to ask for.

    key_fields: the caller's identifiers of the item (stored with the cached record, not keyed);
    messages: OpenAI chat messages; params: temperature (default 0), max_tokens, optionally
    logprobs / top_logprobs and other chat-completion parameters; template_version: the version of
    the prompt template that built the messages (part of the cache key).
    """

    key_fields: dict
    messages: list[dict]
    params: dict = field(default_factory=dict)
    template_version: str = field(default="", kw_only=True)

    def __post_init__(self):
        if not isinstance(self.template_version, str) or not self.template_version:
            raise ValueError("JudgeRequest needs template_version, the prompt template's version string")
        if not isinstance(self.messages, list) or not self.messages or not all(
                isinstance(m, dict) and "role" in m for m in self.messages):
            raise ValueError("JudgeRequest.messages must be a non-empty list of {'role', 'content'} dicts")
        if not isinstance(self.key_fields, dict):
            raise ValueError("JudgeRequest.key_fields must be a dict")
        normalise_params(self.params)  # refuse bad params at construction


class JudgeResult(TypedDict):
    key: str
    key_fields: dict
    ok: bool
    text: str | None
    top_logprobs: list[list[dict]] | None
    usage: dict | None
    finish_reason: str | None
    cached: bool
    error: str | None
    attempts: int


def _parse_top_logprobs(choice: dict) -> list[list[dict]] | None:
    """Per generated position, the top alternatives as [{"token", "logprob"}]; None when the endpoint gave none."""
    lp = choice.get("logprobs")
    if lp is None:
        return None
    if not isinstance(lp, dict):
        raise AttemptError("invalid_response", "choices[0].logprobs is not an object")
    content = lp.get("content")
    if content is None:
        return None
    if not isinstance(content, list):
        raise AttemptError("invalid_response", "choices[0].logprobs.content is not a list")
    positions = []
    for pos in content:
        if not isinstance(pos, dict) or not isinstance(pos.get("token"), str) or not is_number(pos.get("logprob")):
            raise AttemptError("invalid_response", "a logprobs.content entry lacks token/logprob")
        alternatives = pos.get("top_logprobs") or []
        if not isinstance(alternatives, list):
            raise AttemptError("invalid_response", "logprobs.content[].top_logprobs is not a list")
        out = []
        for alt in alternatives:
            if not isinstance(alt, dict) or not isinstance(alt.get("token"), str) or not is_number(alt.get("logprob")):
                raise AttemptError("invalid_response", "a top_logprobs entry lacks token/logprob")
            out.append({"token": alt["token"], "logprob": float(alt["logprob"])})
        positions.append(out or [{"token": pos["token"], "logprob": float(pos["logprob"])}])
    return positions


def parse_chat_completion(body: str, want_logprobs: bool) -> dict:
    """A chat-completion body -> {"text", "top_logprobs", "usage", "finish_reason", "response_model",
    "usage_reported"}; raises AttemptError("invalid_response") for anything else."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, ValueError) as e:
        raise AttemptError("invalid_response", f"body is not JSON ({e.msg if hasattr(e, 'msg') else e}), "
                                                f"{len(body)} chars") from None
    if not isinstance(data, dict):
        raise AttemptError("invalid_response", "body is not a JSON object")
    if "error" in data and "choices" not in data:
        raise AttemptError("invalid_response", f"error object in a 2xx response: {str(data['error'])[:200]}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise AttemptError("invalid_response", "no choices[0]")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        refusal = message.get("refusal") if isinstance(message, dict) else None
        raise AttemptError("invalid_response", "no choices[0].message.content string"
                            + (f" (refusal: {str(refusal)[:200]})" if refusal else ""))
    finish_reason = choice.get("finish_reason")
    if finish_reason is not None and not isinstance(finish_reason, str):
        raise AttemptError("invalid_response", "choices[0].finish_reason is not a string")
    top = _parse_top_logprobs(choice) if want_logprobs else None
    usage = data.get("usage")
    reported = (isinstance(usage, dict) and is_number(usage.get("prompt_tokens"))
                and is_number(usage.get("completion_tokens")))
    model = data.get("model")
    return {
        "text": message["content"],
        "top_logprobs": top,
        "usage": {"prompt_tokens": int(usage["prompt_tokens"]) if reported else 0,
                  "completion_tokens": int(usage["completion_tokens"]) if reported else 0},
        "finish_reason": finish_reason,
        "response_model": model if isinstance(model, str) else None,
        "usage_reported": reported,
    }


class JudgeClient:
    """Judgments from one OpenAI-compatible endpoint and judge model, cached in `cache_path`.

    See the module docstring for the cache key, the retry policy and what counts as a failure.
    price_per_million: (input, output) price per million tokens, for stats["cost"]; None: no cost.
    `stats` accumulates over this client's calls.
    """

    def __init__(self, base_url: str, model: str, cache_path: str | os.PathLike, *,
                 api_key_env: str = "RTUNE_JUDGE_API_KEY", concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 6, max_invalid_retries: int = 2, backoff: float = 1.0,
                 max_backoff: float = 30.0, price_per_million: tuple[float, float] | None = None):
        if price_per_million is not None:
            price_per_million = (float(price_per_million[0]), float(price_per_million[1]))
        # The transport checks the settings and owns the API key (held privately, never logged).
        self.transport = Transport(str(base_url), api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                                   max_retries=max_retries, max_invalid_retries=max_invalid_retries, backoff=backoff,
                                   max_backoff=max_backoff)
        self.base_url = str(base_url)
        self.model = model
        self.cache_path = Path(cache_path)
        self.api_key_env = api_key_env
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.price_per_million = price_per_million
        self.api_key_source = self.transport.api_key_source
        self._counts: dict[str, Any] = {
            "items": 0, "duplicates": 0, "cache_hits": 0, "cache_corrupt_lines": 0,
            "successes": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "responses_without_usage": 0, "wall_s": 0.0,
        }

    def __repr__(self) -> str:  # no API key here
        return f"JudgeClient(base_url={redact_url(self.base_url)!r}, model={self.model!r}, cache_path={str(self.cache_path)!r})"

    # -- keys and stats ---------------------------------------------------------------------------
    def cache_key(self, request: JudgeRequest) -> str:
        payload = {"model": self.model, "template_version": request.template_version,
                   "messages": request.messages, "params": normalise_params(request.params)}
        return hashlib.sha256(_canonical(payload).encode("utf-8")).hexdigest()

    @property
    def stats(self) -> dict:
        """Counters for results files (cumulative over this client's calls).

        items, duplicates, cache_hits, cache_corrupt_lines, requests_sent, successes, failures,
        errors (failed attempts by reason), retries (by reason), retries_total, failure_reasons,
        prompt_tokens, completion_tokens (of requests answered by this client, cache hits excluded),
        responses_without_usage, cost (None without price_per_million), wall_s, model,
        price_per_million, api_key_source (the variable's name, never its value).
        """
        c = dict(self._counts)
        sent = self.transport.counters()
        c["requests_sent"] = sent["requests_sent"]
        for name in ("errors", "retries", "retries_total", "failure_reasons"):
            c[name] = sent[name]
        c["cost"] = None
        if self.price_per_million is not None:
            p_in, p_out = self.price_per_million
            c["cost"] = (c["prompt_tokens"] * p_in + c["completion_tokens"] * p_out) / 1e6
        c["wall_s"] = round(c["wall_s"], 3)
        c["model"] = self.model
        c["price_per_million"] = list(self.price_per_million) if self.price_per_million else None
        c["api_key_source"] = self.api_key_source
        return c

    def _mask(self, text: str) -> str:
        return self.transport.mask(text)

    # -- the calls ----------------------------------------------------------------------------------
    def judge_many(self, requests: Iterable[JudgeRequest], progress: bool = True) -> list[JudgeResult]:
        """Judge every request (cached ones without asking); one JudgeResult per request, in order."""
        requests = list(requests)
        return run_sync(lambda: self.ajudge_many(requests, progress=progress))

    async def ajudge_many(self, requests: Iterable[JudgeRequest], progress: bool = True) -> list[JudgeResult]:
        """The async implementation of `judge_many`."""
        requests = list(requests)
        t0 = time.monotonic()
        try:
            return await self._judge_many(requests, progress)
        finally:
            self._counts["wall_s"] += time.monotonic() - t0

    async def _judge_many(self, requests: list[JudgeRequest], progress: bool) -> list[JudgeResult]:
        for r in requests:
            if not isinstance(r, JudgeRequest):
                raise TypeError(f"judge_many takes JudgeRequest objects, not {type(r).__name__}")
        cache = JsonlCache(self.cache_path, _CACHE_FIELDS)
        self._counts["cache_corrupt_lines"] += cache.corrupt
        if cache.corrupt:
            log.warning("judge cache %s: %d corrupt line(s) dropped; their items will be asked again",
                        self.cache_path, cache.corrupt)
        keys = [self.cache_key(r) for r in requests]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        self._counts["items"] += len(requests)
        self._counts["duplicates"] += len(requests) - len(first)

        outcome: dict[str, dict] = {}  # key -> result fields shared by the requests with that key
        todo: list[tuple[str, JudgeRequest]] = []
        for k, i in first.items():
            record = cache.get(k)
            if record is not None:
                self._counts["cache_hits"] += 1
                outcome[k] = {"ok": True, "text": record["text"], "top_logprobs": record["top_logprobs"],
                              "usage": dict(record["usage"]), "finish_reason": record["finish_reason"],
                              "cached": True, "error": None, "attempts": 0}
            else:
                todo.append((k, requests[i]))

        if todo:
            await self._ask_all(todo, cache, outcome, progress)

        results: list[JudgeResult] = []
        for k, r in zip(keys, requests):
            o = outcome[k]
            results.append(JudgeResult(key=k, key_fields=dict(r.key_fields), ok=o["ok"], text=o["text"],
                                       top_logprobs=o["top_logprobs"],
                                       usage=dict(o["usage"]) if o["usage"] is not None else None,
                                       finish_reason=o["finish_reason"], cached=o["cached"], error=o["error"],
                                       attempts=o["attempts"]))
        return results

    async def _ask_all(self, todo, cache: JsonlCache, outcome: dict, progress: bool) -> None:
        from tqdm.auto import tqdm

        # disable=None: the bar shows on a terminal only, so logs and tests stay clean.
        bar = tqdm(total=len(todo), desc="judge", unit="req", disable=None if progress else True)
        try:
            async def one(key: str, request: JudgeRequest) -> None:
                outcome[key] = await self._ask(cache, key, request)
                bar.update(1)
                if self._counts["failures"]:
                    bar.set_postfix(failed=self._counts["failures"], refresh=False)

            async with self.transport:
                try:
                    async with asyncio.TaskGroup() as tg:
                        for key, request in todo:
                            tg.create_task(one(key, request))
                except ExceptionGroup as group:  # a bug in one task: raise it as itself
                    raise group.exceptions[0]
        finally:
            bar.close()

    async def _ask(self, cache: JsonlCache, key: str, request: JudgeRequest) -> dict:
        params = normalise_params(request.params)
        want_logprobs = bool(params.get("logprobs"))
        named = {k: v for k, v in params.items() if k in _SDK_PARAMS}
        extra = {k: v for k, v in params.items() if k not in _SDK_PARAMS and k != "n"}

        def send(sdk):
            return sdk.chat.completions.with_raw_response.create(model=self.model, messages=request.messages,
                                                                 **named, extra_body=extra or None)

        done = await self.transport.request(send, lambda body, url: parse_chat_completion(body, want_logprobs),
                                            label=f"judge request {key[:12]}")
        if not done.ok:
            self._counts["failures"] += 1
            log.warning("judge request %s (%s) failed after %d attempt(s): %s", key[:12],
                        self._mask(_canonical(request.key_fields))[:200], done.attempts, done.error)
            return {"ok": False, "text": None, "top_logprobs": None, "usage": None,
                    "finish_reason": None, "cached": False, "error": done.error, "attempts": done.attempts}
        parsed = done.value
        usage = parsed["usage"]
        record = {"key_fields": request.key_fields, "model": self.model,
                  "template_version": request.template_version, "text": parsed["text"],
                  "top_logprobs": parsed["top_logprobs"], "usage": usage,
                  "finish_reason": parsed["finish_reason"], "response_model": parsed["response_model"]}
        cache.add_many({key: record})  # durable before it counts as done
        self._counts["successes"] += 1
        self._counts["prompt_tokens"] += usage["prompt_tokens"]
        self._counts["completion_tokens"] += usage["completion_tokens"]
        self._counts["responses_without_usage"] += not parsed["usage_reported"]
        return {"ok": True, "text": parsed["text"], "top_logprobs": parsed["top_logprobs"], "usage": dict(usage),
                "finish_reason": parsed["finish_reason"], "cached": False, "error": None, "attempts": done.attempts}
