"""Load test of `rtune serve`: latency, throughput, the gain of batching, overload and bad requests.

Starts `rtune serve MODEL --port 0` on loopback (or targets a running server with --url), then:

1. serial: one client, one request at a time, for --serial-duration seconds;
2. concurrent: --clients clients (default 64) for --duration seconds (default 60), each sending the
   next chat request as soon as its last one is answered (a 429/503 is waited out per Retry-After);
   meanwhile a probe sends a malformed body, an oversized body, a field of the wrong type and a
   prompt longer than the context, which must all get 400, and then a valid request, which must
   still be answered.

Every request is greedy, --max-tokens long at most, over the same prompts in both phases. It prints
p50/p95 latency, requests/s and generated tokens/s of each phase, the status counts (only 200 and
the designed 429/503 are allowed), the batched vs serial throughput, and the server's batch sizes;
it exits 1 when a check fails. Client and server share the machine's cores.

    python perf/serve_load.py --model smollm2-135m-instruct --duration 20
    python perf/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --clients 16 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import queue
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


# -- the server -------------------------------------------------------------------------------------
def start_server(model: str, extra: list[str], timeout: float, api_key: str | None = None
                 ) -> tuple[subprocess.Popen, str, list[str]]:
    """`rtune serve MODEL --port 0`; returns (process, base URL, its log lines so far and to come)."""
    cmd = [sys.executable, "-m", "rtune", "serve", model, "--port", "0", *extra]
    print("starting:", shlex.join(["rtune", *cmd[3:]]), flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore",
                                 **({"RTUNE_API_KEY": api_key} if api_key else {})})  # a key stays out of `ps`
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
class Tally:
    def __init__(self):
        self.latencies: list[float] = []  # successful requests only
        self.tokens = 0
        self.statuses: Counter = Counter()
        self.start = self.end = 0.0

    def summary(self, label: str) -> str:
        seconds = self.end - self.start
        ok = len(self.latencies)
        lat = sorted(self.latencies)
        p50 = 1000 * statistics.median(lat) if lat else float("nan")
        p95 = 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")
        return (f"{label}: {ok} answered in {seconds:.1f} s: {ok / seconds:.2f} requests/s, "
                f"{self.tokens / seconds:.1f} tokens/s, latency p50 {p50:.0f} ms, p95 {p95:.0f} ms")

    def rates(self) -> tuple[float, float]:
        seconds = self.end - self.start
        return len(self.latencies) / seconds, self.tokens / seconds


async def one_request(client, model: str, tally: Tally, prompt: str, max_tokens: int) -> float:
    """Send one chat request; returns how long to wait before the next one (Retry-After), else 0."""
    t0 = time.perf_counter()
    try:
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens)
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
    tally.tokens += reply.usage.completion_tokens
    return 0.0


async def run_clients(client, model: str, clients: int, duration: float, max_tokens: int, max_requests: int) -> Tally:
    """`clients` loops, each sending its next request when the last is answered, until `duration` is over."""
    tally = Tally()
    sent = 0
    deadline = time.monotonic() + duration

    async def worker(i: int):
        nonlocal sent
        n = i
        while time.monotonic() < deadline and sent < max_requests:
            sent += 1
            wait = await one_request(client, model, tally, PROMPTS[n % len(PROMPTS)], max_tokens)
            n += clients
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    tally.start = time.perf_counter()
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
    if context:
        long = {**valid, "messages": [{"role": "user", "content": "word " * (context + 16)}]}
        cases.append(("prompt over the context", json.dumps(long).encode(), "context_length_exceeded"))
    for label, body, code in cases:
        status, _, data = send(body)
        got = json.loads(data).get("error", {}).get("code") if data.startswith(b"{") else None
        lines.append(f"{label} -> {status} {got}")
        if status != 400 or got != code:
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
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="what `rtune serve` loads (without --url)")
    ap.add_argument("--url", default=None, help="a running server (http://HOST:PORT) instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("RTUNE_API_KEY"))
    ap.add_argument("--server-args", default="", help="extra `rtune serve` flags, e.g. '--max-queue 32'")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of concurrent load")
    ap.add_argument("--serial-duration", type=float, default=None, help="seconds of serial requests "
                    "(default: a third of --duration, at most 20)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-requests", type=int, default=100_000, help="a cap on requests per phase")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    a = ap.parse_args()
    serial_seconds = a.serial_duration if a.serial_duration is not None else min(20.0, a.duration / 3)

    proc = None
    if a.url:
        url = a.url.rstrip("/").removesuffix("/v1")
    else:
        proc, url, _ = start_server(a.model, shlex.split(a.server_args), a.startup_timeout, a.api_key)
    try:
        failures = asyncio.run(measure(a, url, serial_seconds))
    finally:
        if proc is not None:
            stop_server(proc)
    print("RESULT: " + ("OK" if not failures else "FAIL: " + "; ".join(failures)), flush=True)
    return 1 if failures else 0


def _stats(url: str, key: str | None) -> dict:
    status, _, data = http_request(url, "GET", "/stats", key=key)
    return json.loads(data) if status == 200 else {}


async def measure(a, url: str, serial_seconds: float) -> list[str]:
    failures: list[str] = []
    await asyncio.to_thread(wait_healthy, url, 60)
    stats0 = await asyncio.to_thread(_stats, url, a.api_key)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=a.api_key or "none", max_retries=0,
                                timeout=a.request_timeout)
    try:
        model = (await client.models.list()).data[0].id
        print(f"server: {url} (model {model!r}, context {stats0.get('context_length')}, batches of up to "
              f"{stats0.get('max_batch_size')}, queue {stats0.get('max_queue')})", flush=True)
        warm = Tally()
        await one_request(client, model, warm, PROMPTS[0], a.max_tokens)  # first-call costs out of the timings
        if warm.statuses[200] != 1:
            return [f"the warm-up request failed: {dict(warm.statuses)}"]

        serial = await run_clients(client, model, 1, serial_seconds, a.max_tokens, a.max_requests)
        print(serial.summary("serial (1 client)"), flush=True)

        before = await asyncio.to_thread(_stats, url, a.api_key)
        load = asyncio.create_task(run_clients(client, model, a.clients, a.duration, a.max_tokens, a.max_requests))
        await asyncio.sleep(min(a.duration / 2, 10))  # the probe runs while the load is on
        failures += await asyncio.to_thread(probe_bad_requests, url, a.api_key, model,
                                            stats0.get("context_length"), 1 << 20, a.request_timeout)
        concurrent = await load
        after = await asyncio.to_thread(_stats, url, a.api_key)
    finally:
        await client.close()

    print(concurrent.summary(f"concurrent ({a.clients} clients)"), flush=True)
    print("status counts (concurrent):", dict(sorted(concurrent.statuses.items(), key=str)), flush=True)
    unexpected = {s: n for s, n in concurrent.statuses.items() if s not in ALLOWED}
    if unexpected:
        failures.append(f"statuses other than 200/429/503: {unexpected}")
    if not concurrent.statuses[200]:
        failures.append("no request was answered under load")
    (sr, st), (cr, ct) = serial.rates(), concurrent.rates()
    print(f"batched vs serial: {cr / sr:.2f}x requests/s ({cr:.2f} vs {sr:.2f}), "
          f"{ct / st:.2f}x tokens/s ({ct:.1f} vs {st:.1f})", flush=True)
    if before and after:
        b, c = before["batch_sizes"], after["batch_sizes"]
        grew = {int(k): v - b.get(k, 0) for k, v in c.items() if v - b.get(k, 0)}
        batches = sum(grew.values())
        if batches:
            mean = sum(k * v for k, v in grew.items()) / batches
            print(f"server batches during the load (the probe's included): {batches}, mean size {mean:.1f}, "
                  f"sizes {dict(sorted(grew.items()))}", flush=True)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    status = (await asyncio.to_thread(http_request, url, "POST", "/v1/chat/completions", body, a.api_key))[0]
    print(f"after the load: a request -> {status}", flush=True)
    if status != 200:
        failures.append(f"a request after the load got {status}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
