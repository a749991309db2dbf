"""The judge client against a fake OpenAI-compatible endpoint on loopback that injects faults.

The fake (FastAPI, served by uvicorn in a background thread on 127.0.0.1, stopped at the end of the
module) answers chat completions with a text derived from the messages (and top_logprobs when asked),
and fails a share of the requests on purpose: sleeps past the client's timeout, HTTP 500, HTTP 429
with Retry-After, a garbage (non-JSON) body, truncated JSON. It logs every request it sees, so the
tests compare the client's counters with what the server saw.
"""

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from email.utils import formatdate

import pytest

import fastapi  # noqa: E402  (hard dependencies of rtune: a broken install fails here, never skips)
import openai  # noqa: E402,F401
import uvicorn  # noqa: E402

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

from rtune.eval.judges.client import (  # noqa: E402
    PLACEHOLDER_API_KEY,
    JudgeClient,
    JudgeRequest,
    backoff_delay,
    parse_chat_completion,
    parse_retry_after,
)

API_KEY = "sk-rtune-test-7f3a91c2e5d84b06"
OTHER_KEY = "sk-rtune-fallback-0c1d2e3f4a5b"
MODEL = "fake-judge"
TV = "test-template-v1"
KINDS = ("slow", "server_error", "rate_limit", "garbage", "truncated")  # faults injected at random
# server fault -> the client's reason for that failed attempt
REASON = {"slow": "timeout", "server_error": "server_error", "always_503": "server_error",
          "rate_limit": "rate_limit", "garbage": "invalid_response", "truncated": "invalid_response",
          "always_garbage": "invalid_response", "always_400": "client_error"}
TIMEOUT = 2.0  # generous: on a loaded 2-core machine an ordinary answer must never count as a timeout
RETRY_AFTER = 0.25


# -- the fake endpoint ------------------------------------------------------------------------------
def reply_text(messages) -> str:
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    return f"Output {int(digest[:2], 16) % 2 + 1} is better [{digest[:10]}]"


def reply_tokens(text: str) -> list[str]:
    return [text[i:i + 4] for i in range(0, len(text), 4)]


def prompt_tokens(messages) -> int:
    return len(json.dumps(messages)) // 4


class FakeJudge:
    def __init__(self):
        self.lock = threading.Lock()
        self.base_url = None
        self.reset()
        self.app = self._build_app()

    def reset(self, *, api_key=API_KEY, fault_rate=0.4, max_faults=2, delay=0.0, slow_s=2 * TIMEOUT + 0.5):
        with self.lock:
            self.api_key = api_key
            self.fault_rate = fault_rate  # chance that an attempt of an item faults...
            self.max_faults = max_faults  # ...while the item has been asked fewer times than this
            self.delay = delay  # seconds before every answer
            self.slow_s = slow_s
            self.log = []  # one dict per request seen: item, n, kind, t, auth
            self.seen = Counter()  # item -> requests seen since reset

    def _decide(self, item: str, n: int) -> str:
        if item.startswith("ALWAYS:400"):
            return "always_400"
        if item.startswith("ALWAYS:garbage"):
            return "always_garbage"
        if item.startswith("ALWAYS:503"):
            return "always_503"
        m = re.match(r"\[item-(\d{3})\]", item)
        if m and int(m.group(1)) < len(KINDS) and n == 0:
            return KINDS[int(m.group(1))]  # every kind occurs at least once
        if n >= self.max_faults:
            return "ok"
        h = hashlib.sha256(f"{item}|{n}".encode()).digest()
        if h[0] / 256 < self.fault_rate:
            return KINDS[h[1] % len(KINDS)]
        return "ok"

    def _completion(self, body: dict) -> dict:
        messages = body["messages"]
        text = reply_text(messages)
        toks = reply_tokens(text)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                  "logprobs": None}
        if body.get("logprobs"):
            k = body.get("top_logprobs") or 0
            content = []
            for i, t in enumerate(toks):
                top = [{"token": t, "logprob": -0.05 * (i + 1), "bytes": list(t.encode())}]
                top += [{"token": f"alt{j}", "logprob": -3.0 - j, "bytes": list(f"alt{j}".encode())}
                        for j in range(k - 1)]
                content.append({"token": t, "logprob": -0.05 * (i + 1), "bytes": list(t.encode()),
                                "top_logprobs": top[:k]})
            choice["logprobs"] = {"content": content}
        pt, ct = prompt_tokens(messages), len(toks)
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [choice], "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = json.loads(await request.body())
            item = body["messages"][-1]["content"]
            auth = request.headers.get("authorization")
            with self.lock:
                n = self.seen[item]
                self.seen[item] += 1
                kind = "unauthorized" if auth != f"Bearer {self.api_key}" else self._decide(item, n)
                self.log.append({"item": item, "n": n, "kind": kind, "t": time.monotonic(), "auth": auth})
                delay, slow_s = self.delay, self.slow_s
            if delay:
                await asyncio.sleep(delay)
            err = {"error": {"message": kind, "type": kind}}
            if kind == "unauthorized":
                return JSONResponse(err, status_code=401)
            if kind == "always_400":
                return JSONResponse(err, status_code=400)
            if kind == "server_error":
                return JSONResponse(err, status_code=500)
            if kind == "always_503":
                return JSONResponse(err, status_code=503)
            if kind == "rate_limit":
                return JSONResponse(err, status_code=429, headers={"Retry-After": str(RETRY_AFTER)})
            if kind in ("garbage", "always_garbage"):
                return Response("<html><body>502 upstream hiccup</body></html>", media_type="text/html")
            full = json.dumps(self._completion(body))
            if kind == "truncated":
                return Response(full[: len(full) // 2], media_type="application/json")
            if kind == "slow":
                await asyncio.sleep(slow_s)  # past the client's timeout
            return Response(full, media_type="application/json")

        return app

    def requests_by_item(self, log=None) -> Counter:
        return Counter(e["item"] for e in (self.log if log is None else log))


@pytest.fixture(scope="module")
def fake():
    judge = FakeJudge()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(judge.app, lifespan="off", log_level="warning", access_log=False, loop="asyncio",
                            http="h11", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-judge")
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake endpoint did not start"
        time.sleep(0.02)
    judge.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield judge
    finally:
        server.should_exit = True
        server.force_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the fake endpoint did not stop"


@pytest.fixture
def api_key_env(monkeypatch):
    monkeypatch.setenv("RTUNE_JUDGE_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for var in ("OPENAI_BASE_URL", "OPENAI_CUSTOM_HEADERS", "OPENAI_LOG"):
        monkeypatch.delenv(var, raising=False)


def make_client(fake, cache, **kw) -> JudgeClient:
    opts = dict(concurrency=8, timeout=TIMEOUT, max_retries=4, max_invalid_retries=2, backoff=0.01,
                max_backoff=0.3, price_per_million=(2.0, 8.0))
    opts.update(kw)
    return JudgeClient(fake.base_url, MODEL, cache, **opts)


def item_messages(content: str) -> list[dict]:
    return [{"role": "system", "content": "You judge outputs."}, {"role": "user", "content": content}]


def make_requests(n: int, prefix: str = "item") -> list[JudgeRequest]:
    out = []
    for i in range(n):
        params = {"max_tokens": 16}
        if i % 2 == 0:
            params.update(logprobs=True, top_logprobs=3)
        out.append(JudgeRequest({"id": f"{prefix}-{i:03d}"}, item_messages(f"[{prefix}-{i:03d}] Which is better?"),
                                params, template_version=TV))
    return out


def comparable(results) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("cached", "attempts")} for r in results]


def cache_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_ok_result(r, request):
    text = reply_text(request.messages)
    assert r["ok"] and r["error"] is None and r["text"] == text and r["finish_reason"] == "stop"
    assert r["usage"] == {"prompt_tokens": prompt_tokens(request.messages), "completion_tokens": len(reply_tokens(text))}
    if request.params.get("top_logprobs"):
        toks = reply_tokens(text)
        assert len(r["top_logprobs"]) == len(toks)
        for i, (pos, tok) in enumerate(zip(r["top_logprobs"], toks)):
            assert len(pos) == 3 and pos[0] == {"token": tok, "logprob": pytest.approx(-0.05 * (i + 1))}
    else:
        assert r["top_logprobs"] is None


# -- pure parts -------------------------------------------------------------------------------------
def test_backoff_is_full_jitter_and_retry_after_is_honoured_but_capped():
    for n in range(6):
        assert backoff_delay(n, backoff=1.0, max_backoff=30.0, rand=lambda: 1.0) == min(30.0, 2.0 ** n)
        assert backoff_delay(n, backoff=1.0, max_backoff=30.0, rand=lambda: 0.0) == 0.0
    assert backoff_delay(10, backoff=1.0, max_backoff=30.0, rand=lambda: 1.0) == 30.0
    assert 0.0 <= backoff_delay(3, backoff=1.0, max_backoff=30.0) <= 8.0
    assert backoff_delay(0, backoff=1.0, max_backoff=30.0, retry_after=7.0, rand=lambda: 0.0) == 7.0
    assert backoff_delay(0, backoff=1.0, max_backoff=30.0, retry_after=600.0) == 30.0
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "150", "retry-after": "9"}) == pytest.approx(0.15)
    assert 8.0 < parse_retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10.5
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_cache_key_covers_model_template_messages_params_not_key_fields(tmp_path):
    c = JudgeClient("http://127.0.0.1:9/v1", MODEL, tmp_path / "c.jsonl")
    msgs = item_messages("x")
    base = JudgeRequest({"id": 1}, msgs, {"max_tokens": 4}, template_version=TV)
    k = c.cache_key(base)
    assert c.cache_key(JudgeRequest({"id": 2, "other": "y"}, msgs, {"max_tokens": 4}, template_version=TV)) == k
    assert c.cache_key(JudgeRequest({}, msgs, {"max_tokens": 4, "temperature": 0}, template_version=TV)) == k
    assert c.cache_key(JudgeRequest({}, msgs, {"max_tokens": 5}, template_version=TV)) != k
    assert c.cache_key(JudgeRequest({}, msgs, {"max_tokens": 4}, template_version="v2")) != k
    assert c.cache_key(JudgeRequest({}, item_messages("y"), {"max_tokens": 4}, template_version=TV)) != k
    assert JudgeClient("http://127.0.0.1:9/v1", "other", tmp_path / "c.jsonl").cache_key(base) != k
    assert (c.cache_key(JudgeRequest({}, msgs, {"top_logprobs": 2}, template_version=TV))
            == c.cache_key(JudgeRequest({}, msgs, {"top_logprobs": 2, "logprobs": True}, template_version=TV)))
    with pytest.raises(ValueError, match="template_version"):
        JudgeRequest({}, msgs, {})
    with pytest.raises(ValueError, match="stream"):
        JudgeRequest({}, msgs, {"stream": True}, template_version=TV)


def test_parse_chat_completion_refuses_what_is_not_a_completion():
    from rtune.eval.judges.client import _AttemptError

    good = {"choices": [{"message": {"content": "2"}, "finish_reason": "stop"}]}
    out = parse_chat_completion(json.dumps(good), want_logprobs=True)
    assert out["text"] == "2" and out["top_logprobs"] is None and not out["usage_reported"]
    for bad in ("", "<html>", '{"choices": [{"message": {"cont', "[]", '{"choices": []}',
                '{"choices": [{"message": {"content": null}}]}',
                '{"choices": [{"message": {"content": "1"}, "logprobs": {"content": [{"token": 1}]}}]}'):
        with pytest.raises(_AttemptError) as e:
            parse_chat_completion(bad, want_logprobs=True)
        assert e.value.reason == "invalid_response"


# -- against the fake endpoint -----------------------------------------------------------------------
def test_faults_are_retried_counted_and_a_second_run_asks_nothing_cached(fake, api_key_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx2"):  # `rtune` commands run by earlier tests quiet these loggers
        caplog.set_level(logging.DEBUG, logger=name)
    fake.reset()
    cache = tmp_path / "judge.jsonl"
    good = make_requests(40)
    bad = [JudgeRequest({"id": kind}, item_messages(f"ALWAYS:{kind} please"), {"max_tokens": 4}, template_version=TV)
           for kind in ("400", "garbage", "503")]
    dup = JudgeRequest({"id": "dup-of-007"}, good[7].messages, dict(good[7].params), template_version=TV)
    reqs = good + bad + [dup]
    client = make_client(fake, cache)
    results = client.judge_many(reqs, progress=False)
    stats = client.stats
    log = list(fake.log)

    # What the server saw: enough faults of every kind, and the key on every request.
    kinds = Counter(e["kind"] for e in log)
    faults = len(log) - kinds["ok"]
    assert faults >= len(log) / 5, kinds
    assert all(kinds[k] >= 1 for k in KINDS), kinds
    assert "unauthorized" not in kinds and {e["auth"] for e in log} == {f"Bearer {API_KEY}"}

    # The client's counters match it.
    assert stats["requests_sent"] == len(log)
    assert stats["successes"] == kinds["ok"] == 40
    assert stats["errors"] == dict(Counter(REASON[e["kind"]] for e in log if e["kind"] != "ok"))
    assert stats["failures"] == 3
    assert stats["failure_reasons"] == {"client_error": 1, "invalid_response": 1, "server_error": 1}
    assert stats["retries_total"] == sum(stats["retries"].values()) == len(log) - 40 - 3
    assert stats["items"] == 44 and stats["duplicates"] == 1 and stats["cache_hits"] == 0
    seen = fake.requests_by_item(log)
    for r, q in zip(results, reqs):
        assert r["attempts"] == seen[q.messages[-1]["content"]], r  # each item's requests, as the server counted
        assert r["key"] == client.cache_key(q) and r["key_fields"] == q.key_fields and not r["cached"]

    # Every item ends as a result or as a failure with its reason.
    for r, q in zip(results[:40], good):
        check_ok_result(r, q)
    by_id = {r["key_fields"]["id"]: r for r in results[40:43]}
    assert by_id["400"]["error"].startswith("client_error: HTTP 400") and by_id["400"]["attempts"] == 3
    assert by_id["garbage"]["error"].startswith("invalid_response") and by_id["garbage"]["attempts"] == 3
    assert by_id["503"]["error"].startswith("server_error: HTTP 503") and by_id["503"]["attempts"] == 5
    assert all(not r["ok"] and r["text"] is None and not r["cached"] for r in by_id.values())
    assert results[43]["text"] == results[7]["text"] and results[43]["key"] == results[7]["key"]
    assert results[43]["key_fields"] == {"id": "dup-of-007"}

    # Tokens and cost are those of the answers.
    pt = sum(r["usage"]["prompt_tokens"] for r in results[:40])
    ct = sum(r["usage"]["completion_tokens"] for r in results[:40])
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (pt, ct)
    assert stats["cost"] == pytest.approx((pt * 2.0 + ct * 8.0) / 1e6)
    assert stats["wall_s"] > 0

    # Retry-After was honoured: the next request for a rate-limited item came no sooner.
    for i, e in enumerate(log):
        if e["kind"] == "rate_limit":
            nxt = next(f for f in log[i + 1:] if f["item"] == e["item"])
            assert nxt["t"] - e["t"] >= RETRY_AFTER - 0.02

    # Successes only are cached, once each; the key is nowhere.
    rows = cache_rows(cache)
    assert len(rows) == 40 and len({row["key"] for row in rows}) == 40
    assert {row["key"] for row in rows} == {r["key"] for r in results[:40]}
    assert API_KEY not in cache.read_text()
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert any(rec.name.startswith("openai") for rec in caplog.records)  # the SDK's debug log was captured
    assert sum(rec.levelno == logging.WARNING and rec.name == "rtune.eval.judges" for rec in caplog.records) == 3
    for blob in (logged, caplog.text, json.dumps(stats), json.dumps(results), repr(client)):
        assert API_KEY not in blob

    # A second run asks the server nothing for cached items: only the failed ones again.
    mark = len(fake.log)
    again = make_client(fake, cache)
    results2 = again.judge_many(reqs, progress=False)
    asked = fake.requests_by_item(fake.log[mark:])
    assert set(asked) == {q.messages[-1]["content"] for q in bad}
    s2 = again.stats
    assert s2["cache_hits"] == 40 and s2["successes"] == 0 and s2["failures"] == 3
    assert s2["requests_sent"] == len(fake.log) - mark and s2["prompt_tokens"] == 0
    assert all(r["cached"] and r["attempts"] == 0 for r in results2[:40]) and results2[43]["cached"]
    assert all(not r["ok"] and not r["cached"] and r["attempts"] >= 3 for r in results2[40:43])
    assert comparable(results2[:40]) == comparable(results[:40]) and comparable(results2[43:]) == comparable(results[43:])
    assert len(cache_rows(cache)) == 40


RUNNER = textwrap.dedent("""
    import json, sys
    from rtune.eval.judges.client import JudgeClient, JudgeRequest
    spec = json.load(open(sys.argv[1]))
    client = JudgeClient(spec["base_url"], spec["model"], spec["cache"], concurrency=spec["concurrency"],
                         timeout=spec["timeout"], backoff=0.01, max_backoff=0.3)
    reqs = [JudgeRequest(r["key_fields"], r["messages"], r["params"], template_version=spec["tv"])
            for r in spec["requests"]]
    results = client.judge_many(reqs, progress=False)
    json.dump({"results": results, "stats": client.stats}, open(spec["out"], "w"))
""")


def test_killed_midway_then_rerun_asks_nothing_twice_and_matches_an_uninterrupted_run(fake, api_key_env, tmp_path):
    n = 24
    reqs = make_requests(n, prefix="kill")
    content = {q.key_fields["id"]: q.messages[-1]["content"] for q in reqs}
    cache = tmp_path / "killed.jsonl"
    spec = {"base_url": fake.base_url, "model": MODEL, "cache": str(cache), "concurrency": 2, "timeout": TIMEOUT,
            "tv": TV, "out": str(tmp_path / "out.json"),
            "requests": [{"key_fields": q.key_fields, "messages": q.messages, "params": q.params} for q in reqs]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "runner.py").write_text(RUNNER)
    fake.reset(delay=0.1)  # slow enough to be killed midway
    out, err = open(tmp_path / "stdout", "wb"), open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "spec.json")],
                            stdout=out, stderr=err, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.is_file() and cache.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.close()
        err.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    assert not (tmp_path / "out.json").exists()
    for name in ("stdout", "stderr"):
        assert API_KEY not in (tmp_path / name).read_text()

    at_kill = {}
    for line in cache.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill: not finished
        at_kill[row["key"]] = row
    finished = {content[row["key_fields"]["id"]] for row in at_kill.values()}
    assert 0 < len(finished) < n, len(finished)

    mark = len(fake.log)
    client = make_client(fake, cache, concurrency=4)
    results = client.judge_many(reqs, progress=False)
    asked = set(fake.requests_by_item(fake.log[mark:]))
    assert not asked & finished  # nothing finished is asked twice
    assert asked == set(content.values()) - finished  # and everything else is asked
    stats = client.stats
    assert stats["cache_hits"] == len(finished) and stats["successes"] == n - len(finished)
    assert stats["failures"] == 0 and stats["requests_sent"] == len(fake.log) - mark
    assert [r["cached"] for r in results] == [q.messages[-1]["content"] in finished for q in reqs]

    rows = cache_rows(cache)
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == n  # no duplicates, nothing missing
    final = {row["key"]: row for row in rows}
    assert all(final[k] == row for k, row in at_kill.items())  # nothing lost or changed
    assert API_KEY not in cache.read_text()

    fake.reset(delay=0.0)
    whole = make_client(fake, tmp_path / "whole.jsonl").judge_many(reqs, progress=False)
    assert comparable(results) == comparable(whole)
    for r, q in zip(results, reqs):
        check_ok_result(r, q)


def test_corrupt_cache_lines_are_redone_and_openai_api_key_is_the_fallback(fake, monkeypatch, tmp_path):
    monkeypatch.delenv("RTUNE_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", OTHER_KEY)
    fake.reset(api_key=OTHER_KEY, fault_rate=0.0)
    reqs = make_requests(8, prefix="corrupt")
    cache = tmp_path / "c.jsonl"
    first = make_client(fake, cache).judge_many(reqs, progress=False)
    assert all(r["ok"] for r in first) and {e["auth"] for e in fake.log} == {f"Bearer {OTHER_KEY}"}
    lines = cache.read_text().splitlines()
    redo = {json.loads(lines[2])["key"], json.loads(lines[5])["key"]}
    wrong_type = json.loads(lines[2])
    wrong_type["text"] = 123  # valid JSON, wrong type
    lines[2] = json.dumps(wrong_type)
    lines[5] = lines[5][: len(lines[5]) // 2]  # torn
    cache.write_text("\n".join(lines) + "\n")

    mark = len(fake.log)
    client = make_client(fake, cache)
    again = client.judge_many(reqs, progress=False)
    asked = set(fake.requests_by_item(fake.log[mark:]))
    assert asked == {q.messages[-1]["content"] for q, r in zip(reqs, first) if r["key"] in redo}
    stats = client.stats
    assert stats["cache_corrupt_lines"] == 2 and stats["cache_hits"] == 6 and stats["successes"] == 2
    assert stats["api_key_source"] == "OPENAI_API_KEY"
    assert comparable(again) == comparable(first)
    assert [r["cached"] for r in again] == [r["key"] not in redo for r in first]
    keys = [row["key"] for row in cache_rows(cache)]
    assert len(keys) == len(set(keys)) == 8 and OTHER_KEY not in cache.read_text()


def test_without_any_key_a_placeholder_is_sent(fake, monkeypatch, tmp_path):
    monkeypatch.delenv("RTUNE_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake.reset(api_key=PLACEHOLDER_API_KEY, fault_rate=0.0)
    client = make_client(fake, tmp_path / "c.jsonl")
    [r] = client.judge_many(make_requests(1, prefix="nokey"), progress=False)
    assert r["ok"] and [e["auth"] for e in fake.log] == [f"Bearer {PLACEHOLDER_API_KEY}"]
    assert client.stats["api_key_source"] == "placeholder"
