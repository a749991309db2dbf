"""Routes and request models: OpenAI's /v1/models, /v1/chat/completions and /v1/completions.

Bodies are parsed here (not by FastAPI) so that every bad request gets a 400 in OpenAI's error shape
{"error": {"message", "type", "param", "code"}}: malformed JSON, a field of the wrong type (types
are strict: "5" is not an integer), an unknown role, an empty conversation, a prompt that does not
fit the context window with its max_tokens, and anything over the server's limits (`Limits`: the
longest reply, the longest prompt, the stop strings' length). The middleware has already checked
the API key and the body size.

The routes are module-level functions on `router`; what they share lives in `app.state`: the
served models by name (each an Engine and its Scheduler: a request picks one with `model`), the
endpoints of other servers by name (rtune.serve.proxy), the evaluation being rated (rtune.serve.
rating), the limits, and the render thread. Engines over the same loaded model (one set of weights
under several templates, such as base and base+urial-r) share one Scheduler: one running batch,
each job ending at its own template's stops. The pages (rtune.serve.page) are served beside the API. Chat messages are rendered with the model's own rtune template
(`Renderer.render_chat_prompt`) on the render thread; raw /v1/completions prompts (text, token ids,
or lists of either) are tokenized as the tokenizer does, and end only at the model's end ids, the
request's `stop` strings and `stop_token_ids`. Jobs then go to the model's scheduler (continuous
batching, rtune.serve.scheduler); streams are sent as server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`. A client that disconnects cancels its jobs, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rtune.errors import RtuneError
from rtune.serve import proxy
from rtune.serve.api import ApiError, StrictBody, parse_json_body
from rtune.serve.engine import Engine, Job, Result, Settings, TokenLogprob
from rtune.serve.middleware import ServeMiddleware, error_body
from rtune.serve.scheduler import QueueFull, Scheduler, ShuttingDown

logger = logging.getLogger("rtune.serve")

MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20


# -- request models ---------------------------------------------------------------------------------
class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class Message(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(StrictBody):
    include_usage: bool | None = False


class _Decoding(StrictBody):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension; 0 = off
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extension
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
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
    return_token_ids: bool | None = False  # vLLM's extension: choices[].token_ids, the reply's ids


# -- errors -----------------------------------------------------------------------------------------
_UNION_HINTS = {
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
}


def parse_body(model, body: bytes):
    return parse_json_body(model, body, _UNION_HINTS)


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


# -- the server's state ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything more is a 400 (flags of `rtune serve`)."""

    max_tokens: int = 512  # a chat reply's length when the request sets none (--max-tokens)
    max_tokens_limit: int = 4096  # the longest reply any request may ask for (--max-tokens-limit)
    max_prompt_tokens: int = 8192  # the longest prompt, in tokens (--max-prompt-tokens)
    max_stop_chars: int = 4096  # a request's stop strings together, in characters (--max-stop-chars)

    def check(self) -> Limits:
        if min(self.max_tokens, self.max_tokens_limit, self.max_prompt_tokens, self.max_stop_chars) < 1:
            raise RtuneError("--max-tokens, --max-tokens-limit, --max-prompt-tokens and --max-stop-chars must be >= 1")
        if self.max_tokens > self.max_tokens_limit:
            raise RtuneError(f"--max-tokens {self.max_tokens} is over --max-tokens-limit {self.max_tokens_limit}")
        return self


@dataclass(frozen=True)
class Served:
    """One model behind the server: its engine and the scheduler that runs it (shared by the engines
    over the same weights: then `scheduler.engine` may be another of them)."""

    engine: Engine
    scheduler: Scheduler


def _schedulers(app) -> list[Scheduler]:
    return list({id(s.scheduler): s.scheduler for s in app.state.models.values()}.values())


def create_app(engines: Engine | list[Engine] = (), *, api_key: str | None = None, max_batch_size: int = 16,
               batch_wait_ms: float = 10.0, max_queue: int = 64, max_body_bytes: int = 1 << 20, max_tokens: int = 512,
               max_tokens_limit: int = 4096, max_prompt_tokens: int = 8192, max_stop_chars: int = 4096,
               endpoints=(), rate_dir=None) -> FastAPI:
    """The server's ASGI app around one Engine or several (run it with uvicorn, or
    `rtune.serve.server.serve`); each loaded model gets one scheduler (one running batch), shared by
    the engines that use that model object under other templates.

    endpoints: rtune.serve.specs.EndpointSpec of models behind other servers (proxied); rate_dir: an
    evaluation folder to rate blind at /rate (the only folder ratings are written under). A server
    may serve the rating page alone (no engine).

    max_tokens is the chat default when a request sets none (/v1/completions: 16, as OpenAI's);
    replies are capped by max_tokens_limit and the context window."""
    from rtune.serve import page, proxy, rating
    from rtune.serve.middleware import OPEN_PATHS

    engines = [engines] if isinstance(engines, Engine) else list(engines)
    names = [e.name for e in engines] + [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise RtuneError("each served model and endpoint needs its own name")
    endpoints = {e.name: e for e in endpoints}
    rated = rating.RatingSet.load(rate_dir) if rate_dir is not None else None
    if not names and rated is None:
        raise RtuneError("serve at least one model (or an endpoint, or an evaluation to rate)")
    limits = Limits(max_tokens, max_tokens_limit, max_prompt_tokens, max_stop_chars).check()
    by_weights: dict[int, Scheduler] = {}
    models = {}
    for e in engines:
        scheduler = by_weights.get(id(e.model))
        if scheduler is None:
            scheduler = by_weights[id(e.model)] = Scheduler(e, max_batch_size=max_batch_size, max_queue=max_queue,
                                                            max_wait_s=batch_wait_ms / 1000)
        models[e.name] = Served(e, scheduler)
    render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtune-render")

    @asynccontextmanager
    async def lifespan(app):
        for served in models.values():
            await asyncio.to_thread(lambda e=served.engine: e.fingerprint)  # hashed once, before serving
        for scheduler in _schedulers(app):
            scheduler.start()
        app.state.proxy_client = proxy.new_client() if endpoints else None
        try:
            yield
        finally:
            for scheduler in _schedulers(app):
                await scheduler.stop()
            if app.state.proxy_client is not None:
                await app.state.proxy_client.aclose()
            render_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.limits, app.state.render_pool = models, limits, render_pool
    app.state.endpoints, app.state.rating, app.state.proxy_client = endpoints, rated, None
    app.state.started = int(time.time())
    app.add_middleware(ServeMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       open_paths=OPEN_PATHS | page.OPEN_PATHS)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_error)
    app.include_router(router)
    app.include_router(page.router)
    app.include_router(rating.router)
    return app


def stop_generating(app) -> None:
    """Stop every model's generation now (from a signal handler too): waiting and running requests
    answer 503 and the server can shut down within a step."""
    for scheduler in _schedulers(app):
        scheduler.request_stop()


async def _api_error(request, e: ApiError):
    return e.response()


async def _http_error(request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), e.status_code,
                        headers=getattr(e, "headers", None))


async def _request_error(request, e: RequestValidationError):
    return JSONResponse(error_body(str(e.errors()[:1]), "invalid_request_error"), 400)


# -- helpers of the routes ----------------------------------------------------------------------------
def _served(request: Request, name: str | None) -> Served:
    models = request.app.state.models
    every = sorted([*models, *request.app.state.endpoints])
    if name is None and len(models) == 1 and not request.app.state.endpoints:
        return next(iter(models.values()))
    if name is None:
        raise ApiError(400, f"'model' is required: this server serves {every}", "model", "missing_field")
    if name not in models:
        raise ApiError(404, f"the model {name!r} does not exist: this server serves {every}", "model",
                       "model_not_found")
    return models[name]


async def _render(request: Request, fn, *args, param: str):
    try:
        return await asyncio.get_running_loop().run_in_executor(request.app.state.render_pool, fn, *args)
    except RtuneError as e:
        raise ApiError(400, str(e), param, "invalid_prompt") from None


def _reply_length(request: Request, engine: Engine, prompt_len: int, requested: int | None, default: int,
                  param: str) -> int:
    """max_tokens for a prompt: the requested or default number, within the limits and the context window."""
    limits: Limits = request.app.state.limits
    if prompt_len > limits.max_prompt_tokens:
        raise ApiError(400, f"the {param} has {prompt_len} tokens; this server takes at most "
                       f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param, "prompt_too_long")
    if requested is not None and requested > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {requested}; this server generates at most {limits.max_tokens_limit} "
                       "tokens per reply (--max-tokens-limit)", "max_tokens", "invalid_value")
    context = engine.context
    if context is None:
        return min(default, limits.max_tokens_limit) if requested is None else requested
    if requested is None:
        requested = min(default, limits.max_tokens_limit, context - prompt_len)
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


def _settings(request: Request, engine: Engine, req: _Decoding, max_new: int, raw: bool) -> Settings:
    limits: Limits = request.app.state.limits
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop", "invalid_value")
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must not be empty", "stop", "invalid_value")
    if sum(map(len, stop)) > limits.max_stop_chars:
        raise ApiError(400, f"the stop strings have {sum(map(len, stop))} characters together; this server takes "
                       f"at most {limits.max_stop_chars} (--max-stop-chars)", "stop", "invalid_value")
    stop_ids = list(req.stop_token_ids or [])
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise ApiError(400, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids", "stop_token_ids", "invalid_value")
    if any(not 0 <= t < engine.vocab_size for t in stop_ids):
        raise ApiError(400, f"'stop_token_ids' has ids outside the vocabulary [0, {engine.vocab_size})",
                       "stop_token_ids", "invalid_value")
    return Settings(
        max_tokens=max_new,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        stop=tuple(dict.fromkeys(stop)),
        stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        seed=req.seed,
        raw=raw,
    )


def _submit(served: Served, jobs: list[Job]) -> list[asyncio.Future]:
    if served.engine is not served.scheduler.engine:  # same weights, this name's template
        for job in jobs:
            job.stops_from = served.engine
    try:
        return served.scheduler.submit(jobs)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e.waiting} requests are waiting, the most it queues is "
                       f"{served.scheduler.max_queue}; retry after {e.retry_after} s", None, "queue_full",
                       "rate_limit_error", {"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown as e:
        raise _failure(e) from None


def _failure(e: BaseException) -> ApiError:
    if isinstance(e, RtuneError):
        return ApiError(400, str(e), None, "invalid_request")
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), None, "shutting_down", "server_error")
    logger.error("generation failed", exc_info=e)
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_failed")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _results(request: Request, served: Served, jobs: list[Job]) -> list[Result] | None:
    """The jobs' results; None when the client disconnected first (its jobs are cancelled)."""
    gathered = asyncio.gather(*_submit(served, jobs))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathered, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        left = not gathered.done()
        if left:  # the client left, or this handler was cancelled
            served.scheduler.cancel(jobs)
            gathered.cancel()
            # A job that failed as it was cancelled leaves an exception nobody reads: read it here
            # (else asyncio logs "_GatheringFuture exception was never retrieved").
            gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
    if left:
        return None
    try:
        return gathered.result()
    except Exception as e:  # noqa: BLE001 - a failed generation answers 500 (RtuneError: 400, shutdown: 503)
        served.scheduler.cancel(jobs)  # the others of a multi-prompt request
        raise _failure(e) from None


def _gone() -> Response:
    return Response(status_code=499)  # nobody reads it: the client has gone


def _stream(served: Served, job: Job, chunk, final_chunks) -> StreamingResponse:
    """Server-sent events: chunk(text) for each piece of the reply, then final_chunks(result), then [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)
    (future,) = _submit(served, [job])  # a full queue answers 429 before the stream starts

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
                e = _failure(future.exception() or RuntimeError("cancelled"))
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            else:
                for c in final_chunks(future.result()):
                    yield _sse(c)
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():  # the client left: stop generating
                served.scheduler.cancel([job])

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _model_card(request: Request, engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": request.app.state.started, "owned_by": "rtune",
            "max_model_len": engine.context, "dtype": engine.dtype, "device": engine.device.type,
            "rtune_fingerprint": engine.fingerprint, "rtune_template": engine.renderer.template_name}


# -- routes -------------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/stats")
async def stats(request: Request):
    limits: Limits = request.app.state.limits
    # Names over shared weights share a scheduler: "batch" names it, and its counters are the batch's.
    return {"models": {name: {"context_length": s.engine.context, "dtype": s.engine.dtype,
                              "batch": s.scheduler.engine.name, **s.scheduler.snapshot()}
                       for name, s in request.app.state.models.items()},
            "limits": {"max_tokens": limits.max_tokens, "max_tokens_limit": limits.max_tokens_limit,
                       "max_prompt_tokens": limits.max_prompt_tokens, "max_stop_chars": limits.max_stop_chars}}


@router.get("/v1/models")
async def list_models(request: Request):
    state = request.app.state
    return {"object": "list", "data": [_model_card(request, s.engine) for s in state.models.values()]
            + [proxy.model_card(e, state.started) for e in state.endpoints.values()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    endpoint = request.app.state.endpoints.get(model_id)
    if endpoint is not None:
        return proxy.model_card(endpoint, request.app.state.started)
    return _model_card(request, _served(request, model_id).engine)


def _chat_messages(req: ChatRequest) -> list[dict]:
    """The request's conversation as rtune's renderer takes it (after refusing what it cannot answer)."""
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
    return messages


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.body()
    endpoint = proxy.named_endpoint(request, body)
    if endpoint is not None:
        return await proxy.forward(request, endpoint, "chat/completions", body)
    req: ChatRequest = parse_body(ChatRequest, body)
    served = _served(request, req.model)
    engine = served.engine
    messages = _chat_messages(req)
    prompt = await _render(request, engine.chat_prompt, messages, param="messages")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if requested == 0:
        raise ApiError(400, "max_tokens must be at least 1", "max_tokens", "invalid_value")
    max_new = _reply_length(request, engine, len(prompt), requested, request.app.state.limits.max_tokens, "messages")
    job = Job(prompt, _settings(request, engine, req, max_new, raw=False),
              logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name,
            "system_fingerprint": engine.fingerprint}
    logprobs = job.logprobs is not None

    def usage(result: Result) -> dict:
        return _usage(len(prompt), result.completion_tokens)

    if req.stream:
        def chunk(text):
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

        def final(result: Result):
            yield {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": result.finish_reason,
                                "logprobs": chat_logprobs(result.logprobs) if logprobs else None}]}
            if req.stream_options and req.stream_options.include_usage:
                yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(result)}

        return _stream(served, job, chunk, final)

    done = await _results(request, served, [job])
    if done is None:
        return _gone()
    (result,) = done
    return JSONResponse({**head, "object": "chat.completion", "usage": usage(result),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                      "logprobs": chat_logprobs(result.logprobs) if logprobs else None,
                                      "finish_reason": result.finish_reason}]})


async def _completion_prompts(request: Request, engine: Engine, req: CompletionRequest
                             ) -> list[tuple[str, list[int], str]]:
    """(text shown by echo, ids, its name in errors) for each prompt of a /v1/completions request."""
    p = req.prompt
    batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not batch:
        raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
    most = min(s.scheduler.max_queue for s in request.app.state.models.values())
    if len(batch) > most:
        raise ApiError(400, f"at most {most} prompts per request", "prompt", "invalid_value")
    prompts = []
    for i, item in enumerate(batch):
        param = "prompt" if len(batch) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = await _render(request, engine.text_prompt, item, param=param)
            text = item
        else:
            if any(t < 0 or t >= engine.vocab_size for t in item):
                raise ApiError(400, f"'{param}' has token ids outside the vocabulary [0, {engine.vocab_size})",
                               param, "invalid_value")
            ids = list(item)
            text = await _render(request, engine.decode, ids, param=param) if req.echo else ""
        if not ids:
            raise ApiError(400, f"'{param}' is empty (no tokens)", param, "invalid_value")
        prompts.append((text, ids, param))
    return prompts


@router.post("/v1/completions")
async def completions(request: Request):
    body = await request.body()
    endpoint = proxy.named_endpoint(request, body)
    if endpoint is not None:
        return await proxy.forward(request, endpoint, "completions", body)
    req: CompletionRequest = parse_body(CompletionRequest, body)
    served = _served(request, req.model)
    engine = served.engine
    _refuse_unsupported(req)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", "suffix", "unsupported")
    if req.best_of not in (None, 1):
        raise ApiError(400, "best_of > 1 is not supported", "best_of", "unsupported")
    many = not (isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)))
    if req.stream and ((many and len(req.prompt) > 1) or req.echo or req.logprobs is not None):
        raise ApiError(400, "stream works with one prompt, without echo and logprobs", "stream", "unsupported")
    prompts = await _completion_prompts(request, engine, req)
    jobs = []
    for _, ids, param in prompts:
        max_new = _reply_length(request, engine, len(ids), req.max_tokens, 16, param)
        jobs.append(Job(ids, _settings(request, engine, req, max_new, raw=True), logprobs=req.logprobs,
                        echo=bool(req.echo)))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name,
            "object": "text_completion", "system_fingerprint": engine.fingerprint}

    if req.stream:
        def chunk(text):
            if text is None:
                return None
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}

        def final(result: Result):
            yield {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": result.finish_reason, "stop_reason": result.stop_reason}]}
            if req.stream_options and req.stream_options.include_usage:
                yield {**head, "choices": [], "usage": _usage(len(prompts[0][1]), result.completion_tokens)}

        return _stream(served, jobs[0], chunk, final)

    done = await _results(request, served, jobs)
    if done is None:
        return _gone()
    choices = [{"index": i, "text": (text if req.echo else "") + result.text, "finish_reason": result.finish_reason,
                "stop_reason": result.stop_reason,
                "logprobs": completion_logprobs(result.logprobs) if result.logprobs is not None else None}
               for i, ((text, _, _), result) in enumerate(zip(prompts, done))]
    if req.return_token_ids:
        for choice, result in zip(choices, done):
            choice["token_ids"] = result.token_ids
    return JSONResponse({**head, "choices": choices, "usage": _usage(sum(len(ids) for _, ids, _ in prompts),
                                                                     sum(r.completion_tokens for r in done))})
