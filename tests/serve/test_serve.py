"""`rtune serve` end to end: a real uvicorn server on 127.0.0.1 (a free port) with a tiny random Llama,
driven by the openai client (sync and async), curl and raw HTTP. Every request loop is bounded."""

import asyncio
import contextlib
import http.client
import json
import logging
import os
import queue
import re
import socket
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import torch
from conftest import popen_server

from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.infer.load import load_for_inference
from rtune.serve.app import create_app
from rtune.serve.engine import Engine, _EndIdsOnly
from rtune.serve.server import ServerThread

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Give three tips for staying healthy."}]
PROMPTS = ["The quick brown fox", "Give three tips", "1. First\n2. Second", "Héllo wörld", "emoji 🙂 and tabs",
           "naïve café", "sleep and exercise", "jumps over the lazy dog"]
TIMEOUT = 60


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    return load_for_inference(str(tiny_model_path), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def served(loaded, gated_engine_class):
    model, tokenizer, renderer = loaded
    engine = gated_engine_class(model, tokenizer, renderer, MODEL)
    app = create_app(engine, max_batch_size=8, batch_wait_ms=20, max_queue=8, max_tokens=16)
    with ServerThread(app) as server:
        yield SimpleNamespace(url=server.url, engine=engine, scheduler=app.state.models[MODEL].scheduler, model=model,
                              tokenizer=tokenizer, renderer=renderer)
    assert not server.thread.is_alive()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def raw(url, method, path, body=None, headers=None, chunked=False):
    """(status, lower-cased headers, body bytes) of one plain HTTP request."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
            conn.request(method, path, body=iter(pieces), headers=h, encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(served, path, body, **kw):
    status, headers, data = raw(served.url, "POST", path, body, **kw)
    return status, headers, json.loads(data)


def chat_body(messages=HELLO, **kw):
    return {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 8, **kw}


def wait_until(predicate, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def direct(served, prompt_ids, max_new_tokens=8, raw_stops=False, **kw):
    """What rtune's own generation answers (greedy), for comparison with the server."""
    stops = _EndIdsOnly(served.renderer.stop_ids) if raw_stops else served.renderer
    config = GenerationConfig(max_new_tokens=max_new_tokens, **kw)
    return generate_ids(served.model, served.tokenizer, stops, [prompt_ids], config)[0]


def forward_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward pass, and the log-softmax rows."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))], logp


# -- the API as clients see it --------------------------------------------------------------------
def test_models_and_a_chat_reply_in_the_models_own_template(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "rtune"

    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
    prompt = served.renderer.render_chat_prompt(HELLO)
    expected = direct(served, prompt)
    choice = reply.choices[0]
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == MODEL
    assert abs(reply.created - time.time()) < 120
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == expected.num_tokens + (expected.stop_id is not None)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    # A multi-turn history is rendered as a whole; list-of-text-parts content is joined text.
    history = HELLO + [{"role": "assistant", "content": "Eat well."},
                       {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "more?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=6)
    flat = history[:2] + [{"role": "user", "content": "And more?"}]
    assert reply.choices[0].message.content == direct(served, served.renderer.render_chat_prompt(flat), 6).text


def test_stop_strings_and_length(served, client):
    long = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=16)
    text = long.choices[0].message.content
    # A stop string from the middle of the greedy reply: the reply ends before it (and its whitespace).
    k = next(i for i in range(2, len(text) - 1) if all(c.isascii() and c.isprintable() and not c.isspace()
                                                         for c in text[i : i + 2]))
    stop = text[k : k + 2]
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=16, stop=[stop, "zzzz"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)].rstrip()
    assert cut.usage.completion_tokens < long.usage.completion_tokens

    short = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


@contextlib.contextmanager
def forced_eos(served):
    """The model's next token is its end token, whatever the prompt."""
    eos = served.tokenizer.eos_token_id

    def force_eos(module, args, kwargs, output):
        output.logits[:, -1, eos] += 1e4
        return output

    handle = served.model.register_forward_hook(force_eos, with_kwargs=True)
    try:
        yield eos
    finally:
        handle.remove()


def test_end_of_turn_is_finish_stop_and_completions_show_the_end_token(served, client):
    with forced_eos(served):
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8, logprobs=True)
        assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == 1 and reply.choices[0].logprobs.content == []

        done = client.completions.create(model=MODEL, prompt="The quick", max_tokens=1, echo=True, logprobs=1,
                                         temperature=0)
        ids = served.tokenizer("The quick")["input_ids"]
        lp = done.choices[0].logprobs
        assert done.choices[0].finish_reason == "stop" and done.choices[0].text == "The quick"
        assert len(lp.tokens) == len(ids) + 1 and lp.tokens[-1] == "<eos>"  # what likelihood clients slice off


def test_completions_name_the_stop_and_return_token_ids_as_vllm_does(served, client):
    prompt = "The quick brown"
    long = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                     extra_body={"return_token_ids": True})
    choice = long.model_dump()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert served.tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    assert len(choice["token_ids"]) == long.usage.completion_tokens == 12
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert "token_ids" not in plain.model_dump()["choices"][0]  # only when asked

    text = choice["text"]
    k = next(i for i in range(1, len(text) - 1) if text[i : i + 2].strip() == text[i : i + 2] and text[i:i + 2].isprintable())
    stop = text[k : k + 2]
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                    stop=["zzzz", stop], extra_body={"return_token_ids": True}).model_dump()["choices"][0]
    assert (cut["finish_reason"], cut["stop_reason"]) == ("stop", stop)
    assert cut["text"] == text[: text.find(stop)].rstrip()
    # The ids cover the text up to the stop string: cut as the HF path cuts its own.
    assert served.tokenizer.decode(cut["token_ids"], skip_special_tokens=True).startswith(cut["text"])

    with forced_eos(served) as eos:
        ended = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8,
                                          extra_body={"return_token_ids": True}).model_dump()["choices"][0]
    assert (ended["finish_reason"], ended["stop_reason"], ended["token_ids"]) == ("stop", None, [eos])


def test_streaming_matches_the_plain_reply(served, client):
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    # On the wire: server-sent events, each `data: {json}`, the last `data: [DONE]`.
    status, headers, body = raw(served.url, "POST", "/v1/chat/completions", chat_body(stream=True))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])

    # A streamed raw completion too.
    parts = list(client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=0,
                                           stream=True))
    whole = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_logprobs_are_the_models(served, client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    prompt = served.renderer.render_chat_prompt(HELLO)
    generated = direct(served, prompt, 6).token_ids
    content = reply.choices[0].logprobs.content
    assert len(content) == len(generated) == reply.usage.completion_tokens
    expected, logp = forward_logprobs(served.model, prompt + generated)
    for t, entry in enumerate(content):
        assert entry.token == served.tokenizer.decode([generated[t]])
        assert entry.logprob == pytest.approx(expected[len(prompt) - 1 + t], abs=1e-4)
        tops = [a.logprob for a in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy: the chosen token is the most likely
        best = logp[len(prompt) - 1 + t].topk(3).values.tolist()
        assert tops == pytest.approx(best, abs=1e-4)
        assert entry.bytes == list(entry.token.encode()) or "\ufffd" in entry.token
    # Without logprobs there are none.
    assert client.chat.completions.create(**chat_body()).choices[0].logprobs is None


def test_completions_echo_logprobs_match_a_forward_pass(served, client):
    """What lm-eval's local-completions sends for log-likelihoods: token ids, echo, max_tokens 0 or 1."""
    ids = served.tokenizer("Give three tips for staying healthy.")["input_ids"]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    expected, _ = forward_logprobs(served.model, ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.text_offset[0] == 0
    for t in range(1, len(ids)):  # offsets point into the returned text (the BOS takes no room there)
        assert choice.text[choice.logprobs.text_offset[t] :].startswith(choice.logprobs.tokens[t])
    assert choice.text == served.tokenizer.decode(ids, skip_special_tokens=True)
    for t in range(1, len(ids)):
        top = choice.logprobs.top_logprobs[t]
        assert top[choice.logprobs.tokens[t]] == pytest.approx(choice.logprobs.token_logprobs[t])
        assert len(top) <= 3  # the two most likely, plus the actual token when it is not among them
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    assert choice.finish_reason == "length"

    # Text prompts, several at once (lm-eval batches them), max_tokens 1: prompt tokens + one generated.
    texts = ["The quick brown fox", "1. First\n2. Second"]
    out = client.completions.create(model=MODEL, prompt=texts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for text, c in zip(texts, out.choices):
        ids = served.tokenizer(text)["input_ids"]
        g = direct(served, ids, 1, raw_stops=True)
        full = ids + (g.token_ids or [g.stop_id])
        assert c.text == text + g.text and len(c.logprobs.token_logprobs) == len(ids) + 1
        assert c.logprobs.token_logprobs[1:] == pytest.approx(forward_logprobs(served.model, full)[0], abs=1e-4)

    # Plain completion: the raw prompt continues with the model's greedy tokens.
    out = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=5, temperature=0)
    expected = direct(served, served.tokenizer("The quick brown")["input_ids"], 5, raw_stops=True)
    assert out.choices[0].text == expected.text and out.id.startswith("cmpl-")


def test_seeded_sampling_repeats(served, client):
    def sample(seed):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=1.0, top_p=0.95, seed=seed,
                                           max_tokens=12)
        return r.choices[0].message.content

    assert sample(123) == sample(123)
    assert sample(123) != sample(124)


# -- batching -------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_and_answer_as_serial_ones(served):
    serial_client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
    scheduler = served.scheduler
    serial = [serial_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                    temperature=0, max_tokens=8).choices[0].message.content
              for p in PROMPTS]

    async def together(hold: bool):
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        blocker = None
        if hold:  # keep the model busy so that all requests are queued before the next prefill
            served.engine.gate.clear()
            entered = served.engine.entered
            blocker = asyncio.create_task(client.chat.completions.create(
                model=MODEL, messages=HELLO, temperature=0, max_tokens=1))
            deadline = time.monotonic() + TIMEOUT
            while served.engine.entered == entered:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=8)) for p in PROMPTS]
        if hold:
            deadline = time.monotonic() + TIMEOUT
            while scheduler.queued < len(PROMPTS):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            served.engine.gate.set()
            await blocker
        replies = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        await client.close()
        return [r.choices[0].message.content for r in replies]

    try:
        rows = scheduler.step_rows.copy()
        assert asyncio.run(together(hold=True)) == serial
        grew = scheduler.step_rows - rows
        assert grew[len(PROMPTS)] >= 1 and max(grew) == len(PROMPTS)  # all eight stepped as one batch

        # Without holding: requests that arrive together still share steps.
        rows = scheduler.step_rows.copy()
        assert asyncio.run(together(hold=False)) == serial
        assert max(scheduler.step_rows - rows) > 1
    finally:
        served.engine.gate.set()


def test_a_full_queue_answers_429_and_then_serves_again(served):
    engine, scheduler = served.engine, served.scheduler
    engine.gate.clear()
    pool = ThreadPoolExecutor(max_workers=scheduler.max_queue + 1)
    try:
        entered = engine.entered
        running = pool.submit(post, served, "/v1/chat/completions", chat_body(max_tokens=2))
        wait_until(lambda: engine.entered > entered, "the first batch to start")
        queued = [pool.submit(post, served, "/v1/chat/completions", chat_body(max_tokens=3))
                  for _ in range(scheduler.max_queue)]
        wait_until(lambda: scheduler.queued == scheduler.max_queue, "the queue to fill")

        status, headers, body = post(served, "/v1/chat/completions", chat_body())
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
        assert "busy" in body["error"]["message"]
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**chat_body())
        # A streamed request is refused the same way, before its stream starts.
        status, _, _ = raw(served.url, "POST", "/v1/chat/completions", chat_body(stream=True))
        assert status == 429
        assert scheduler.queued == scheduler.max_queue  # nothing was added

        engine.gate.set()
        assert running.result(TIMEOUT)[0] == 200
        assert [f.result(TIMEOUT)[0] for f in queued] == [200] * scheduler.max_queue
    finally:
        engine.gate.set()
        pool.shutdown(wait=True)
    assert post(served, "/v1/chat/completions", chat_body())[0] == 200


# -- bad requests -----------------------------------------------------------------------------------
BAD = [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    ({"model": MODEL}, "messages", "missing_field"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}, "messages",
     "invalid_prompt"),  # the tulu template has no system turn
    ({"messages": HELLO + [{"role": "assistant", "content": "ok"}]}, "messages", "invalid_prompt"),
    (chat_body(max_tokens="ten"), "max_tokens", "invalid_value"),
    (chat_body(max_tokens=True), "max_tokens", "invalid_value"),
    (chat_body(max_tokens=0), "max_tokens", "invalid_value"),
    (chat_body(temperature="hot"), "temperature", "invalid_value"),
    (chat_body(temperature=3), "temperature", "invalid_value"),
    (chat_body(top_p=0), "top_p", "invalid_value"),
    (chat_body(stop=5), "stop", "invalid_type"),
    (chat_body(stop=[""]), "stop", "invalid_value"),
    (chat_body(stream="yes"), "stream", "invalid_value"),
    (chat_body(n=2), "n", "unsupported"),
    (chat_body(top_logprobs=2), "top_logprobs", "invalid_value"),
    (chat_body(messages=[{"role": "user", "content": "word " * 600}]), "messages", "context_length_exceeded"),
    (chat_body(max_tokens=600), "messages", "context_length_exceeded"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None, "invalid_json"),
]


@pytest.mark.parametrize("body,param,code", BAD, ids=range(len(BAD)))
def test_bad_chat_requests_get_400(served, body, param, code):
    status, _, reply = post(served, "/v1/chat/completions", body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code) and len(error["message"]) > 10
    assert post(served, "/v1/chat/completions", chat_body(max_tokens=1))[0] == 200  # still serving


def test_other_bad_requests_and_the_server_keeps_serving(served):
    cases = [
        ({"model": MODEL, "prompt": [], "max_tokens": 1}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": [[]], "max_tokens": 1}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": [10**9], "max_tokens": 1}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": [1, "a"], "max_tokens": 1}, 400, "invalid_type"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 99}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": "hi " * 600}, 400, "context_length_exceeded"),
        ({"model": MODEL, "prompt": "hi", "stream": True, "echo": True}, 400, "unsupported"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ]
    for body, status, code in cases:
        got, _, reply = post(served, "/v1/completions", body)
        assert (got, reply["error"]["code"]) == (status, code), (body, reply)
    assert raw(served.url, "GET", "/nowhere")[0] == 404
    assert raw(served.url, "GET", "/v1/chat/completions")[0] == 405

    # Oversized bodies: refused before parsing, by Content-Length or (chunked) as they arrive.
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (1 << 20)}])).encode()
    for chunked in (False, True):
        status, _, reply = post(served, "/v1/chat/completions", big, chunked=chunked)
        assert status == 400 and reply["error"]["code"] == "request_too_large"
    status, _, reply = post(served, "/v1/completions", {"model": MODEL, "prompt": "The quick", "max_tokens": 2})
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_generation_error_is_a_500_and_the_server_goes_on(served, client):
    served.engine.fail = RuntimeError("the accelerator caught fire")
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(**chat_body())
        assert e.value.status_code == 500 and "caught fire" in str(e.value)
        status, _, body = post(served, "/v1/completions", {"model": MODEL, "prompt": "The quick", "max_tokens": 2})
        assert status == 500 and body["error"]["type"] == "server_error" and "caught fire" in body["error"]["message"]
    finally:
        served.engine.fail = None
    assert client.chat.completions.create(**chat_body()).choices[0].finish_reason in ("stop", "length")


def test_an_error_while_streaming_is_an_error_event(served):
    served.engine.fail = RuntimeError("boom")
    try:
        status, _, data = raw(served.url, "POST", "/v1/chat/completions", chat_body(stream=True))
    finally:
        served.engine.fail = None
    events = [e for e in data.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["type"] == "server_error" and "boom" in error["message"]


def test_a_client_that_leaves_a_stream_stops_its_generation(served):
    u = urllib.parse.urlsplit(served.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    cancelled = served.scheduler.stats["cancelled"]
    served.engine.gate.clear()  # the stream starts, then waits for the gate at its next step
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(stream=True, max_tokens=400)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the stream started
        wait_until(lambda: served.scheduler.running + served.scheduler.queued == 1, "the job to be taken")
        sock = conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        resp.close()
        conn.close()
    finally:
        served.engine.gate.set()
    wait_until(lambda: served.scheduler.stats["cancelled"] > cancelled, "the stream's job to be cancelled")
    wait_until(lambda: served.scheduler.running == 0, "the job to leave the batch")
    assert post(served, "/v1/chat/completions", chat_body())[0] == 200


def test_curl(served):
    base = ["curl", "-sS", "--max-time", str(TIMEOUT), "-H", "Content-Type: application/json"]
    out = subprocess.run([*base, served.url + "/v1/chat/completions", "-d", json.dumps(chat_body())],
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"

    out = subprocess.run([*base, "-N", served.url + "/v1/chat/completions", "-d", json.dumps(chat_body(stream=True))],
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.stdout.rstrip().endswith("data: [DONE]")

    out = subprocess.run([*base, "-o", "/dev/null", "-w", "%{http_code}", served.url + "/v1/chat/completions",
                          "-d", "{oops"], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.stdout == "400"


# -- API key and logging ----------------------------------------------------------------------------
def test_api_key_is_required_and_never_logged(loaded, caplog):
    caplog.set_level(logging.INFO, logger="rtune.serve")
    model, tokenizer, renderer = loaded
    key = "sk-test-8c1f0e77"
    app = create_app(Engine(model, tokenizer, renderer, MODEL), api_key=key, max_tokens=4)
    with ServerThread(app) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            status, _, body = raw(server.url, "POST", "/v1/chat/completions", chat_body(), headers=headers)
            assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
            assert raw(server.url, "GET", "/v1/models", headers=headers)[0] == 401
        assert raw(server.url, "GET", "/health")[0] == 200

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
        secret_prompt = "zebra-canary-prompt"
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": secret_prompt}],
                                               temperature=0, max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    logs = caplog.text
    assert key not in logs and secret_prompt not in logs
    assert re.search(r"POST /v1/chat/completions 401 [\d.]+ms", logs)
    assert re.search(r"POST /v1/chat/completions 200 [\d.]+ms", logs)


def test_rtune_serve_command(tiny_model_path):
    """`rtune serve --port 0` prints the port it got, serves, and stops on SIGTERM."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RTUNE_API_KEY": "k-env"}
    proc = popen_server(["serve", str(tiny_model_path), "--port", "0", "--model-name", "tiny-cli"],
                        stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))  # queue.Empty: it never said
            m = re.search(r"listening on (http://\S+)/v1", line)
            url = m.group(1) if m else None
        client = openai.OpenAI(base_url=url + "/v1", api_key="k-env", max_retries=2, timeout=TIMEOUT)
        assert [m.id for m in client.models.list().data] == ["tiny-cli"]
        assert client.chat.completions.create(model="tiny-cli", messages=HELLO, max_tokens=2).usage.completion_tokens
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode in (0, -15)  # uvicorn re-raises the SIGTERM it handled once it has shut down
