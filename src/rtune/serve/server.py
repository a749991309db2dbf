"""Running the app: `serve` (what `rtune serve` calls) and `ServerThread` (a server in a background thread).

The listening socket is bound here, before uvicorn starts, so `--port 0` picks a free port and the
log line `rtune serve: listening on http://HOST:PORT/v1` names the real one. Loopback by default;
listening elsewhere without an API key is allowed but warned about.

SIGTERM or Ctrl-C stops generation at once (`stop_generating`: the model threads stop after their
current step, and waiting and running requests answer 503), so uvicorn's shutdown does not wait on
replies that could take minutes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Self

from rtune.errors import RtuneError
from rtune.redact import redact_url

logger = logging.getLogger("rtune.serve")

DTYPES = ("auto", "fp32", "bf16", "fp16")


def _dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return None
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    except KeyError:
        raise RtuneError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: a free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise RtuneError(f"cannot listen on {host}:{port}: {e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app):
    import uvicorn

    from rtune.serve.app import stop_generating

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            stop_generating(app)  # the shutdown then waits on no reply

    # log_config=None: rtune's logging stays as it is; the access log is rtune.serve's own (no bodies).
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=30)
    return Server(config)


def serve(model_or_run: str | list[str] = (), *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          template: str | None = None, model_name: str | None = None, dtype: str | None = None,
          max_batch_size: int = 16, batch_wait_ms: float = 10.0, max_queue: int = 64,
          max_body_bytes: int = 1 << 20, max_tokens: int = 512, icl_file: str | None = None,
          max_tokens_limit: int = 4096, max_prompt_tokens: int = 8192, max_stop_chars: int = 4096,
          endpoints: list[str] = (), rate_dir: str | None = None) -> None:
    """Load models, run folders or merged folders and serve them until interrupted (Ctrl-C, SIGTERM).

    model_or_run: one spec or several, each `[NAME=]MODEL_OR_RUN[+FORMAT]` (rtune.serve.specs);
    template urial | urial-r | zero-shot serves plain models in context (demonstrations from
    icl_file); endpoints: `NAME=URL[#MODEL]` of other servers, proxied; rate_dir: an evaluation
    folder to rate blind at /rate (with no model: the rating page alone, `rtune rate`)."""
    from dataclasses import replace

    from rtune.serve.app import Limits, create_app
    from rtune.serve.specs import check_unique, load_engines, parse_endpoint, parse_model_spec

    if max_batch_size < 1 or max_queue < 1 or batch_wait_ms < 0 or max_body_bytes < 1:
        raise RtuneError("--max-batch-size, --max-queue and --max-body-bytes must be >= 1, --batch-wait-ms >= 0")
    limits = Limits(max_tokens, max_tokens_limit, max_prompt_tokens, max_stop_chars).check()
    specs = [parse_model_spec(m) for m in ([model_or_run] if isinstance(model_or_run, str) else model_or_run)]
    if model_name:
        if len(specs) != 1:
            raise RtuneError("--model-name names the one model served; with several, write NAME=MODEL_OR_RUN")
        specs = [replace(specs[0], name=model_name)]
    remote = [parse_endpoint(e) for e in endpoints]
    check_unique([s.name for s in specs] + [e.name for e in remote])
    if not specs and not remote and rate_dir is None:
        raise RtuneError("nothing to serve: give a model, an --endpoint or --rate EVAL_DIR")
    torch_dtype = _dtype(dtype)
    sock = bind_socket(host, port)  # before the (slow) load: a taken port fails at once
    if not _is_loopback(host) and not api_key:
        logger.warning("listening on %s without an API key: anyone who can reach it can use the models%s "
                       "(set --api-key or RTUNE_API_KEY)", host, " and write ratings" if rate_dir else "")
    try:
        engines = load_engines(specs, dtype=torch_dtype, template=template, icl_file=icl_file)
        for engine in engines:
            engine.fingerprint  # before listening: the digests are read once, here
        app = create_app(engines, api_key=api_key, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                         max_queue=max_queue, max_body_bytes=max_body_bytes, max_tokens=limits.max_tokens,
                         max_tokens_limit=limits.max_tokens_limit, max_prompt_tokens=limits.max_prompt_tokens,
                         max_stop_chars=limits.max_stop_chars, endpoints=remote, rate_dir=rate_dir)
    except BaseException:
        sock.close()
        raise
    sock.listen(2048)  # connections from now on wait for uvicorn instead of being refused
    for name, served in app.state.models.items():
        engine = served.engine
        shared = f", weights shared with {served.scheduler.engine.name!r}" if served.scheduler.engine is not engine else ""
        logger.info("model %r: %s, template %s, fingerprint %s, %s, context %s tokens%s", name, engine.spec,
                    engine.renderer.template_name, engine.fingerprint, engine.dtype, engine.context, shared)
    for e in remote:
        logger.info("model %r: endpoint %s (upstream model %r, key from $%s%s)", e.name, redact_url(e.url), e.model,
                    e.key_env, "" if e.api_key() else ": not set")
    if rate_dir is not None:
        logger.info("rating %s: ratings go to %s", rate_dir, app.state.rating.eval_dir / "human")
    page = "the rating page at " + _url(sock) + "/rate" if not app.state.models and not remote else \
        "the chat page at " + _url(sock) + "/" + (" and the rating page at /rate" if rate_dir is not None else "")
    logger.info("rtune serve: listening on %s/v1 (batches of up to %d, queue %d%s); %s", _url(sock), max_batch_size,
                max_queue, ", API key required" if api_key else "", page)
    _uvicorn_server(app).run(sockets=[sock])


class ServerThread:
    """An app served by uvicorn in a background thread on host:port (port 0: a free one).

        with ServerThread(create_app(engine)) as server:
            OpenAI(base_url=server.url + "/v1", api_key="none")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.sock = bind_socket(host, port)
        self.url = _url(self.sock)
        self.server = _uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="rtune-serve")

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if hasattr(self.app, "state") and hasattr(self.app.state, "models"):
            from rtune.serve.app import stop_generating

            stop_generating(self.app)
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def api_key_from_env(given: str | None) -> str | None:
    """--api-key, else the RTUNE_API_KEY environment variable (which keeps the key out of `ps`)."""
    return given or os.environ.get("RTUNE_API_KEY") or None
