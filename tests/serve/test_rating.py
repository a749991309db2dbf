"""Blind rating over HTTP (rtune serve --rate, rtune rate): the records, their blindness and order, and
the rules for input (rater names, unknown items, oversized bodies, no path from the client) and keys."""

import http.client
import json
import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from conftest import popen_server
from eval_fixture import answer, write_eval_dir

from rtune.eval import human
from rtune.serve.app import create_app
from rtune.serve.page import PAGE_FILES
from rtune.serve.server import ServerThread
from rtune.serve.specs import load_engines, parse_model_spec

TIMEOUT = 60
KEY = "rating-key-123"
BENCH = "alpaca-heldout"
PAIR = ["rt", "it"]


def call(url, method, path, body=None, key=None, raw_body=None, content_type="application/json"):
    """(status, headers, parsed JSON or text) of one request."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    headers = {"Content-Type": content_type}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    text = r.read().decode("utf-8")
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def eval_dir(tmp_path):
    return write_eval_dir(tmp_path / "eval", n=6)


@pytest.fixture
def server(eval_dir):
    with ServerThread(create_app(rate_dir=eval_dir, api_key=KEY)) as s:
        yield s


def rate(server, item_id, choice, acceptable=(True, False), rater="ann", models=PAIR, key=KEY):
    return call(server.url, "POST", "/api/rate/rating", {"rater": rater, "models": list(models), "bench": BENCH,
                                                        "id": item_id, "choice": choice, "acceptable": list(acceptable)},
                key=key)


def shown(server, item_id, rater="ann"):
    status, _, data = call(server.url, "POST", "/api/rate/item",
                           {"rater": rater, "models": PAIR, "bench": BENCH, "id": item_id}, key=KEY)
    assert status == 200, data
    return data


def writer(text: str) -> str:
    return text.split(" ")[0]  # eval_fixture.answer: "<model> answers ..."


def test_ratings_name_the_models_behind_a_and_b(server, eval_dir):
    status, _, setup = call(server.url, "GET", "/api/rate/setup", key=KEY)
    assert status == 200 and setup["default_pair"] == ["rt", "it"] and setup["models"] == ["base", "rt", "it"]
    status, _, listed = call(server.url, "POST", "/api/rate/items", {"rater": "ann", "models": PAIR}, key=KEY)
    assert status == 200 and listed["total"] == 6 and listed["rated"] == 0
    expected = []
    for item_id, choice, acceptable in [("0", "a", (True, False)), ("1", "b", (False, True)), ("2", "tie", (True, True))]:
        data = shown(server, item_id)
        a, b = (writer(t) for t in data["answers"])
        assert {a, b} == set(PAIR) and "rt" not in json.dumps({k: v for k, v in data.items() if k != "answers"})
        assert data["answers"] == [answer(a, BENCH, int(item_id)), answer(b, BENCH, int(item_id))]
        assert rate(server, item_id, choice, acceptable)[0] == 200
        expected.append({"a": a, "b": b, "winner": {"a": a, "b": b, "tie": "tie"}[choice],
                         "acceptable": {a: acceptable[0], b: acceptable[1]}})
    lines = (eval_dir / "human" / "ann.jsonl").read_text().splitlines()
    got = [json.loads(line) for line in lines]
    assert [{k: r[k] for k in ("a", "b", "winner", "acceptable")} for r in got] == expected
    assert [(r["rater"], r["bench"], r["id"]) for r in got] == [("ann", BENCH, i) for i in "012"]
    status, _, listed = call(server.url, "POST", "/api/rate/items", {"rater": "ann", "models": PAIR}, key=KEY)
    assert [x["rated"] for x in listed["items"]] == [True, True, True, False, False, False]
    # Another rater starts afresh; the pair named the other way round is the same pair.
    status, _, listed = call(server.url, "POST", "/api/rate/items", {"rater": "bob", "models": ["it", "rt"]}, key=KEY)
    assert listed["rated"] == 0
    status, _, listed = call(server.url, "POST", "/api/rate/items", {"rater": "ann", "models": ["it", "rt"]}, key=KEY)
    assert listed["rated"] == 3


def test_sides_are_random_stable_and_a_rerating_keeps_the_last(server, eval_dir):
    firsts = set()
    for rater in ("ann", "bob", "cy", "dee"):
        for i in range(6):
            left = writer(shown(server, str(i), rater)["answers"][0])
            assert writer(shown(server, str(i), rater)["answers"][0]) == left  # stable while the server runs
            firsts.add(left)
    assert firsts == {"rt", "it"}  # 24 draws: both sides occur

    data = shown(server, "4")
    assert data["previous"] is None
    assert rate(server, "4", "a", (True, True))[0] == 200
    assert rate(server, "4", "b", (False, True))[0] == 200
    data = shown(server, "4")
    assert data["previous"] == {"choice": "b", "acceptable": [False, True]}  # the page shows the last verdict
    ratings, skipped = human.read_ratings(eval_dir)
    assert skipped == 0 and len(ratings) == 1 and ratings[0]["winner"] == writer(data["answers"][1])
    assert len((eval_dir / "human" / "ann.jsonl").read_text().splitlines()) == 2  # appended, never rewritten


def test_rating_input_is_validated(server, eval_dir, tmp_path):
    before = files_under(tmp_path)
    body = {"rater": "ann", "models": PAIR, "bench": BENCH, "id": "1", "choice": "a", "acceptable": [True, True]}

    def refused(status_wanted, code, **change):
        status, _, data = call(server.url, "POST", "/api/rate/rating", {**body, **change}, key=KEY)
        assert status == status_wanted, (change, data)
        assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["code"] == code, data

    for name in ["", "a" * 65, "../evil", "a/b", "x.jsonl", "ann bob", "é", "ann\n", "..", "/tmp/x", "a\\b"]:
        refused(400, "invalid_value", rater=name)
    refused(404, "item_not_found", id="999")
    refused(404, "item_not_found", bench="advbench")
    refused(404, "item_not_found", bench="../../results/rt/alpaca-heldout")
    refused(404, "model_not_found", models=["rt", "gpt-5"])
    refused(400, "invalid_value", models=["rt", "rt"])
    refused(400, "invalid_value", models=["rt"])
    refused(400, "invalid_value", choice="c")
    refused(400, "invalid_value", acceptable=[True])
    refused(400, "invalid_value", acceptable=["yes", "no"])
    refused(400, "invalid_value", id=1)  # strict types: an id is a string
    status, _, data = call(server.url, "POST", "/api/rate/rating", {**body, "rater": 5}, key=KEY)
    assert data["error"]["param"] == "rater" and "'rater'" in data["error"]["message"], data  # the field is named
    status, _, data = call(server.url, "POST", "/api/rate/rating", {k: v for k, v in body.items() if k != "choice"},
                           key=KEY)
    assert status == 400 and data["error"]["code"] == "missing_field"
    status, _, data = call(server.url, "POST", "/api/rate/rating", raw_body=b"{not json", key=KEY)
    assert status == 400 and data["error"]["code"] == "invalid_json"
    # A cross-site form can post text/plain without a preflight: only JSON is taken.
    status, _, data = call(server.url, "POST", "/api/rate/rating", raw_body=json.dumps(body).encode(), key=KEY,
                           content_type="text/plain")
    assert status == 415 and data["error"]["code"] == "unsupported_media_type"
    big = {**body, "note": "x" * 20_000}  # over the rating routes' 16 KiB
    status, _, data = call(server.url, "POST", "/api/rate/rating", big, key=KEY)
    assert status == 400 and data["error"]["code"] == "request_too_large"
    status, _, data = call(server.url, "POST", "/api/rate/rating", {**body, "note": "x" * (2 << 20)}, key=KEY)
    assert status == 400 and data["error"]["code"] == "request_too_large"  # the server's body limit
    assert files_under(tmp_path) == before  # nothing written by any refused request

    # A client cannot name a path: extra fields are ignored, the file is EVAL_DIR/human/<rater>.jsonl.
    status, _, _ = call(server.url, "POST", "/api/rate/rating",
                        {**body, "path": str(tmp_path / "x.jsonl"), "eval_dir": str(tmp_path), "file": "../x"}, key=KEY)
    assert status == 200
    assert files_under(tmp_path) - before == {"eval/human/ann.jsonl"}


def test_the_api_key_guards_the_rating_routes_not_the_page_files(server):
    for method, path, body in [("GET", "/api/rate/setup", None), ("GET", "/api/page", None),
                               ("POST", "/api/rate/items", {"rater": "ann", "models": PAIR}),
                               ("POST", "/api/rate/item", {"rater": "ann", "models": PAIR, "bench": BENCH, "id": "0"}),
                               ("GET", "/v1/models", None)]:
        for key in (None, "wrong", KEY[:-1]):
            status, _, data = call(server.url, method, path, body, key=key)
            assert status == 401 and data["error"]["code"] == "invalid_api_key", (path, key)
        assert call(server.url, method, path, body, key=KEY)[0] == 200
    for key in (None, "wrong"):
        assert rate(server, "0", "a", key=key)[0] == 401
    assert rate(server, "0", "a")[0] == 200
    # The pages are open (they hold no data) and never hold the key; only their own files are served.
    status, _, _ = call(server.url, "GET", "/")
    assert status in (302, 303, 307)  # no model: / goes to the rating page
    for path in ["/rate", *(f"/page/{name}" for name in PAGE_FILES)]:
        status, headers, text = call(server.url, "GET", path)
        assert status == 200 and KEY not in text, path
        assert "script-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    for path in ["/page/../api/rate/setup", "/page/%2e%2e/api/rate/setup", "/page/app.py", "/page/", "/page/x.js"]:
        status, _, _ = call(server.url, "GET", path)
        assert status in (401, 404), path  # outside the open files: the key is asked first, or nothing is there


def test_a_server_with_models_and_ratings_guards_both(tmp_path, tiny_model_path):
    eval_dir = write_eval_dir(tmp_path / "eval", n=2)
    engines = load_engines([parse_model_spec(f"tiny={tiny_model_path}")], dtype=torch.float32)
    with ServerThread(create_app(engines, rate_dir=eval_dir, api_key=KEY, max_tokens=4)) as s:
        assert call(s.url, "GET", "/")[0] == 200 and call(s.url, "GET", "/rate")[0] == 200
        assert call(s.url, "GET", "/api/page", key=KEY)[2] == {"chat": True, "rate": True}
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert call(s.url, "POST", "/v1/chat/completions", chat)[0] == 401
        assert call(s.url, "POST", "/v1/chat/completions", chat, key=KEY)[0] == 200
        assert call(s.url, "GET", "/api/rate/setup")[0] == 401
    with ServerThread(create_app(engines)) as s:  # no --rate: no rating routes, no rating page
        assert call(s.url, "GET", "/rate")[0] == 404
        status, _, data = call(s.url, "GET", "/api/rate/setup")
        assert status == 404 and data["error"]["code"] == "not_found"
        assert call(s.url, "GET", "/api/page")[2] == {"chat": True, "rate": False}


def test_rtune_rate_serves_the_rating_page_alone(tmp_path):
    eval_dir = write_eval_dir(tmp_path / "eval", n=2)
    env = {**os.environ, "RTUNE_API_KEY": KEY}
    proc = popen_server(["rate", str(eval_dir), "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + TIMEOUT
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "rtune rate exited"
            m = re.search(r"listening on (http://\S+)/v1", line)
            url = m.group(1) if m else None
        assert url, "rtune rate did not start"
        assert call(url, "GET", "/rate")[0] == 200
        assert call(url, "GET", "/api/rate/setup")[0] == 401
        status, _, setup = call(url, "GET", "/api/rate/setup", key=KEY)
        assert status == 200 and setup["default_pair"] == ["rt", "it"]
        assert call(url, "GET", "/v1/models", key=KEY)[2]["data"] == []
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def test_ratings_files_are_read_with_care(tmp_path):
    eval_dir = tmp_path / "eval"
    rating = {"rater": "ann", "bench": "b", "id": "1", "a": "rt", "b": "it", "winner": "rt",
              "acceptable": {"rt": True, "it": False}}
    human.append_rating(eval_dir, rating)
    human.append_rating(eval_dir, {**rating, "id": "2", "winner": "tie"})
    human.append_rating(eval_dir, {**rating, "a": "it", "b": "rt", "winner": "it"})  # item 1 again, sides swapped
    path = eval_dir / "human" / "ann.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({**rating, "rater": "bob", "id": "3"}) + "\n")  # claims another rater
        f.write(json.dumps({**rating, "winner": "base"}) + "\n")  # a winner that was not shown
        f.write('{"rater": "ann", "bench": "b", "id": "4", "a": "rt"')  # torn by a crash mid-write
    (eval_dir / "human" / "not a rater.jsonl").write_text(json.dumps(rating) + "\n")
    ratings, skipped = human.read_ratings(eval_dir)
    assert [(r["id"], r["winner"]) for r in ratings] == [("2", "tie"), ("1", "it")] and skipped == 3
    for bad in ["../x", "", "a" * 65]:
        with pytest.raises(Exception):
            human.rater_file(eval_dir, bad)
    with pytest.raises(Exception):
        human.append_rating(eval_dir, {**rating, "rater": "../../evil"})
    assert not (tmp_path / "evil.jsonl").exists()
