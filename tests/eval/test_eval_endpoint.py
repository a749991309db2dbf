"""`rtune eval` / `rtune generate` with --gen-url: generation on running OpenAI-compatible servers.

Two `rtune serve` replicas of a tiny model run in this process (rtune.serve.server.ServerThread, on
127.0.0.1), each behind an ASGI wrapper that counts the /v1/completions requests it is sent, so the
servers are used through HTTP only. A third serves other weights. A small fake server stands for
vLLM (token ids and stop_reason in its replies, no fingerprint in /v1/models).
"""

import json
import threading

import pytest
import tiny
import torch
from fastapi import FastAPI, Request

from rtune.cli import main
from rtune.eval.generation import EvalDecoding
from rtune.eval.results import read_items, read_summaries
from rtune.eval.run import EndpointConfig, EvalConfig, run_eval
from rtune.infer.load import load_for_inference
from rtune.serve.app import create_app
from rtune.serve.engine import Engine
from rtune.serve.server import ServerThread

MAX_NEW = 12
N_PROMPTS = 24


class Counting:
    """An app that counts the /v1/completions requests it is sent (and may act on the n-th)."""

    def __init__(self, app, on_request=None):
        self.app, self.on_request = app, on_request
        self.state = app.state  # ServerThread.stop stops the models' generation through it
        self.completions = 0
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/completions"):
            with self.lock:
                self.completions += 1
                n = self.completions
            if self.on_request is not None:
                self.on_request(n)
        await self.app(scope, receive, send)


def start_replica(model_dir, on_request=None):
    model, tokenizer, renderer = load_for_inference(str(model_dir), dtype=torch.float32)
    engine = Engine(model, tokenizer, renderer, "tiny", spec=str(model_dir))
    app = Counting(create_app(engine, max_batch_size=4, max_queue=64, max_tokens=16), on_request)
    server = ServerThread(app).start()
    server.counter = app
    return server


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("endpoint-bench") / "held.jsonl"
    with open(path, "w") as f:
        for i in range(N_PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "instruction": f"Tell me fact number {i} about foxes.",
                                "response": f"Fact {i}: foxes " + "run " * (i % 5 + 1)}) + "\n")
    return path


@pytest.fixture(scope="module")
def replicas(tiny_model_path):
    servers = [start_replica(tiny_model_path), start_replica(tiny_model_path)]
    yield servers
    for s in servers:
        s.stop()


def settings(benches, **kw):
    decoding = EvalDecoding(max_new_tokens=MAX_NEW, batch_size=4, dtype="fp32")
    return EvalConfig(benches=[str(b) for b in benches], decoding=decoding, relevance=False, progress=False, **kw)


@pytest.fixture(scope="module")
def hf_items(tiny_model_path, bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-eval")
    run_eval([str(tiny_model_path)], settings([bench]), out, labels=["tiny"])
    return read_items(out / "results" / "tiny" / "held")


def same_as_hf(items, hf):
    assert [r["id"] for r in items] == [r["id"] for r in hf]
    for r, h in zip(items, hf):
        assert r["output"] == h["output"], r["id"]
        # rtune serve returns the reply's ids and vLLM's stop_reason: the ending is named exactly.
        assert r["finish_reason"] == h["finish_reason"], r["id"]


def urls(*servers):
    return ",".join(f"{s.url}/v1" for s in servers)


def test_two_replicas_give_hf_outputs_spread_the_requests_and_a_rerun_asks_nothing(
        tiny_model_path, bench, replicas, hf_items, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(tiny_model_path), "--names", "tiny", "--bench", str(bench), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), "--no-relevance", "--gen-url", urls(*replicas), "--gen-concurrency", "2"]
    before = [s.counter.completions for s in replicas]
    assert main(args) == 0
    sent = [s.counter.completions - b for s, b in zip(replicas, before)]
    assert sum(sent) == N_PROMPTS and min(sent) >= N_PROMPTS // 4, sent  # both replicas worked
    same_as_hf(read_items(out / "results" / "tiny" / "held"), hf_items)

    [summary] = read_summaries(out)
    backend = summary["generation_backend"]
    assert backend["backend"] == "endpoint" and backend["model"] == "tiny" and backend["fingerprint_from"] == "rtune serve"
    assert backend["urls"] == [f"{s.url}/v1" for s in replicas] and backend["dtype"] == "fp32"
    assert sorted(r["answered"] for r in backend["transport"]["replicas"].values()) == sorted(sent)
    assert summary["generation"]["generated"] == N_PROMPTS
    # The scores need local weights: said, not silently left out.
    assert "ranking_top1" not in summary["metrics"] and "--score-local" in summary["not_computed"]["ranking_top1"]
    assert "not computed" in capsys.readouterr().out
    fp = json.loads((out / "eval.json").read_text())["models"]["tiny"]["fingerprint"]
    assert fp["kind"] == "endpoint" and fp["fingerprint"] == backend["fingerprint"]

    # A re-run asks the servers nothing; with --score-local the scores come from the weights here.
    before = [s.counter.completions for s in replicas]
    assert main(args + ["--score-local"]) == 0
    assert [s.counter.completions for s in replicas] == before
    [again] = read_summaries(out)
    assert again["generation"]["from_cache"] == N_PROMPTS and again["generation"]["generated"] == 0
    assert "ranking_top1" in again["metrics"] and "not_computed" not in again
    same_as_hf(read_items(out / "results" / "tiny" / "held"), hf_items)


def test_a_replica_killed_midway_has_its_requests_finished_by_the_other(tiny_model_path, bench, hf_items, tmp_path):
    survivor = start_replica(tiny_model_path)
    victim = None

    def kill(n):
        if n == 4:  # a few requests in: stop it while others are in flight on it
            threading.Thread(target=victim.stop, daemon=True).start()

    victim = start_replica(tiny_model_path, on_request=kill)
    try:
        cfg = settings([bench], shift=False)
        cfg.endpoint = EndpointConfig(urls=[f"{victim.url}/v1", f"{survivor.url}/v1"], concurrency=3, timeout=60)
        summaries = run_eval([str(tiny_model_path)], cfg, tmp_path / "eval", labels=["tiny"])
    finally:
        survivor.stop()
        victim.stop()
    same_as_hf(read_items(tmp_path / "eval" / "results" / "tiny" / "held"), hf_items)
    transport = summaries[0]["generation_backend"]["transport"]
    by_url = transport["replicas"]
    assert by_url[f"{victim.url}/v1"]["errors"] and transport["retries_total"] >= 1, transport
    assert by_url[f"{victim.url}/v1"]["answered"] + by_url[f"{survivor.url}/v1"]["answered"] == N_PROMPTS
    assert victim.counter.completions >= 4 and survivor.counter.completions > N_PROMPTS // 2


def test_a_replica_serving_other_weights_stops_the_evaluation_before_it_generates(
        tiny_model_path, bench, replicas, tmp_path, capsys):
    other_dir = tiny.tiny_model_dir(tmp_path / "other", seed=1)
    other = start_replica(other_dir)
    try:
        before = [s.counter.completions for s in (replicas[0], other)]
        rc = main(["eval", str(tiny_model_path), "--bench", str(bench), "--out", str(tmp_path / "eval"),
                   "--gen-url", urls(replicas[0], other)])
        after = [s.counter.completions for s in (replicas[0], other)]
    finally:
        other.stop()
    err = capsys.readouterr().err
    assert rc != 0 and after == before  # nothing was asked to generate
    fps = [line.split("fingerprint ")[1][:16] for line in err.split(";") if "fingerprint " in line]
    assert len(set(fps)) == 2 and f"{replicas[0].url}/v1" in err and f"{other.url}/v1" in err, err
    assert not list((tmp_path / "eval").glob("cache/*/generations-*.jsonl"))


def test_rules_and_lm_eval_are_refused_with_gen_url(tiny_model_path, bench, tmp_path, capsys):
    base = ["eval", str(tiny_model_path), "--out", str(tmp_path / "e"), "--gen-url", "http://127.0.0.1:9/v1"]
    assert main(base + ["--bench", str(bench), "--rules", "eos"]) == 2
    assert "--rules needs --backend hf" in capsys.readouterr().err
    assert main(base + ["--lm-eval-tasks", "rtune_demo_mc"]) == 2
    assert "not the --gen-url servers" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_path), "--out", str(tmp_path / "e"), "--bench", str(bench),
                 "--gen-fingerprint", "abc"]) == 2
    assert "go with --gen-url" in capsys.readouterr().err


def test_generate_through_replicas_equals_generate_here(tiny_model_path, bench, replicas, tmp_path):
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    common = ["generate", str(tiny_model_path), "--prompts", str(bench), "--max-new-tokens", str(MAX_NEW)]
    assert main(common + ["--out", str(here)]) == 0
    assert main(common + ["--out", str(there), "--gen-url", urls(*replicas)]) == 0
    rows_here = [json.loads(line) for line in here.read_text().splitlines()]
    rows_there = [json.loads(line) for line in there.read_text().splitlines()]
    assert [r["output"] for r in rows_there] == [r["output"] for r in rows_here]
    assert [r["finished"] for r in rows_there] == [r["finished"] for r in rows_here]


# -- a server that returns token ids and vLLM's stop_reason, and reports no fingerprint -------------------
def vllm_like_app(tokenizer, reply_ids, seen: list):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "served", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = json.loads(await request.body())
        seen.append(body)
        ids = list(reply_ids)
        return {"id": "cmpl-1", "object": "text_completion", "model": "served",
                "choices": [{"index": 0, "text": tokenizer.decode(ids, skip_special_tokens=True),
                             "token_ids": ids, "finish_reason": "stop", "stop_reason": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(ids)}}

    return app


def test_token_ids_from_a_vllm_like_server_are_cut_exactly_and_its_fingerprint_is_asked_for(
        tiny_model_path, bench, tmp_path, capsys):
    tokenizer = tiny.byte_bpe_tokenizer()
    words = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    seen: list = []
    server = ServerThread(vllm_like_app(tokenizer, words + [tokenizer.eos_token_id], seen)).start()
    try:
        out = tmp_path / "eval"
        args = ["eval", str(tiny_model_path), "--names", "m", "--bench", f"{bench}:3", "--out", str(out),
                "--no-relevance", "--no-shift", "--gen-url", f"{server.url}/v1", "--gen-prompt", "text"]
        assert main(args) == 2 and not seen
        assert "--gen-fingerprint" in capsys.readouterr().err
        assert main(args + ["--gen-fingerprint", "merged-abc123"]) == 0
    finally:
        server.stop()
    rows = read_items(out / "results" / "m" / "held")
    assert all(r["output"] == "The quick brown fox" and r["finish_reason"] == "eos" and r["num_tokens"] == len(words)
               for r in rows)
    [summary] = read_summaries(out)
    backend = summary["generation_backend"]
    assert backend["fingerprint"] == "merged-abc123" and backend["fingerprint_from"] == "--gen-fingerprint"
    assert backend["prompt"] == "text" and "special token" in backend["note"] and backend["retokenized"] == 0
    # What was asked: the rendered text without the BOS the server adds, greedy, the template's stops.
    body = seen[0]
    assert isinstance(body["prompt"], str) and not body["prompt"].startswith("<bos>") and "<|assistant|>" in body["prompt"]
    assert body["temperature"] == 0 and body["max_tokens"] == 512 and body["return_token_ids"] is True
    assert tokenizer.eos_token_id in body["stop_token_ids"] and "<|user|>" in body["stop"]
