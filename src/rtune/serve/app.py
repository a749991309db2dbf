"""Routes and request models: OpenAI's /v1/models, /v1/chat/completions and /v1/completions.

Bodies are parsed here (not by FastAPI) so that every bad request gets a 400 in OpenAI's error shape
{"error": {"message", "type", "param", "code"}}: malformed JSON, a field of the wrong type (types
are strict: "5" is not an integer), an unknown role, an empty conversation, a prompt that does not
fit the context window with its max_tokens. The middleware has already checked the API key and
the body size.

Chat messages are rendered with the model's own rtune template (`Renderer.render_chat_prompt`), on
a render thread; raw /v1/completions prompts (text, token ids, or lists of either) are tokenized as
the tokenizer does, and end only at the model's end ids and the request's `stop` strings. Prompts
then go to the batcher (rtune.serve.batcher); streams run alone and are sent as server-sent events
in OpenAI's chunk format, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rtune.errors import RtuneError
from rtune.serve.batcher import Batcher, QueueFull
from rtune.serve.engine import Engine, Job, Result, Settings, TokenLogprob
from rtune.serve.middleware import ServeMiddleware, error_body

logger = logging.getLogger("rtune.serve")

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


# -- request models ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    # Strict types: a string is not a number, a number is not a boolean. Unknown fields are ignored
    # (clients send `user`, `metadata`, ...); the ones that would change the answer are refused below.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Decoding(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension; 0 = off
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extension
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None


class ChatRequest(_Decoding):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(_Decoding):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None


# -- errors -----------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


_UNION_HINTS = {
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
}
_FIELDS = set().union(*(m.model_fields for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)))


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    path, field, in_union = "", None, False
    for part in err["loc"]:
        if in_union:
            break  # what follows a union member's tag belongs to that member
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELDS:
            path += ("." if path else "") + part
            field = part
        else:
            in_union = True  # a union member's tag ('str', 'list[int]', ...): not part of the path
    if err["type"] == "missing":
        return ApiError(400, f"'{path}' is required", path, "missing_field")
    if in_union and field in _UNION_HINTS:
        return ApiError(400, f"'{path}' must be {_UNION_HINTS[field]}", path, "invalid_type")
    given = err.get("input")
    shown = f" (got {given!r})" if isinstance(given, (str, int, float, bool)) and len(repr(given)) <= 40 else ""
    return ApiError(400, f"'{path}': {err['msg']}{shown}", path, "invalid_value")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(model, body: bytes):
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _refuse_unsupported(req: _Decoding) -> None:
    if req.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported: send n requests (they are batched together)", "n", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported (repetition_penalty is)", name, "unsupported")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias", "unsupported")


# -- shaping the answers ----------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob]) -> dict:
    """The legacy shape: tokens, token_logprobs, top_logprobs (a dict per token, the chosen token
    included as vLLM does, so `logprobs: 0` still shows it) and text_offset (into the returned text,
    where special tokens take no room)."""
    offsets, at = [], 0
    tops: list[dict | None] = []
    for e in entries:
        offsets.append(at)
        at += 0 if e.special else len(e.token)
        if e.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, lp, _ in [*e.top, (e.token, e.logprob, None)]:
            top[t] = max(lp, top.get(t, lp))
        tops.append(top)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_END = object()


# -- the app ----------------------------------------------------------------------------------------
def create_app(engine: Engine, *, api_key: str | None = None, max_batch_size: int = 16, batch_wait_ms: float = 10.0,
               max_queue: int = 64, max_body_bytes: int = 1 << 20, max_tokens: int = 512) -> FastAPI:
    """The server's ASGI app around an Engine (run it with uvicorn, or `rtune.serve.server.serve`).

    max_tokens is the chat default when a request sets none (/v1/completions: 16, as OpenAI's);
    both are capped by the context window."""
    batcher = Batcher(engine.run_batch, max_batch_size=max_batch_size, max_wait_s=batch_wait_ms / 1000,
                      max_queue=max_queue)
    render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtune-render")
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            render_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher = engine, batcher
    app.add_middleware(ServeMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _request_error(request, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()[:1]), "invalid_request_error"), 400)

    # -- helpers sharing the app's state ------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != engine.name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {engine.name!r}", "model",
                           "model_not_found")

    async def render(fn, *args, param: str):
        try:
            return await asyncio.get_running_loop().run_in_executor(render_pool, fn, *args)
        except RtuneError as e:
            raise ApiError(400, str(e), param, "invalid_prompt") from None

    def fit(prompt_len: int, requested: int | None, default: int, param: str) -> int:
        """max_tokens for a prompt: the requested or default number, within the context window."""
        context = engine.context
        if context is None:
            return default if requested is None else requested
        if requested is None:
            requested = min(default, context - prompt_len)
            if requested < 1:
                raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your {param} "
                               f"resulted in {prompt_len} tokens. Please reduce the length of the {param}.", param,
                               "context_length_exceeded")
        elif prompt_len + requested > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_len + requested} tokens ({prompt_len} in the {param}, {requested} in the "
                           f"completion). Please reduce the length of the {param} or completion.", param,
                           "context_length_exceeded")
        return requested

    def settings(req: _Decoding, max_new: int, raw: bool) -> Settings:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop", "invalid_value")
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", "stop", "invalid_value")
        return Settings(
            max_tokens=max_new,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=tuple(dict.fromkeys(stop)),
            seed=req.seed,
            raw=raw,
        )

    def submit(jobs: list[Job]) -> list[asyncio.Future]:
        try:
            return batcher.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e.waiting} requests are waiting, the most it queues is "
                           f"{batcher.max_queue}; retry after {e.retry_after} s", None, "queue_full",
                           "rate_limit_error", {"Retry-After": str(e.retry_after)}) from None

    def failure(e: BaseException) -> ApiError:
        if isinstance(e, RtuneError):
            return ApiError(400, str(e), None, "invalid_request")
        logger.error("generation failed", exc_info=e)
        return ApiError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_failed")

    async def results(futures) -> list[Result]:
        try:
            return await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the model answers 500 (RtuneError: 400)
            raise failure(e) from None

    def stream(job: Job, chunk, final_chunks) -> StreamingResponse:
        """Server-sent events: chunk(text) for each piece of the reply, then final_chunks(result), then [DONE]."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.streamer = engine.streamer(job.settings, job, lambda text: loop.call_soon_threadsafe(queue.put_nowait, text))
        (future,) = submit([job])  # a full queue answers 429 before the stream starts

        def done(f):
            if not f.cancelled():
                f.exception()  # retrieved: a client that left does not leave an unretrieved exception
            queue.put_nowait(_END)

        future.add_done_callback(done)

        async def events():
            try:
                first = chunk(None)
                if first is not None:
                    yield _sse(first)
                while (text := await queue.get()) is not _END:
                    if text:
                        yield _sse(chunk(text))
                if future.cancelled() or future.exception() is not None:
                    e = failure(future.exception() or RuntimeError("cancelled"))
                    yield _sse(error_body(e.message, e.type, e.param, e.code))
                else:
                    for c in final_chunks(future.result()):
                        yield _sse(c)
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # the client left (or the stream is over): stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes -----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return {"model": engine.name, "queued": len(batcher.pending), "busy": batcher.busy,
                "batches": batcher.batches, "batch_sizes": {str(k): v for k, v in sorted(batcher.batch_sizes.items())},
                "context_length": engine.context, "max_batch_size": batcher.max_batch_size,
                "max_queue": batcher.max_queue}

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": started, "owned_by": "rtune"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = parse_body(ChatRequest, await request.body())
        check_model(req.model)
        _refuse_unsupported(req)
        if req.tools:
            raise ApiError(400, "tools are not supported", "tools", "unsupported")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format", "unsupported")
        if not req.messages:
            raise ApiError(400, "'messages' must not be empty", "messages", "invalid_value")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        messages = []
        for i, m in enumerate(req.messages):
            if m.content is None:
                raise ApiError(400, f"'messages[{i}].content' must be text", f"messages[{i}].content", "invalid_value")
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        prompt = await render(engine.chat_prompt, messages, param="messages")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if requested == 0:
            raise ApiError(400, "max_tokens must be at least 1", "max_tokens", "invalid_value")
        job = Job(prompt, settings(req, fit(len(prompt), requested, max_tokens, "messages"), raw=False),
                  logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
        logprobs = job.logprobs is not None

        if req.stream:
            def chunk(text):
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

            def final(result: Result):
                yield {**head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {},
                                    "logprobs": chat_logprobs(result.logprobs) if logprobs else None,
                                    "finish_reason": result.finish_reason}]}
                if req.stream_options and req.stream_options.include_usage:
                    yield {**head, "object": "chat.completion.chunk", "choices": [],
                           "usage": _usage(len(prompt), result.completion_tokens)}

            return stream(job, chunk, final)

        (result,) = await results(submit([job]))
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": chat_logprobs(result.logprobs) if logprobs else None,
                         "finish_reason": result.finish_reason}],
            "usage": _usage(len(prompt), result.completion_tokens),
            "system_fingerprint": None,
        })

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse_body(CompletionRequest, await request.body())
        check_model(req.model)
        _refuse_unsupported(req)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "suffix", "unsupported")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", "best_of", "unsupported")
        p = req.prompt
        batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not batch:
            raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
        if len(batch) > batcher.max_queue:
            raise ApiError(400, f"at most {batcher.max_queue} prompts per request", "prompt", "invalid_value")
        if req.stream and (len(batch) > 1 or req.echo or req.logprobs is not None):
            raise ApiError(400, "stream works with one prompt, without echo and logprobs", "stream", "unsupported")
        prompts: list[tuple[str, list[int]]] = []
        for i, item in enumerate(batch):
            param = "prompt" if len(batch) == 1 else f"prompt[{i}]"
            if isinstance(item, str):
                ids = await render(engine.text_prompt, item, param=param)
                text = item
            else:
                if any(t < 0 or t >= engine.vocab_size for t in item):
                    raise ApiError(400, f"'{param}' has token ids outside the vocabulary [0, {engine.vocab_size})",
                                   param, "invalid_value")
                ids = list(item)
                text = await render(engine.decode, ids, param=param) if req.echo else ""
            if not ids:
                raise ApiError(400, f"'{param}' is empty (no tokens)", param, "invalid_value")
            prompts.append((text, ids))
        jobs = [Job(ids, settings(req, fit(len(ids), req.max_tokens, 16, "prompt"), raw=True),
                    logprobs=req.logprobs, echo=bool(req.echo)) for _, ids in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name,
                "object": "text_completion"}

        if req.stream:
            def chunk(text):
                if text is None:
                    return None
                return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}

            def final(result: Result):
                yield {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                            "finish_reason": result.finish_reason}]}
                if req.stream_options and req.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": _usage(len(prompts[0][1]), result.completion_tokens)}

            return stream(jobs[0], chunk, final)

        done = await results(submit(jobs))
        choices = []
        for i, ((text, _), result) in enumerate(zip(prompts, done)):
            choices.append({"index": i, "text": (text if req.echo else "") + result.text,
                            "logprobs": completion_logprobs(result.logprobs) if result.logprobs is not None else None,
                            "finish_reason": result.finish_reason})
        return JSONResponse({**head, "choices": choices, "system_fingerprint": None,
                             "usage": _usage(sum(len(ids) for _, ids in prompts),
                                             sum(r.completion_tokens for r in done))})

    return app
