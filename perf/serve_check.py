"""The done-when checks of `rtune serve`'s limits (issue 17) and continuous batching (issue 19).

limits: a tiny random Llama over Gemma 3's real tokenizer (262k tokens, where a vocabulary scan per
stop set is slow), behind `rtune serve` with its default limits:
  - a request with a 100 kB stop string is answered (400: over --max-stop-chars) within 5 s, and
    answered 200 within 5 s by a server whose --max-stop-chars lets it through;
  - a valid request sent beside 20 requests that each carry 16 new ~48-character stop strings is
    answered within max(5 s, 5x its time alone).
batching: `rtune serve smollm2-135m-instruct`, chat requests with max_tokens drawn from {1, 16, 64},
one in four streamed:
  - requests/s with 16 clients >= 4x one client on the same mix;
  - a stream's first token within 5 s while 8 requests of 256 tokens run.

Prints every figure and the machine's load (`uptime`); exits 1 when a check fails.

    python perf/serve_check.py                 # both parts
    python perf/serve_check.py --part limits   # or batching
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402  (perf/serve_load.py: the server and the load loops)


def uptime() -> str:
    return serve_load.load_average()


def post(url: str, path: str, body: dict, timeout: float = 300) -> tuple[int, dict, float]:
    start = time.monotonic()
    status, _, data = serve_load.http_request(url, "POST", path, json.dumps(body).encode(), timeout=timeout)
    return status, json.loads(data), time.monotonic() - start


def chat(content: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16, **kw}


def random_text(rng: random.Random, size: int) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + " ", k=size))


def gemma_vocab_model(folder: Path) -> Path:
    """A 2-layer Llama (hidden 64, tied embeddings) with Gemma 3's tokenizer, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rtune.models import load_tokenizer

    tok = load_tokenizer("gemma-3-270m")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def check_limits() -> list[str]:
    failures = []
    rng = random.Random(0)
    huge = chat("Give three tips for staying healthy.", stop=[random_text(rng, 100_000)])
    with tempfile.TemporaryDirectory(prefix="rtune-gemma-vocab-") as tmp:
        folder = gemma_vocab_model(Path(tmp))
        for extra, expected in (([], 400), (["--max-stop-chars", "200000"], 200)):
            proc, url, _ = serve_load.start_server(str(folder), ["--model-name", "m", *extra], 300)
            try:
                serve_load.wait_healthy(url, 60)
                post(url, "/v1/chat/completions", chat("Hi"))  # warm
                status, reply, seconds = post(url, "/v1/chat/completions", huge)
                label = " ".join(extra) or "default limits"
                print(f"[{label}] a 100 kB stop string -> {status} in {seconds:.3f} s"
                      + (f" ({reply['error']['message']})" if status != 200 else ""), flush=True)
                if status != expected or seconds > 5:
                    failures.append(f"100 kB stop string ({label}): {status} in {seconds:.1f} s")
                if extra:
                    failures += stop_sets_beside(url, rng)
            finally:
                serve_load.stop_server(proc)
    return failures


def stop_sets_beside(url: str, rng: random.Random) -> list[str]:
    """A valid request alone, then beside 20 requests with 16 new ~48-character stop strings each."""
    valid = chat("Give three tips for staying healthy.")
    alone = statistics.median(post(url, "/v1/chat/completions", valid)[2] for _ in range(5))
    with ThreadPoolExecutor(21) as pool:
        many = [pool.submit(post, url, "/v1/chat/completions",
                            chat(f"Tell me about topic {i}.", stop=[random_text(rng, 48) for _ in range(16)]))
                for i in range(20)]
        time.sleep(0.05)  # the twenty are in, then the valid one
        status, _, beside = post(url, "/v1/chat/completions", valid)
        others = [f.result() for f in many]
    bound = max(5.0, 5 * alone)
    print(f"a valid request alone: {alone:.3f} s (median of 5); beside 20 requests with 16 new 48-character stop "
          f"strings each: {status} in {beside:.3f} s (bound {bound:.1f} s); the twenty: "
          f"{sorted({s for s, _, _ in others})}, slowest {max(t for _, _, t in others):.3f} s", flush=True)
    if status != 200 or beside > bound or any(s != 200 for s, _, _ in others):
        return [f"a request beside new stop sets took {beside:.1f} s (bound {bound:.1f} s)"]
    return []


class Mix:
    """perf/serve_load.py's mixed load with max_tokens from {1, 16, 64}, one in four streamed."""

    load, mix_tokens, stream_share, max_requests, max_tokens, judge_cap = "mixed", [1, 16, 64], 0.25, 100_000, 16, 0


async def batching_figures(url: str, duration: float) -> list[str]:
    import openai

    failures = []
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        model = (await client.models.list()).data[0].id
        warm = serve_load.Tally()
        await serve_load.one_request(client, model, warm, {"prompt": "Hi", "params": {"max_tokens": 4},
                                                           "stream": False})
        rates = []
        for i, clients in enumerate((1, 16, 1, 16)):  # two pairs: a change in the machine's load shows as a difference
            before = await asyncio.to_thread(serve_load.server_stats, url, None)
            tally = await serve_load.run_clients(client, model, clients, duration, Mix, seed=i)
            after = await asyncio.to_thread(serve_load.server_stats, url, None)
            rates.append(tally.rates()[0])
            print(tally.summary(f"{clients} client{'s' if clients > 1 else ''}") + f" ({uptime()})", flush=True)
            print(f"  statuses {dict(tally.statuses)}; server: {serve_load.steps_between(before, after)}", flush=True)
        ratios = [rates[1] / rates[0], rates[3] / rates[2]]
        print("16 clients over 1: " + ", ".join(f"{r:.2f}x requests/s" for r in ratios) + " (each pair)", flush=True)
        if min(ratios) < 4:
            failures.append(f"16 clients gave {min(ratios):.2f}x one client's requests/s (< 4x) in a pair")
        failures += await first_token_beside_long(client, model, url)
    finally:
        await client.close()
    return failures


async def first_token_beside_long(client, model: str, url: str) -> list[str]:
    """A stream's first token while 8 requests of 256 tokens run."""
    long = [asyncio.create_task(client.chat.completions.create(
        model=model, temperature=0, max_tokens=256,
        messages=[{"role": "user", "content": f"Write a long, detailed essay about the history of {topic}."}]))
        for topic in ("Rome", "China", "Egypt", "Greece", "Persia", "India", "the Maya", "Japan")]
    deadline = time.monotonic() + 120
    while (await asyncio.to_thread(serve_load.server_stats, url, None))["running"] < 8:
        if time.monotonic() > deadline:
            return ["the 8 long requests never ran together"]
        await asyncio.sleep(0.05)
    start = time.monotonic()
    first = running = None
    stream = await client.chat.completions.create(model=model, temperature=0, max_tokens=32, stream=True,
                                                  messages=[{"role": "user", "content": "Name three colors."}])
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - start
            running = (await asyncio.to_thread(serve_load.server_stats, url, None))["running"]
    replies = await asyncio.gather(*long)
    tokens = [r.usage.completion_tokens for r in replies]
    print(f"a stream's first token beside 8 requests of 256 tokens: {first:.3f} s (rows running then: {running}, "
          f"the stream's included); the 8 replies' tokens: {tokens}", flush=True)
    return [] if first is not None and first <= 5 else [f"first token after {first} s (> 5 s)"]


def check_batching(duration: float) -> list[str]:
    proc, url, _ = serve_load.start_server("smollm2-135m-instruct", [], 900)
    try:
        serve_load.wait_healthy(url, 60)
        return asyncio.run(batching_figures(url, duration))
    finally:
        serve_load.stop_server(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("limits", "batching", "all"), default="all")
    ap.add_argument("--duration", type=float, default=45.0,
                    help="seconds of each batching phase (1, 16, 1 and 16 clients)")
    a = ap.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    failures = []
    print(f"start: {uptime()}, {os.cpu_count()} CPUs", flush=True)
    if a.part in ("limits", "all"):
        failures += check_limits()
        print(f"after the limits: {uptime()}", flush=True)
    if a.part in ("batching", "all"):
        failures += check_batching(a.duration)
        print(f"after the batching: {uptime()}", flush=True)
    print("RESULT: " + ("OK" if not failures else "FAIL: " + "; ".join(failures)), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
