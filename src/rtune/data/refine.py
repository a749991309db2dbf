"""`rtune data refine DATA --out FILE`: training responses rewritten by a strong instruct model.

The paper's second finding is that what the responses look like decides the model: responses
refined for clarity, structure and tone raise preference. The refiner (any OpenAI-compatible
endpoint through the judge client, or a local model) sees the request and the response between
tags, is asked to improve clarity, structure and a friendly, conversational tone without changing
what the response says, to review the response first and then to write "Refined response:"
followed by the result and nothing after it (the design of An, Kim & Kim; the prompt's wording is
rtune's own). The text after the last "Refined response:" (matched case-insensitively) replaces the
response. A reply without the marker is the refiner's final answer: it is cached and the original
kept. A reply cut at the token limit keeps the original too. A transport failure (after the
client's retries) is not cached, so the next run asks again; the record keeps its original.

Every output record keeps the original in `source_response` and says what happened in
`refine_status`: rewritten | no_marker | cut | empty | failed. Replies are cached as they arrive
(fsync'ed JSONL), so a killed run resumes without asking a finished record again; the output file
is written atomically at the end.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rtune.errors import RtuneError

TEMPLATE_VERSION = "refine-v1"
MARKER = "Refined response:"
STATUSES = ("rewritten", "no_marker", "cut", "empty", "failed")

_PROMPT = """You will improve an assistant's response to a user's request. Rewrite it so that it is clearer, better structured and written in a friendly, conversational tone, while keeping its content: the same facts, steps, answers and level of detail. Do not add new information and do not remove information.

{request_block}<response>
{response}
</response>

First review the response in a few sentences: what is already good, and what could be clearer, better organised or friendlier. Then write a line that begins with "Refined response:" followed by the improved response, and write nothing after it."""

_REQUEST_BLOCK = """<request>
{instruction}
</request>

"""


def refine_messages(instruction: str, response: str) -> list[dict]:
    """The refiner's one user turn; a response without its instruction (RT data) is shown alone."""
    block = _REQUEST_BLOCK.format(instruction=instruction) if instruction.strip() else ""
    return [{"role": "user", "content": _PROMPT.format(request_block=block, response=response)}]


_MARKER = re.compile(re.escape(MARKER), re.IGNORECASE)


def extract(text: str | None, finish_reason: str | None = None) -> tuple[str | None, str]:
    """(refined text or None, status) from a refiner reply."""
    if text is None:
        return None, "failed"
    if finish_reason == "length":
        return None, "cut"
    found = list(_MARKER.finditer(text))
    if not found:
        return None, "no_marker"
    refined = text[found[-1].end():].strip()
    return (refined, "rewritten") if refined else (None, "empty")


@dataclass
class RefineConfig:
    url: str | None = None  # an OpenAI-compatible endpoint ...
    model: str | None = None  # ... and the model it serves
    local: str | None = None  # or a local model / run folder (rtune's generation)
    template: str | None = None  # the local model's template (default: the model's own chat template)
    max_tokens: int = 2048
    concurrency: int = 8
    timeout: float = 300.0
    batch_size: int = 8  # local generation
    max_retries: int = 6  # the judge client's retry budget per record (transport failures)
    backoff: float = 1.0  # seconds, doubled per retry (with jitter)

    def check(self) -> RefineConfig:
        if (self.url is None) == (self.local is None):
            raise RtuneError("refine needs a refiner: --refiner-url URL --refiner-model NAME, or --refiner MODEL")
        if self.url is not None and not self.model:
            raise RtuneError("--refiner-url needs --refiner-model (the name the endpoint serves)")
        if self.max_tokens < 1 or self.concurrency < 1 or self.batch_size < 1:
            raise RtuneError("--refiner-max-tokens, --refiner-concurrency and the batch size must be >= 1")
        return self


def cache_path_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".refine-cache.jsonl")


def _ask_endpoint(records: list[dict], config: RefineConfig, cache: Path, progress: bool) -> list[dict]:
    from rtune.eval.judges.client import JudgeClient, JudgeRequest

    client = JudgeClient(config.url, config.model, cache, concurrency=config.concurrency, timeout=config.timeout,
                         max_retries=config.max_retries, backoff=config.backoff, api_key_env="RTUNE_REFINER_API_KEY")
    requests = [JudgeRequest({"id": r["id"]}, refine_messages(r["instruction"], r["response"]),
                             {"temperature": 0, "max_tokens": config.max_tokens}, template_version=TEMPLATE_VERSION)
                for r in records]
    results = client.judge_many(requests, progress=progress)
    return [{"text": r["text"] if r["ok"] else None, "finish_reason": r["finish_reason"], "cached": r["cached"]}
            for r in results]


def _ask_local(records: list[dict], config: RefineConfig, cache: Path, progress: bool) -> list[dict]:
    """Greedy generation with a local model, one cached line per record as each batch finishes."""
    import hashlib
    import json

    from rtune.eval.cache import JsonlCache

    store = JsonlCache(cache, {"text": str, "finish_reason": str})
    keys = [hashlib.sha256(json.dumps([TEMPLATE_VERSION, config.local, config.template, config.max_tokens,
                                       refine_messages(r["instruction"], r["response"])]).encode()).hexdigest()
            for r in records]
    todo = [i for i, k in enumerate(keys) if k not in store]
    if todo:
        from tqdm.auto import tqdm

        from rtune.infer.generate import GenerationConfig, generate_ids
        from rtune.infer.load import load_for_inference

        from rtune import run_folder

        # A plain instruct model is prompted in its own chat template; a run or merged folder brings its own.
        own = run_folder.is_run_dir(config.local) or run_folder.is_merged_dir(config.local)
        model, tokenizer, renderer = load_for_inference(config.local, config.template or (None if own else "model"))
        gen_config = GenerationConfig(max_new_tokens=config.max_tokens, batch_size=config.batch_size)
        bar = tqdm(total=len(todo), desc="refine", unit="record", disable=None if progress else True)
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            prompts = [renderer.render_chat_prompt(refine_messages(records[i]["instruction"], records[i]["response"]))
                       for i in batch]
            gens = generate_ids(model, tokenizer, renderer, prompts, gen_config)
            store.add_many({keys[i]: {"text": g.text, "finish_reason": "length" if g.finish_reason == "length"
                                      else "stop"} for i, g in zip(batch, gens)})
            bar.update(len(batch))
        bar.close()
    return [{"text": store.get(k)["text"], "finish_reason": store.get(k)["finish_reason"], "cached": i not in todo}
            for i, k in enumerate(keys)]


def refine_records(records: list[dict], config: RefineConfig, cache: str | os.PathLike,
                   progress: bool = True) -> tuple[list[dict], dict]:
    """(refined records, counts). Each record gains `source_response` and `refine_status`."""
    config.check()
    ask = _ask_endpoint if config.url is not None else _ask_local
    replies = ask(records, config, Path(cache), progress)
    out, counts = [], {s: 0 for s in STATUSES}
    for record, reply in zip(records, replies):
        refined, status = extract(reply["text"], reply["finish_reason"])
        counts[status] += 1
        out.append({**record, "response": refined if refined is not None else record["response"],
                    "source_response": record["response"], "refine_status": status})
    n = len(records)
    counts.update({
        "records": n,
        "asked": sum(not r["cached"] for r in replies),
        "from_cache": sum(bool(r["cached"]) for r in replies),
        "extraction_rate": counts["rewritten"] / n if n else None,
        "mean_chars_before": sum(len(r["response"]) for r in records) / n if n else None,
        "mean_chars_after": sum(len(r["response"]) for r in out) / n if n else None,
    })
    return out, counts


def refine_file(data: str | os.PathLike, out: str | os.PathLike, config: RefineConfig, progress: bool = True) -> dict:
    """Refine every record of an rtune JSONL file (as `rtune data prepare` writes) into `out`."""
    from rtune.data import read_records
    from rtune.io import write_jsonl_atomic

    config.check()
    records = read_records(data)
    refined, counts = refine_records(records, config, cache_path_for(out), progress)
    write_jsonl_atomic(Path(out), refined)
    from rtune.redact import redact_url

    return {"data": os.fspath(data), "out": os.fspath(out), "cache": str(cache_path_for(out)),
            "refiner": {"url": redact_url(config.url) if config.url else None, "model": config.model,
                        "local": config.local, "template_version": TEMPLATE_VERSION,
                        "max_tokens": config.max_tokens}, **counts}
