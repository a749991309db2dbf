"""Load test of `rtune serve`: latency, throughput, the gain of batching, overload and bad requests.

Starts `rtune serve MODEL --port 0` on loopback (or targets a running server with --url), then runs
one phase per --clients count (default 1,4,16,64), each for --duration seconds: every client sends
its next request as soon as its last one is answered (a 429/503 is waited out per Retry-After).
During the last phase a probe sends a malformed body, an oversized body, a field of the wrong type,
an unknown role and a prompt longer than the context, which must all get 400, and then a valid
request, which must still be answered.

Loads (--load), all greedy:
- chat: every request --max-tokens long at most (the old fixed load);
- mixed: max_tokens drawn from --mix-tokens (1,64,256) and a --stream-share (0.25) streamed, so
  short, long and streamed requests share the running batch;
- judge: shaped like `rtune eval`'s LLM judges on one server: long prompts (an instruction and two
  answers), half pairwise requests (max_tokens 1, top 5 log-probs, two per item), a quarter
  refusal (512 tokens) and a quarter aspect (768 tokens) requests; --judge-cap caps the long ones.

It prints, per phase, requests/s, generated tokens/s, latency p50/p95, a stream's first token
p50/p95, the status counts (only 200 and the designed 429/503 are allowed) and the server's steps
(mean rows per decode step, steps that mixed settings, rows that joined a running batch), then each
phase's throughput over one client's; it exits 1 when a check fails. Client and server share the
machine's cores.

    python perf/serve_load.py --model smollm2-135m-instruct --load mixed --duration 30
    python perf/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --clients 16 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import queue
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter

import openai

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Name three primary colors.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Suggest a name for a pet turtle.",
    "Why is the sky blue?",
    "List the days of the week.",
    "Describe a cat in five words.",
    "What does a thermometer measure?",
    "Give an example of a prime number.",
    "Summarize the plot of Cinderella briefly.",
    "What is the opposite of 'ancient'?",
]
ALLOWED = {200, 429, 503}


def _die_with_parent():
    """In the server process: SIGTERM when this script dies, so a killed run leaves no server behind."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -- the server -------------------------------------------------------------------------------------
def start_server(model: str, extra: list[str], timeout: float, api_key: str | None = None
                 ) -> tuple[subprocess.Popen, str, list[str]]:
    """`rtune serve MODEL --port 0`; returns (process, base URL, its log lines so far and to come)."""
    cmd = [sys.executable, "-m", "rtune", "serve", model, "--port", "0", *extra]
    print("starting:", shlex.join(["rtune", *cmd[3:]]), flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore",
                                 **({"RTUNE_API_KEY": api_key} if api_key else {})},  # a key stays out of `ps`
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def read():
        for line in proc.stderr:
            log.append(line.rstrip())
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            stop_server(proc)
            sys.exit(f"rtune serve did not start within {timeout:.0f} s:\n" + "\n".join(log[-20:]))
        m = re.search(r"listening on (http://\S+)/v1", line)
        if m:
            return proc, m.group(1), log
        if proc.poll() is not None and lines.empty():
            sys.exit("rtune serve exited:\n" + "\n".join(log[-20:]))


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def http_request(url: str, method: str, path: str, body: bytes | None = None, key: str | None = None,
                 timeout: float = 120) -> tuple[int, dict, bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http_request(url, "GET", "/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url}/health did not answer within {timeout:.0f} s")


# -- load -------------------------------------------------------------------------------------------
JUDGE_ANSWER = ("Staying healthy takes a few habits. Eat a balanced diet with plenty of vegetables, fruit and "
                "whole grains. Move every day: walk, cycle or take the stairs. Sleep seven to nine hours a night "
                "and keep a regular schedule. ")


def judge_prompt(n: int) -> str:
    """A pairwise-judge-shaped prompt: an instruction and two answers (about 300 tokens)."""
    instruction = PROMPTS[n % len(PROMPTS)]
    a, b = JUDGE_ANSWER * (1 + n % 2), JUDGE_ANSWER[::-1][:200] + JUDGE_ANSWER
    return (f"Compare two answers to an instruction and say which is better.\n\n# Instruction\n{instruction}\n\n"
            f"# Answer (a)\n{a}\n\n# Answer (b)\n{b}\n\nWhich answer is better? Reply with a or b.")


def draw_request(load: str, n: int, rng: random.Random, a) -> dict:
    """The n-th request of a client: {"prompt", "params", "stream"}."""
    if load == "judge":
        kind = rng.random()
        if kind < 0.5:
            params = {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}
        else:
            params = {"max_tokens": min(a.judge_cap, 512 if kind < 0.75 else 768)}
        return {"prompt": judge_prompt(n), "params": params, "stream": False}
    if load == "mixed":
        return {"prompt": PROMPTS[n % len(PROMPTS)], "params": {"max_tokens": rng.choice(a.mix_tokens)},
                "stream": rng.random() < a.stream_share}
    return {"prompt": PROMPTS[n % len(PROMPTS)], "params": {"max_tokens": a.max_tokens}, "stream": False}


class Tally:
    """A phase's answers. Its rates count what was answered before the phase's deadline (the requests
    still in flight then finish afterwards, with ever fewer rows: they would understate a load)."""

    def __init__(self):
        self.latencies: list[float] = []  # successful requests only
        self.first_tokens: list[float] = []  # streams: time to the first text
        self.done: list[tuple[float, int]] = []  # (when answered, completion tokens)
        self.statuses: Counter = Counter()
        self.start = self.deadline = self.end = 0.0

    def summary(self, label: str) -> str:
        rps, tps = self.rates()
        late = sum(t > self.deadline for t, _ in self.done)
        line = (f"{label}: {len(self.done) - late} answered in {self.deadline - self.start:.1f} s "
                f"(+{late} after it): {rps:.2f} requests/s, {tps:.1f} tokens/s, "
                f"latency p50 {_ms(self.latencies, 0.5)}, p95 {_ms(self.latencies, 0.95)}")
        if self.first_tokens:
            line += (f"; {len(self.first_tokens)} streams: first token p50 {_ms(self.first_tokens, 0.5)}, "
                     f"p95 {_ms(self.first_tokens, 0.95)}")
        return line

    def rates(self) -> tuple[float, float]:
        """Requests and generated tokens per second, answered within the phase."""
        seconds = self.deadline - self.start
        within = [n for t, n in self.done if t <= self.deadline]
        return len(within) / seconds, sum(within) / seconds


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{1000 * (statistics.median(v) if q == 0.5 else v[min(len(v) - 1, int(q * len(v)))]):.0f} ms"


async def one_request(client, model: str, tally: Tally, request: dict) -> float:
    """Send one chat request; returns how long to wait before the next one (Retry-After), else 0."""
    t0 = time.perf_counter()
    messages = [{"role": "user", "content": request["prompt"]}]
    try:
        if request["stream"]:
            first, tokens = None, 0
            stream = await client.chat.completions.create(
                model=model, messages=messages, temperature=0, stream=True, stream_options={"include_usage": True},
                **request["params"])
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            if first is not None:
                tally.first_tokens.append(first)
        else:
            reply = await client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                         **request["params"])
            tokens = reply.usage.completion_tokens
    except openai.APIStatusError as e:
        tally.statuses[e.status_code] += 1
        if e.status_code in (429, 503):
            try:
                return float(e.response.headers.get("retry-after", "1"))
            except ValueError:
                return 1.0
        return 0.0
    except openai.APITimeoutError:
        tally.statuses["timeout"] += 1
        return 0.0
    except openai.APIConnectionError:
        tally.statuses["connection error"] += 1
        return 0.5
    tally.statuses[200] += 1
    tally.latencies.append(time.perf_counter() - t0)
    tally.done.append((time.perf_counter(), tokens))
    return 0.0


async def run_clients(client, model: str, clients: int, duration: float, a, seed: int = 0) -> Tally:
    """`clients` loops, each sending its next request when the last is answered, until `duration` is over."""
    tally = Tally()
    sent = 0
    deadline = time.monotonic() + duration

    async def worker(i: int):
        nonlocal sent
        rng = random.Random(seed * 1000 + i)
        n = i
        while time.monotonic() < deadline and sent < a.max_requests:
            sent += 1
            wait = await one_request(client, model, tally, draw_request(a.load, n, rng, a))
            n += clients
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    tally.start = time.perf_counter()
    tally.deadline = tally.start + duration
    await asyncio.gather(*(worker(i) for i in range(clients)))
    tally.end = time.perf_counter()
    return tally


# -- bad requests -----------------------------------------------------------------------------------
def probe_bad_requests(url: str, key: str | None, model: str, context: int | None, max_body: int,
                       timeout: float) -> list[str]:
    """Each bad request must get 400, and a valid one after them an answer; returns failures."""
    failures, lines = [], []

    def send(body: bytes) -> tuple[int | str, dict, bytes]:
        try:
            return http_request(url, "POST", "/v1/chat/completions", body, key, timeout)
        except OSError as e:  # a timeout or a refused connection is a failure to report, not a crash
            return type(e).__name__, {}, b""

    valid = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4}
    cases = [
        ("malformed JSON", b'{"model": "x", "messages": [', "invalid_json"),
        ("oversized body", json.dumps({**valid, "messages": [{"role": "user", "content": "x" * max_body}]}).encode(),
         "request_too_large"),
        ("wrong type", json.dumps({**valid, "max_tokens": "many"}).encode(), "invalid_value"),
        ("unknown role", json.dumps({**valid, "messages": [{"role": "wizard", "content": "hi"}]}).encode(),
         "invalid_value"),
    ]
    if context:  # refused as over the context or over --max-prompt-tokens, whichever is smaller
        long = {**valid, "messages": [{"role": "user", "content": "word " * (context + 16)}]}
        cases.append(("prompt over the context", json.dumps(long).encode(), "context_length_exceeded|prompt_too_long"))
    for label, body, code in cases:
        status, _, data = send(body)
        got = json.loads(data).get("error", {}).get("code") if data.startswith(b"{") else None
        lines.append(f"{label} -> {status} {got}")
        if status != 400 or got not in code.split("|"):
            failures.append(f"{label}: {status} {got} (expected 400 {code})")
    for _ in range(120):  # then a valid request is answered (waiting out a full queue: bounded)
        status, headers, _ = send(json.dumps(valid).encode())
        if status not in (429, 503):
            break
        time.sleep(float(headers.get("retry-after", 1)))
    lines.append(f"valid request after them -> {status}")
    if status != 200:
        failures.append(f"a valid request after the bad ones got {status}")
    print("bad requests under load: " + "; ".join(lines), flush=True)
    return failures


# -- main -------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="what `rtune serve` loads (without --url)")
    ap.add_argument("--url", default=None, help="a running server (http://HOST:PORT) instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("RTUNE_API_KEY"))
    ap.add_argument("--server-args", default="", help="extra `rtune serve` flags, e.g. '--max-queue 32'")
    ap.add_argument("--load", choices=("chat", "mixed", "judge"), default="mixed")
    ap.add_argument("--clients", type=_ints, default=[1, 4, 16, 64], help="client counts, one phase each (1,4,16,64)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of each phase")
    ap.add_argument("--max-tokens", type=int, default=32, help="--load chat: every request's max_tokens")
    ap.add_argument("--mix-tokens", type=_ints, default=[1, 64, 256], help="--load mixed: max_tokens drawn from these")
    ap.add_argument("--stream-share", type=float, default=0.25, help="--load mixed: the share of streamed requests")
    ap.add_argument("--judge-cap", type=int, default=768, help="--load judge: the most tokens a judge reply asks for")
    ap.add_argument("--max-requests", type=int, default=100_000, help="a cap on requests per phase")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    a = ap.parse_args()

    proc = None
    if a.url:
        url = a.url.rstrip("/").removesuffix("/v1")
    else:
        proc, url, _ = start_server(a.model, shlex.split(a.server_args), a.startup_timeout, a.api_key)
    try:
        failures = asyncio.run(measure(a, url))
    finally:
        if proc is not None:
            stop_server(proc)
    print("RESULT: " + ("OK" if not failures else "FAIL: " + "; ".join(failures)), flush=True)
    return 1 if failures else 0


def load_average() -> str:
    """The machine's load (client and server share it; other work on it skews the figures)."""
    try:
        with open("/proc/loadavg") as f:
            return "load average " + ", ".join(f.read().split()[:3])
    except OSError:
        return "load average unknown"


def server_stats(url: str, key: str | None) -> dict:
    """The first model's scheduler counters from /stats ({} when there are none)."""
    status, _, data = http_request(url, "GET", "/stats", key=key)
    if status != 200:
        return {}
    models = json.loads(data).get("models", {})
    return next(iter(models.values()), {})


def steps_between(before: dict, after: dict) -> str:
    rows = {int(k): v - before.get("step_rows", {}).get(k, 0) for k, v in after.get("step_rows", {}).items()}
    rows = {k: v for k, v in rows.items() if v}
    steps = sum(rows.values())
    if not steps:
        return "no decode steps"
    mean = sum(k * v for k, v in rows.items()) / steps
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in ("mixed_steps", "joined_running", "cancelled")}
    return (f"{steps} decode steps, mean {mean:.1f} rows (max {max(rows)}), {grew['mixed_steps']} mixed settings, "
            f"{grew['joined_running']} rows joined a running batch, {grew['cancelled']} cancelled")


async def measure(a, url: str) -> list[str]:
    failures: list[str] = []
    await asyncio.to_thread(wait_healthy, url, 60)
    stats0 = await asyncio.to_thread(server_stats, url, a.api_key)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=a.api_key or "none", max_retries=0,
                                timeout=a.request_timeout)
    tallies: dict[int, Tally] = {}
    try:
        model = (await client.models.list()).data[0].id
        print(f"server: {url} (model {model!r}, context {stats0.get('context_length')}, {stats0.get('dtype')}, "
              f"batch rows {stats0.get('max_batch_size')}, queue {stats0.get('max_queue')}); load {a.load!r}",
              flush=True)
        warm = Tally()  # first-call costs out of the timings
        await one_request(client, model, warm, {"prompt": PROMPTS[0], "params": {"max_tokens": 4}, "stream": False})
        if warm.statuses[200] != 1:
            return [f"the warm-up request failed: {dict(warm.statuses)}"]
        for i, clients in enumerate(a.clients):
            before = await asyncio.to_thread(server_stats, url, a.api_key)
            phase = asyncio.create_task(run_clients(client, model, clients, a.duration, a, seed=i))
            if i == len(a.clients) - 1:  # the probe runs while the last load is on
                await asyncio.sleep(min(a.duration / 2, 10))
                failures += await asyncio.to_thread(probe_bad_requests, url, a.api_key, model,
                                                    stats0.get("context_length"), 1 << 20, a.request_timeout)
            tally = tallies[clients] = await phase
            after = await asyncio.to_thread(server_stats, url, a.api_key)
            print(tally.summary(f"{clients} client{'s' if clients > 1 else ''}") + f" ({load_average()})", flush=True)
            print(f"  statuses {dict(sorted(tally.statuses.items(), key=str))}; server: {steps_between(before, after)}",
                  flush=True)
            unexpected = {s: n for s, n in tally.statuses.items() if s not in ALLOWED}
            if unexpected:
                failures.append(f"{clients} clients: statuses other than 200/429/503: {unexpected}")
            if not tally.statuses[200]:
                failures.append(f"{clients} clients: no request was answered")
    finally:
        await client.close()

    if 1 in tallies and tallies[1].latencies:
        sr, st = tallies[1].rates()
        print("over one client: " + ", ".join(
            f"{n} clients {t.rates()[0] / sr:.2f}x requests/s, {t.rates()[1] / st:.2f}x tokens/s"
            for n, t in tallies.items() if n != 1), flush=True)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    status = (await asyncio.to_thread(http_request, url, "POST", "/v1/chat/completions", body, a.api_key))[0]
    print(f"after the load: a request -> {status}", flush=True)
    if status != 200:
        failures.append(f"a request after the load got {status}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
