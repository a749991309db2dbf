"""Requests to OpenAI-compatible endpoints: bounded concurrency, retries, Retry-After, timeouts, replicas.

One `Transport` is what the LLM judges (rtune.eval.judges.client) and generation through endpoints
(rtune.infer.backends.endpoint) send their requests through. It holds one `openai.AsyncOpenAI` per
URL with the SDK's own retries turned off (max_retries=0): rtune retries itself, so that it can
count and bound every retry.

Replicas: several URLs serve the same model. Each attempt goes to the live replica with the fewest
requests in flight (then the fewest sent), at most `concurrency` in flight per replica. A replica
that refuses or drops a connection is set aside for a while (5 s, doubling while it keeps failing,
at most 5 min) and the request is retried at once on another one, so a replica that dies mid-run has
its requests finished by the others. With one URL this is a plain semaphore of `concurrency`.

Retry policy
------------
Every attempt is one HTTP request bounded by `timeout` seconds in all. An attempt fails for one of
these reasons (the keys of stats' "errors", "retries" and "failure_reasons"):
  transient   "timeout" (no complete answer within `timeout`, or HTTP 408), "connection" (refused,
              reset), "rate_limit" (HTTP 429), "server_error" (HTTP 5xx), "conflict" (HTTP 409);
  persistent  "client_error" (any other HTTP 4xx: bad request, auth, unknown model),
              "invalid_response" (HTTP 2xx whose body the caller's parser refuses).
A request is retried while it has made at most `max_retries` retries in all AND at most
`max_invalid_retries` retries after persistent failures (they rarely heal). The wait before retry n
(n = 0, 1, ...) is exponential backoff with full jitter, uniform(0, min(max_backoff, backoff * 2**n)),
unless the failed response carried Retry-After (or Retry-After-Ms; seconds or an HTTP date), which is
honoured but capped at max_backoff; a connection failure retried on another live replica waits not.

API key: read from the environment variable `api_key_env`, else OPENAI_API_KEY, else a placeholder
(a local server may need none). It is sent only in the Authorization header; error texts have it
and the URLs' credentials masked (rtune.redact).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from rtune.redact import redact_text, redact_url

log = logging.getLogger("rtune.transport")

PLACEHOLDER_API_KEY = "rtune-no-key"

TRANSIENT = frozenset({"timeout", "connection", "rate_limit", "server_error", "conflict"})
PERSISTENT = frozenset({"client_error", "invalid_response"})

DOWN_FIRST_S = 5.0  # how long a replica that refused a connection is set aside, doubling while it fails
DOWN_MAX_S = 300.0


def backoff_delay(retry: int, *, backoff: float, max_backoff: float, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `retry` (0-based).

    The server's Retry-After when given (capped at max_backoff), else full jitter:
    uniform(0, min(max_backoff, backoff * 2**retry)).
    """
    if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
        return min(retry_after, max_backoff)
    ceiling = min(max_backoff, backoff * (2.0 ** min(retry, 60)))
    return rand() * ceiling


def parse_retry_after(headers) -> float | None:
    """Seconds from Retry-After-Ms / Retry-After (a number of seconds or an HTTP date), else None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            seconds = when.timestamp() - time.time()
            return max(seconds, 0.0)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


class AttemptError(Exception):
    """One failed attempt: its reason (see the module docstring), a detail, the server's Retry-After."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


def status_reason(status: int) -> str:
    if status == 429:
        return "rate_limit"
    if status == 408:
        return "timeout"
    if status == 409:
        return "conflict"
    if status >= 500:
        return "server_error"
    return "client_error"


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class Outcome:
    """What became of one request: `value` (the parser's result) or `error` ("reason: detail")."""

    value: Any = None
    error: str | None = None
    reason: str | None = None
    attempts: int = 0
    url: str | None = None  # the replica that answered (redacted)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class _Replica:
    url: str
    sdk: Any = None
    inflight: int = 0
    sent: int = 0
    answered: int = 0
    errors: Counter = field(default_factory=Counter)
    down_until: float = 0.0
    down_for: float = 0.0


class Transport:
    """Requests to one or more replicas of an OpenAI-compatible endpoint (see the module docstring).

    `async with transport:` opens the SDK clients; `await transport.request(send, parse, label)` runs
    one request to the end. Counters accumulate over the transport's life (`counters()`)."""

    def __init__(self, urls: str | list[str], *, api_key_env: str, concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 6, max_invalid_retries: int = 2, backoff: float = 1.0, max_backoff: float = 30.0):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("no endpoint URL")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_retries < 0 or max_invalid_retries < 0:
            raise ValueError("max_retries and max_invalid_retries must be >= 0")
        if timeout <= 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("timeout must be > 0, backoff and max_backoff >= 0")
        self.urls = [str(u) for u in urls]
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.max_invalid_retries = int(max_invalid_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) or os.environ.get("OPENAI_API_KEY")
        self._api_key = key or PLACEHOLDER_API_KEY
        self.api_key_source = api_key_env if os.environ.get(api_key_env) else (
            "OPENAI_API_KEY" if key else "placeholder")
        self.replicas = [_Replica(u) for u in self.urls]
        self.requests_sent = 0
        self.errors: Counter = Counter()
        self.retries: Counter = Counter()
        self.failure_reasons: Counter = Counter()
        self._cond: asyncio.Condition | None = None

    def __repr__(self) -> str:  # no API key, no credentials
        return f"Transport({[redact_url(u) for u in self.urls]!r})"

    def mask(self, text) -> str:
        """text with the URLs' credentials and the API key masked, at most 500 characters."""
        text = str(text)
        for url in self.urls:
            text = redact_text(text, url)
        if self._api_key and self._api_key != PLACEHOLDER_API_KEY:
            text = text.replace(self._api_key, "***")
        return text[:500]

    # -- clients ----------------------------------------------------------------------------------
    async def __aenter__(self) -> "Transport":
        from openai import AsyncOpenAI

        self._cond = asyncio.Condition()
        for r in self.replicas:
            r.sdk = AsyncOpenAI(api_key=self._api_key, base_url=r.url, timeout=self.timeout, max_retries=0)
        return self

    async def __aexit__(self, *exc) -> None:
        for r in self.replicas:
            if r.sdk is not None:
                await r.sdk.close()
                r.sdk = None

    async def _acquire(self, avoid: _Replica | None, only: _Replica | None = None) -> _Replica:
        """A replica slot: live replicas first (all, when none is live), then the least busy."""
        async with self._cond:
            while True:
                now = time.monotonic()
                pool = [only] if only is not None else self.replicas
                live = [r for r in pool if r.down_until <= now] or pool
                free = [r for r in live if r.inflight < self.concurrency]
                if free:
                    pick = min(free, key=lambda r: (r is avoid and len(free) > 1, r.inflight, r.sent))
                    pick.inflight += 1
                    pick.sent += 1
                    return pick
                try:  # a slot frees on release; a replica set aside comes back after its time
                    await asyncio.wait_for(self._cond.wait(), timeout=1.0)
                except TimeoutError:
                    pass

    async def _release(self, replica: _Replica) -> None:
        async with self._cond:
            replica.inflight -= 1
            self._cond.notify_all()

    def _mark(self, replica: _Replica, reason: str | None) -> None:
        if reason == "connection":
            replica.down_for = min(DOWN_MAX_S, replica.down_for * 2 or DOWN_FIRST_S)
            replica.down_until = time.monotonic() + replica.down_for
            if len(self.replicas) > 1:
                log.warning("%s refused or dropped a connection: set aside for %.0f s, its requests go to the others",
                            redact_url(replica.url), replica.down_for)
        elif reason is None:
            replica.down_for = 0.0
            replica.answered += 1

    def _others_live(self, replica: _Replica) -> bool:
        now = time.monotonic()
        return any(r is not replica and r.down_until <= now for r in self.replicas)

    # -- one request --------------------------------------------------------------------------------
    async def attempt(self, replica: _Replica, send: Callable[[Any], Awaitable[Any]]) -> Any:
        """One attempt: `send(sdk)` returns the SDK's raw response; its body text, or AttemptError."""
        import openai

        try:
            async with asyncio.timeout(self.timeout):
                raw = await send(replica.sdk)
                return raw.http_response.text
        except TimeoutError:
            raise AttemptError("timeout", f"no answer within {self.timeout:g}s") from None
        except openai.APITimeoutError:
            raise AttemptError("timeout", f"no answer within {self.timeout:g}s") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__
            raise AttemptError("connection", f"{type(cause).__name__ if cause else 'connection error'}: "
                                             f"{self.mask(cause or e)[:200]}") from None
        except openai.APIStatusError as e:
            try:
                snippet = e.response.text[:300]
            except Exception:  # body not readable
                snippet = ""
            raise AttemptError(status_reason(e.status_code), f"HTTP {e.status_code}: {self.mask(snippet)}",
                               parse_retry_after(e.response.headers)) from None
        except openai.APIResponseValidationError as e:
            raise AttemptError("invalid_response", self.mask(e)[:300]) from None

    async def request(self, send: Callable[[Any], Awaitable[Any]], parse: Callable[[str, str], Any],
                      label: str = "request", replica: int | None = None) -> Outcome:
        """Send until answered or out of retries. send(sdk) -> the SDK's raw response (with_raw_response);
        parse(body text, redacted URL) -> the value, or raises AttemptError("invalid_response", ...).
        Anything else a parser raises propagates (it is not the endpoint's failure to retry).
        replica: send to that replica only (its index in `urls`), e.g. to ask each what it serves."""
        retries = invalid_retries = attempts = 0
        last: _Replica | None = None
        only = None if replica is None else self.replicas[replica]
        while True:
            attempts += 1
            replica = await self._acquire(last, only)
            last = replica
            try:
                self.requests_sent += 1
                body = await self.attempt(replica, send)
                value = parse(body, redact_url(replica.url))
            except AttemptError as e:
                self.errors[e.reason] += 1
                replica.errors[e.reason] += 1
                self._mark(replica, e.reason)
                await self._release(replica)
                persistent = e.reason not in TRANSIENT
                if retries >= self.max_retries or (persistent and invalid_retries >= self.max_invalid_retries):
                    self.failure_reasons[e.reason] += 1
                    return Outcome(error=self.mask(f"{e.reason}: {e.detail}"), reason=e.reason, attempts=attempts,
                                   url=redact_url(replica.url))
                if e.reason == "connection" and only is None and self._others_live(replica):
                    delay = 0.0  # another replica takes it now
                else:
                    delay = backoff_delay(retries, backoff=self.backoff, max_backoff=self.max_backoff,
                                          retry_after=e.retry_after)
                self.retries[e.reason] += 1
                retries += 1
                invalid_retries += persistent
                log.debug("%s: %s; retry %d in %.2fs", label, e.reason, retries, delay)
                await asyncio.sleep(delay)
                continue
            except BaseException:
                await self._release(replica)
                raise
            self._mark(replica, None)
            await self._release(replica)
            return Outcome(value=value, attempts=attempts, url=redact_url(replica.url))

    def counters(self) -> dict:
        """requests_sent, errors / retries / failure_reasons by reason, and per replica (URLs redacted)."""
        return {
            "requests_sent": self.requests_sent,
            "errors": dict(sorted(self.errors.items())),
            "retries": dict(sorted(self.retries.items())),
            "retries_total": sum(self.retries.values()),
            "failure_reasons": dict(sorted(self.failure_reasons.items())),
            "replicas": {redact_url(r.url): {"sent": r.sent, "answered": r.answered, "errors": dict(r.errors)}
                         for r in self.replicas},
        }


def run_sync(make_coro: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to its end from synchronous code, also from inside a running event loop (a
    notebook: then in a thread of its own)."""
    import threading

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    box: dict = {}

    def work():
        try:
            box["out"] = asyncio.run(make_coro())
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=work, name="rtune-transport")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]
