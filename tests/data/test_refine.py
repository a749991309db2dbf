"""`rtune data refine`: the marker rule, failures that keep the original, caching and kill -9 resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import tiny
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rtune.cli import main
from rtune.data.refine import MARKER, RefineConfig, extract, refine_file, refine_messages
from rtune.serve.server import ServerThread


@pytest.mark.parametrize("text, finish, expected", [
    ("Good start.\nRefined response: Hello there!", "stop", ("Hello there!", "rewritten")),
    ("review... refined RESPONSE:\n\n  Two\nlines  ", "stop", ("Two\nlines", "rewritten")),
    ("It said 'Refined response:' is needed.\nRefined response: Final.", "stop", ("Final.", "rewritten")),
    ("Looks fine as it is.", "stop", (None, "no_marker")),
    ("Refined response:   ", "stop", (None, "empty")),
    ("Refined response: half a sen", "length", (None, "cut")),
    (None, None, (None, "failed")),
])
def test_extract(text, finish, expected):
    assert extract(text, finish) == expected


def test_the_prompt_shows_the_request_only_when_there_is_one():
    with_request = refine_messages("Name a colour.", "Blue.")[0]["content"]
    alone = refine_messages("", "Blue.")[0]["content"]
    assert "<request>\nName a colour.\n</request>" in with_request and "<request>" not in alone
    assert "<response>\nBlue.\n</response>" in alone and MARKER in alone


class FakeRefiner:
    """An OpenAI-compatible endpoint whose behaviour is chosen by a word in the response under refinement."""

    def __init__(self, delay: float = 0.0):
        self.lock, self.seen, self.delay = threading.Lock(), [], delay
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request):
            import asyncio

            body = await request.json()
            prompt = body["messages"][-1]["content"]
            response = prompt.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
            with self.lock:
                self.seen.append(response)
            await asyncio.sleep(self.delay)
            if "ERROR" in response:
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if "TIMEOUT" in response:
                await asyncio.sleep(5)
            finish, text = "stop", f"Fine.\nRefined response: {response.upper()}"
            if "NOMARKER" in response:
                text = "This response needs no change."
            if "CUT" in response:
                finish, text = "length", "Refined response: HALF"
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def _data(tmp_path, responses):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Task {i}.", "response": r}) + "\n"
                            for i, r in enumerate(responses)))
    return path


def test_failures_keep_the_original_and_only_they_are_asked_again(tmp_path):
    fake = FakeRefiner()
    data = _data(tmp_path, ["a good one", "ERROR here", "NOMARKER please", "CUT me", "TIMEOUT now", "last one"])
    out = tmp_path / "refined.jsonl"
    with ServerThread(fake.app) as server:
        config = RefineConfig(url=server.url + "/v1", model="fake", timeout=1.0, max_retries=1, backoff=0.0)
        s = refine_file(data, out, config, progress=False)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["refine_status"] for r in rows] == ["rewritten", "failed", "no_marker", "cut", "failed", "rewritten"]
        assert rows[0]["response"] == "A GOOD ONE" and rows[0]["source_response"] == "a good one"
        assert all(r["response"] == r["source_response"] for r in rows[1:5])  # every failure keeps the original
        assert (s["rewritten"], s["failed"], s["no_marker"], s["cut"]) == (2, 2, 1, 1)
        assert s["extraction_rate"] == pytest.approx(2 / 6)
        first = len(fake.seen)
        s2 = refine_file(data, out, config, progress=False)
        asked_again = fake.seen[first:]
        # Only the transport failures: a reply without the marker and a cut reply are final answers.
        assert sorted(set(asked_again)) == ["ERROR here", "TIMEOUT now"] and s2["from_cache"] == 4


def test_killed_refinement_resumes_without_asking_a_finished_record_again(tmp_path):
    fake = FakeRefiner(delay=0.3)
    data = _data(tmp_path, [f"response number {i}" for i in range(12)])
    out = tmp_path / "refined.jsonl"
    cache = tmp_path / "refined.jsonl.refine-cache.jsonl"
    with ServerThread(fake.app) as server:
        cmd = [sys.executable, "-m", "rtune", "data", "refine", str(data), "--out", str(out), "--refiner-url",
               server.url + "/v1", "--refiner-model", "fake", "--refiner-concurrency", "1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 4):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not out.exists()  # nothing half-written
        done = len(cache.read_text().splitlines())
        assert 4 <= done < 12
        before = list(fake.seen)
        fake.seen.clear()
        assert main(["data", "refine", str(data), "--out", str(out), "--refiner-url", server.url + "/v1",
                     "--refiner-model", "fake"]) == 0
        finished = {json.loads(x)["key"] for x in cache.read_text().splitlines()[:done]}
        assert len(finished) == done
        # Asked again: what was not cached (at most the one in flight at the kill), never a finished record.
        assert len(fake.seen) == 12 - done and not set(fake.seen) & set(before[:done - 1])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["refine_status"] == "rewritten" for r in rows)


def test_a_local_refiner_caches_its_replies(tmp_path, tiny_model_path, monkeypatch):
    data = _data(tmp_path, ["one answer", "another answer"])
    out = tmp_path / "r.jsonl"
    config = RefineConfig(local=str(tiny_model_path), template="tulu", max_tokens=6, batch_size=2)
    s = refine_file(data, out, config, progress=False)
    assert s["records"] == 2 and s["asked"] == 2
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["source_response"] in ("one answer", "another answer") for r in rows)
    import rtune.infer.load

    monkeypatch.setattr(rtune.infer.load, "load_for_inference", lambda *a, **k: pytest.fail("loaded again"))
    assert refine_file(data, out, config, progress=False)["from_cache"] == 2


def test_a_real_server_refines(tmp_path, tiny_model_path):
    """rtune serve on loopback as the refiner: a random tiny model rarely writes the marker, and every
    record still comes back, with its original where nothing was extracted."""
    from rtune.infer.load import load_for_inference
    from rtune.serve.app import create_app
    from rtune.serve.engine import Engine

    model, tokenizer, renderer = load_for_inference(str(tiny_model_path), None)
    app = create_app(Engine(model, tokenizer, renderer, "tiny"), max_tokens=8)
    data = _data(tmp_path, ["first", "second", "third"])
    with ServerThread(app) as server:
        s = refine_file(data, tmp_path / "o.jsonl", RefineConfig(url=server.url + "/v1", model="tiny", max_tokens=8),
                        progress=False)
    assert s["records"] == 3 and s["failed"] == 0 and s["asked"] == 3


def test_refine_cli_checks_its_flags(tmp_path, capsys):
    data = _data(tmp_path, ["x"])
    assert main(["data", "refine", str(data), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "needs a refiner" in capsys.readouterr().err
    assert main(["data", "refine", str(data), "--out", str(tmp_path / "o.jsonl"), "--refiner-url", "http://x/v1"]) == 2
    assert "--refiner-model" in capsys.readouterr().err
