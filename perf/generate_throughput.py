"""Generation throughput: batched rtune.infer.generate.generate_ids against one prompt at a time.

AlpacaEval-style prompts, rendered with the tulu template for the built-in base Gemma 3 270M:

    --prompts alpaca-eval   the 805 AlpacaEval instructions (example/outputs.json of the alpaca-eval
                            0.6.6 source archive on PyPI; fetched with pip once, cached under
                            rtune_home()/data), a seed-0 sample of --num-prompts of them
    --prompts alpaca-demo   the held-out alpaca-demo instructions (`rtune data prepare --holdout`)

A base model often does not stop, and a batch runs until its last row stops, so comparing runs
that stop at different points would measure luck. Every prompt therefore generates exactly
--max-new-tokens tokens: the stop tokens' logits are set to -inf (a forward hook on the model, HF
backend) or `ignore_eos=True` (vLLM). Decoding is greedy.

    python perf/generate_throughput.py --num-prompts 16 --max-new-tokens 64 --batch-size 16
    python perf/generate_throughput.py --prompts alpaca-demo --num-prompts 24 --model rtune-demo/runs/rt
    python perf/generate_throughput.py --backend vllm      # CUDA + vllm installed

The HF backend measures fp32 and bf16 in one run (one at a time and batched) and the greedy
agreement between them: the share of prompts whose answers (stops on, as evaluation generates
them) are identical in both dtypes. That agreement decides `rtune eval --dtype auto`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

from rtune.paths import rtune_home

ALPACA_EVAL_REQUIREMENT = "alpaca-eval==0.6.6"
ALPACA_EVAL_ARCHIVE = "alpaca_eval-0.6.6.tar.gz"
ALPACA_EVAL_MEMBER = "alpaca_eval-0.6.6/example/outputs.json"
ALPACA_EVAL_SHA256 = "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5"


# -- prompts ----------------------------------------------------------------------------------------
def alpaca_eval_instructions() -> list[str]:
    """The 805 AlpacaEval instructions, cached after the first fetch from PyPI."""
    cached = rtune_home() / "data" / "alpaca_eval_outputs.json"
    if not (cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == ALPACA_EVAL_SHA256):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                   "--disable-pip-version-check", ALPACA_EVAL_REQUIREMENT, "-d", tmp]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            archive = Path(tmp) / ALPACA_EVAL_ARCHIVE
            if done.returncode != 0 or not archive.is_file():
                sys.exit(f"could not download {ALPACA_EVAL_REQUIREMENT} from PyPI ({done.stderr.strip()[-300:]}); "
                         "use --prompts alpaca-demo offline")  # fmt: skip
            with tarfile.open(archive, "r:gz") as tar:
                data = tar.extractfile(ALPACA_EVAL_MEMBER).read()
        if hashlib.sha256(data).hexdigest() != ALPACA_EVAL_SHA256:
            sys.exit(f"{ALPACA_EVAL_MEMBER} does not have the expected SHA-256")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = cached.with_suffix(".tmp")
        tmp_path.write_bytes(data)
        tmp_path.replace(cached)  # atomic: never a half-written cache
    return [row["instruction"] for row in json.loads(cached.read_text(encoding="utf-8"))]


def load_instructions(name: str, count: int) -> list[str]:
    if name == "alpaca-eval":
        instructions = alpaca_eval_instructions()
        return random.Random(0).sample(instructions, count)  # the file is grouped by source; mix them
    from rtune.data.sources import load_source

    records, _ = load_source("alpaca-demo")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)  # as `rtune data prepare --seed 0`: the first ones are held out
    return [records[i]["instruction"] for i in order[:count]]


# -- backends ---------------------------------------------------------------------------------------
def suppress_stop_tokens(model, stop_ids: list[int]):
    """Make the stop tokens impossible, so every prompt runs to max_new_tokens. Returns the hook handle."""

    def hook(module, args, output):
        output.logits[..., stop_ids] = float("-inf")
        return output

    return model.register_forward_hook(hook)


def run_hf(model_name: str, instructions: list[str], max_new_tokens: int, batch_size: int, dtypes: list[str],
           single_count: int) -> None:
    """Throughput one at a time and batched, in each dtype; then greedy agreement between the dtypes."""
    import torch

    from rtune.infer.generate import GenerationConfig, generate_ids
    from rtune.infer.load import load_for_inference

    model, tokenizer, renderer = load_for_inference(model_name, template="tulu", dtype=torch.float32)
    prompts = [renderer.render_prompt(x) for x in instructions]
    print(f"HF transformers on {model.device}, {model_name}; {describe(prompts)}; {torch.get_num_threads()} threads")

    # Fixed-length runs: no stop strings either (the stop ids are suppressed by a hook).
    no_stop_strings = types.SimpleNamespace(stop_ids=renderer.stop_ids, stop_strings=[])

    def timed(batch: list[list[int]], bs: int) -> float:
        config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=bs)
        start = time.perf_counter()
        gens = generate_ids(model, tokenizer, no_stop_strings, batch, config)
        seconds = time.perf_counter() - start
        assert all(g.num_tokens == max_new_tokens for g in gens), "a prompt stopped early"
        return seconds

    rates, outputs = {}, {}
    for dtype in dtypes:
        model.to(getattr(torch, dtype))
        hook = suppress_stop_tokens(model, renderer.stop_ids)
        generate_ids(model, tokenizer, renderer, prompts[:1], GenerationConfig(max_new_tokens=2))  # warm-up
        # One at a time on the first single_count prompts (it is slow), batched on all of them.
        rates[f"{dtype}, one at a time"] = single_count / timed(prompts[:single_count], 1)
        rates[f"{dtype}, batched ({batch_size})"] = len(prompts) / timed(prompts, batch_size)
        hook.remove()
        # Greedy answers as an evaluation produces them (stops on), for the agreement between dtypes.
        config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
        outputs[dtype] = [g.text for g in generate_ids(model, tokenizer, renderer, prompts, config)]
    for label, rate in rates.items():
        print(f"{label:>26}: {rate:7.3f} prompts/s  {rate * max_new_tokens:8.1f} generated tokens/s")
    for dtype in dtypes:
        single, batched = rates[f"{dtype}, one at a time"], rates[f"{dtype}, batched ({batch_size})"]
        print(f"speed-up, {dtype} batched over {dtype} one at a time: {batched / single:.2f}x")
    if len(dtypes) == 2:
        first, second = dtypes
        best, base = rates[f"{second}, batched ({batch_size})"], rates[f"{first}, one at a time"]
        print(f"speed-up, {second} batched over {first} one at a time: {best / base:.2f}x")
        same = sum(a == b for a, b in zip(outputs[first], outputs[second]))
        lo, hi = wilson(same, len(prompts))
        print(f"greedy agreement {first} vs {second} (identical answers, stops on, up to {max_new_tokens} tokens): "
              f"{same}/{len(prompts)} = {same / len(prompts):.0%} (95% Wilson interval {lo:.0%}-{hi:.0%})")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def run_vllm(model_name: str, instructions: list[str], max_new_tokens: int) -> None:
    try:
        import torch
        import vllm
    except ImportError:
        sys.exit("--backend vllm: vllm is not installed (pip install vllm, on a machine with a CUDA GPU)")
    if not torch.cuda.is_available():
        sys.exit("--backend vllm: no CUDA GPU is available")
    from rtune.models import load_tokenizer, resolve_model
    from rtune.render import Renderer

    renderer = Renderer(load_tokenizer(model_name), "tulu")
    prompts = [renderer.render_prompt(x) for x in instructions]  # the very same token ids as the HF backend
    llm = vllm.LLM(model=resolve_model(model_name).path, dtype="bfloat16", seed=0)
    print(f"vLLM {vllm.__version__}, bfloat16 on {torch.cuda.get_device_name()}; {describe(prompts)}")
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": ids} for ids in prompts]

    llm.generate(inputs[:1], vllm.SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    for one in inputs:
        outs_one = llm.generate([one], params, use_tqdm=False)
        assert len(outs_one[0].outputs[0].token_ids) == max_new_tokens
    single_s = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_new_tokens for o in outs)
    report(len(prompts), max_new_tokens, batched_s, single_s, "all prompts in one call", "one prompt per call")


# -- output -----------------------------------------------------------------------------------------
def describe(prompts: list[list[int]]) -> str:
    lengths = [len(p) for p in prompts]
    return f"{len(prompts)} prompts, prompt tokens mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}"


def report(n: int, max_new_tokens: int, batched_s: float, single_s: float, batched: str, single: str) -> None:
    tokens = n * max_new_tokens
    for label, seconds in [(batched, batched_s), (single, single_s)]:
        rates = f"{n / seconds:7.3f} prompts/s  {tokens / seconds:8.1f} generated tokens/s"
        print(f"{label:>26}: {rates}  ({seconds:.1f} s)")
    print(f"speed-up: {single_s / batched_s:.2f}x  ({max_new_tokens} new tokens per prompt, stop tokens suppressed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompts", choices=["alpaca-eval", "alpaca-demo"], default="alpaca-eval")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="HF backend: prompts per batch (default 16)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="HF backend: the dtypes to measure, comma-separated (default both, and their agreement)")
    parser.add_argument("--single", type=int, default=None,
                        help="HF backend: prompts generated one at a time (default all; it is the slow part)")
    args = parser.parse_args()

    instructions = load_instructions(args.prompts, args.num_prompts)
    if args.backend == "vllm":
        run_vllm(args.model, instructions, args.max_new_tokens)
    else:
        run_hf(args.model, instructions, args.max_new_tokens, args.batch_size, args.dtypes.split(","),
               min(args.single or args.num_prompts, args.num_prompts))


if __name__ == "__main__":
    main()
