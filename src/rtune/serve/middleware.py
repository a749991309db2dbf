"""What every request goes through before a route: the access log, the API key, the body limit.

A plain ASGI middleware (no buffering of responses, so streams pass through as they are made):

- one log line per request: method, path, status, latency (never a body, a query or a header, so no
  prompt text and no key);
- with an API key, `Authorization: Bearer KEY` is required (compared in constant time), else 401;
  GET /health is open so that a supervisor can probe the server, and so are the pages' files
  (rtune.serve.page: they hold no data; the API calls they make send the key);
- a request body is read up to `max_body_bytes` before anything parses it: a larger one (by its
  Content-Length or, when chunked, as it arrives) is refused with 400 without reading the rest.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

logger = logging.getLogger("rtune.serve")

OPEN_PATHS = frozenset({"/health"})


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class ServeMiddleware:
    def __init__(self, app, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
                 open_paths: frozenset = OPEN_PATHS):
        self.app = app
        self.open_paths = open_paths  # served without the key (the health probe, the pages' static files)
        self._key = ("Bearer " + api_key).encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = {"status": None, "logged": False}

        def log(note: str = "") -> None:
            if not state["logged"]:
                state["logged"] = True
                ms = (time.perf_counter() - start) * 1000
                logger.info("%s %s %s %.1fms%s", scope["method"], scope["path"], state["status"] or "-", ms, note)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log()

        try:
            if self._key is not None and scope["path"] not in self.open_paths and not self._authorized(scope):
                return await send_json(logged_send, 401, error_body(
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    "authentication_error", None, "invalid_api_key"), {"www-authenticate": "Bearer"})
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    return await send_json(logged_send, 400, error_body(
                        f"the request body is larger than the limit of {self.max_body_bytes} bytes",
                        code="request_too_large"))  # uvicorn reads and drops the rest of the body
                receive = _replay(body, receive)
            await self.app(scope, receive, logged_send)
        finally:
            log(" (client gone)" if state["status"] is None else "")

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self._key)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is over the limit (then the rest is left unread)."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    return None
            except ValueError:
                pass  # the server rejects a malformed Content-Length itself
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that gives the body once, then the real channel (the disconnect a stream listens for)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
