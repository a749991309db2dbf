"""What no request can do to the server: ask past its limits, stall others with stop strings, keep
generating for a client that has gone, or keep it running after SIGTERM."""

import http.client
import json
import os
import queue
import random
import re
import signal
import socket
import string
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import TIMEOUT, popen_server

from rtune.render import Renderer
from rtune.serve.app import create_app
from rtune.serve.engine import Engine
from rtune.serve.server import ServerThread


def post(url, path, body, timeout=TIMEOUT):
    """(status, JSON body, seconds) of one POST."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    start = time.monotonic()
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), time.monotonic() - start
    finally:
        conn.close()


def chat(content="Give three tips", **kw):
    return {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 4, **kw}


@pytest.fixture(scope="module")
def small_limits(tiny_model_path):
    from rtune.infer.load import load_for_inference

    model, tok, renderer = load_for_inference(str(tiny_model_path), dtype=torch.float32, device="cpu")
    engine = Engine(model, tok, renderer, "m", spec=str(tiny_model_path))
    app = create_app(engine, max_tokens=8, max_tokens_limit=32, max_prompt_tokens=64, max_stop_chars=100)
    with ServerThread(app) as server:
        yield server.url, engine


LIMITED = [
    ("/v1/chat/completions", chat(max_tokens=33), "max_tokens", "invalid_value"),
    ("/v1/chat/completions", chat(max_completion_tokens=33), "max_tokens", "invalid_value"),
    ("/v1/chat/completions", chat("word " * 80), "messages", "prompt_too_long"),
    ("/v1/chat/completions", chat(stop=["x" * 101]), "stop", "invalid_value"),
    ("/v1/chat/completions", chat(stop=["x" * 60, "y" * 41]), "stop", "invalid_value"),  # together
    ("/v1/chat/completions", chat(stop="x" * 100_000), "stop", "invalid_value"),
    ("/v1/chat/completions", chat(stop_token_ids=[10**6]), "stop_token_ids", "invalid_value"),
    ("/v1/chat/completions", chat(stop_token_ids=list(range(65))), "stop_token_ids", "invalid_value"),
    ("/v1/chat/completions", chat(stop_token_ids="5"), "stop_token_ids", "invalid_value"),
    ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 33}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "m", "prompt": list(range(3, 70))}, "prompt", "prompt_too_long"),
    ("/v1/completions", {"model": "m", "prompt": ["hi", "word " * 80]}, "prompt[1]", "prompt_too_long"),
    ("/v1/completions", {"model": "m", "prompt": "hi", "stop": ["x" * 101]}, "stop", "invalid_value"),
    ("/v1/completions", {"model": "m", "prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids", "invalid_value"),
]


@pytest.mark.parametrize("path, body, param, code", LIMITED, ids=range(len(LIMITED)))
def test_limits_answer_400_in_openai_shape(small_limits, path, body, param, code):
    url, _ = small_limits
    status, reply, seconds = post(url, path, body)
    assert status == 400, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert (reply["error"]["type"], reply["error"]["param"], reply["error"]["code"]) == (
        "invalid_request_error", param, code)
    assert seconds < 5
    # Just under the limits: answered.
    assert post(url, "/v1/chat/completions", chat(max_tokens=32, stop=["x" * 60, "y" * 40]))[0] == 200


def test_the_openai_client_sees_the_limits_and_the_models_fingerprint(small_limits):
    url, engine = small_limits
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**chat(max_tokens=1000))
    assert "--max-tokens-limit" in e.value.message and e.value.body["param"] == "max_tokens"
    # The default reply length is --max-tokens (8), under the ceiling.
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert reply.usage.completion_tokens <= 8

    from rtune.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(engine.spec, engine.renderer)["id"]
    card = client.models.list().data[0]
    assert (card.rtune_fingerprint, card.dtype, card.device) == (fingerprint, "fp32", "cpu")
    assert reply.system_fingerprint == fingerprint
    done = client.completions.create(model="m", prompt="hi", max_tokens=2, extra_body={"stop_token_ids": [5]})
    assert done.system_fingerprint == fingerprint


def _random_strings(rng, n, size):
    return ["".join(rng.choices(string.ascii_letters + string.digits + " ", k=size)) for _ in range(n)]


def test_new_stop_sets_do_not_hold_other_requests(gemma_tokenizer, gemma_vocab_model):
    """Gemma's 262k vocabulary: a 100 kB stop string and twenty requests with sixteen new ~48-character
    stop strings each, sent beside a plain request, which is answered about as fast as alone."""
    renderer = Renderer(gemma_tokenizer)
    engine = Engine(gemma_vocab_model, gemma_tokenizer, renderer, "m")
    app = create_app(engine, max_stop_chars=200_000, max_batch_size=32, max_queue=64)
    rng = random.Random(0)
    with ServerThread(app) as server:
        post(server.url, "/v1/chat/completions", chat(max_tokens=16))  # warm
        alone = min(post(server.url, "/v1/chat/completions", chat(max_tokens=16))[2] for _ in range(3))
        with ThreadPoolExecutor(22) as pool:
            huge = pool.submit(post, server.url, "/v1/chat/completions",
                               chat(max_tokens=16, stop=_random_strings(rng, 1, 100_000)))
            many = [pool.submit(post, server.url, "/v1/chat/completions",
                                chat(f"prompt {i}", max_tokens=16, stop=_random_strings(rng, 16, 48)))
                    for i in range(20)]
            time.sleep(0.05)
            status, _, beside = post(server.url, "/v1/chat/completions", chat(max_tokens=16))
            assert status == 200 and beside < max(5.0, 5 * alone), (beside, alone)
            status, _, seconds = huge.result(TIMEOUT)
            assert status == 200 and seconds < 5, seconds
            assert [f.result(TIMEOUT)[0] for f in many] == [200] * 20


def _hold_forward(engine):
    """Make the engine's forward wait on a gate (returned, set = open)."""
    gate = threading.Event()
    gate.set()
    forward = engine.forward

    def gated(*args, **kwargs):
        assert gate.wait(TIMEOUT), "the test gate never opened"
        return forward(*args, **kwargs)

    engine.forward = gated
    return gate


def test_a_client_that_disconnects_cancels_its_job(endless_model_path):
    from rtune.infer.load import load_for_inference

    model, tok, renderer = load_for_inference(str(endless_model_path), dtype=torch.float32, device="cpu")
    engine = Engine(model, tok, renderer, "m")
    gate = _hold_forward(engine)
    app = create_app(engine, max_tokens_limit=4000, max_batch_size=1)
    scheduler = app.state.models["m"].scheduler
    u = None
    with ServerThread(app) as server:
        u = urllib.parse.urlsplit(server.url)
        body = json.dumps({"model": "m", "prompt": "The quick", "max_tokens": 4000, "temperature": 0})

        def send():
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            return conn

        running = send()
        deadline = time.monotonic() + TIMEOUT
        while scheduler.snapshot()["steps"] < 5:  # generating (4000 tokens would take many seconds)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = send()  # the batch holds one row: this one waits in the queue
        while scheduler.queued < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.clear()  # hold the model while both clients go
        for conn in (waiting, running):
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
        while scheduler.stats["cancelled"] < 1:  # seen while the model is held
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        while scheduler.stats["cancelled"] < 2 or scheduler.running or scheduler.queued:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = scheduler.snapshot()
        assert (stats["cancelled"], stats["finished"]) == (2, 0) and stats["steps"] < 3000
        status, reply, _ = post(server.url, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3})
        assert status == 200 and reply["usage"]["completion_tokens"] == 3


def test_sigterm_stops_a_server_in_the_middle_of_a_batch(endless_model_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = popen_server(["serve", str(endless_model_path), "--port", "0", "--model-name", "m", "--max-tokens-limit",
                         "8000"], stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    pool = ThreadPoolExecutor(4)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            m = re.search(r"listening on (http://\S+)/v1", lines.get(timeout=max(0.1, deadline - time.monotonic())))
            url = m.group(1) if m else None
        body = {"model": "m", "prompt": "The quick", "max_tokens": 8000, "temperature": 0}
        replies = [pool.submit(post, url, "/v1/completions", {**body, "prompt": p}, 120) for p in ("a", "b", "c")]
        u = urllib.parse.urlsplit(url)
        while True:  # until all three are in the running batch
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
            conn.request("GET", "/stats")
            stats = json.loads(conn.getresponse().read())["models"]["m"]
            conn.close()
            if stats["running"] == 3 and stats["steps"] > 20:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        seconds = time.monotonic() - start
        assert seconds < 5, seconds
        answered = 0
        for f in replies:  # each answered 503 (or its connection closed by the exit)
            try:
                status, reply, _ = f.result(TIMEOUT)
            except (ConnectionError, http.client.HTTPException):
                continue
            assert status == 503 and reply["error"]["code"] == "shutting_down"
            answered += 1
        assert answered >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pool.shutdown(wait=False, cancel_futures=True)
    assert proc.returncode in (0, -signal.SIGTERM)
