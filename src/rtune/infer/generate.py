"""Batched generation from a model, a run folder or a merged folder.

Prompts are rendered with the same Renderer as training (`render_prompt`), so a run answers in the
exact format it was trained on. Batches are left-padded here, not by the tokenizer, and sorted by
length so little padding is wasted; HF `generate` derives position ids from the attention mask,
so a prompt gets the same greedy tokens alone or in a batch in fp32 (tested with a tiny Llama
and a tiny GPT-2, whose learned absolute positions would expose wrong position ids).

Every generation setting is passed explicitly: a checkpoint's own generation_config.json (often
sampling with a temperature) never leaks into greedy evaluation runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtune.data import read_prompts
from rtune.errors import RtuneError
from rtune.infer.load import load_for_inference
from rtune.io import write_jsonl_atomic


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False  # greedy by default: reproducible evaluation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    repetition_penalty: float = 1.0
    batch_size: int = 8
    seed: int = 0

    def check(self) -> "GenerationConfig":
        if self.max_new_tokens < 1:
            raise RtuneError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise RtuneError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise RtuneError(f"temperature must be > 0, got {self.temperature} (use greedy decoding instead of 0)")
        if not 0 < self.top_p <= 1:
            raise RtuneError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RtuneError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise RtuneError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


@dataclass
class Generation:
    text: str  # decoded reply, stop token excluded, special tokens skipped
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token excluded
    finished: bool = False  # True iff the model emitted a stop id (False: cut at max_new_tokens)
    num_tokens: int = 0  # len(token_ids)


# -- generation -------------------------------------------------------------------------------------
def _hf_generation_config(tokenizer, renderer, config: GenerationConfig):
    from transformers import GenerationConfig as HFGenerationConfig

    stop_ids = list(renderer.stop_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = stop_ids[0]
    settings = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        num_beams=1,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=0,
        min_length=0,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    else:
        # Set (so the checkpoint's own values are not filled in), and HF's defaults (so HF does not
        # warn that sampling flags are set for greedy decoding, which ignores them anyway).
        settings.update(temperature=1.0, top_p=1.0, top_k=50)
    return HFGenerationConfig(**settings), stop_ids, pad_id


def _left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _split_generated(new_ids: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """Generated ids up to the first stop id, and whether there was one.

    Rows that stop early are padded (with pad_id) while the rest of the batch continues; the padding
    comes after the stop id, so cutting there removes it. A row without a stop id ran to
    max_new_tokens and was never padded.
    """
    stops = set(stop_ids)
    for i, t in enumerate(new_ids):
        if t in stops:
            return new_ids[:i], True
    return new_ids, False


def _model_device(model):
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def generate_ids(
    model,
    tokenizer,
    renderer,
    prompts: list[list[int]],
    config: GenerationConfig | None = None,
    *,
    streamer=None,
    progress: bool = False,
) -> list[Generation]:
    """Generate a reply for each prompt (token ids from the renderer); results are in input order.

    `streamer` (a transformers streamer) is only allowed with a single prompt.
    """
    config = (config or GenerationConfig()).check()
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if not p:
            raise RtuneError(f"prompt {i} is empty (no token ids)")
    if streamer is not None and len(prompts) > 1:
        raise RtuneError("streaming is only supported for a single prompt")

    gen_config, stop_ids, pad_id = _hf_generation_config(tokenizer, renderer, config)
    device = _model_device(model)
    # Longest first: similar lengths share a batch (less padding) and an out-of-memory shows at once.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[Generation | None] = [None] * len(prompts)

    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only on a terminal, so logs and tests stay clean.
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=None if progress else True)
    if config.do_sample:
        torch.manual_seed(config.seed)  # once per call: the same call with the same seed samples the same
    try:
        with torch.inference_mode():
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                input_ids, attention_mask = _left_pad([prompts[i] for i in idx], pad_id, device)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=gen_config,
                    streamer=streamer,
                )
                new = out[:, input_ids.shape[1] :].tolist()
                for row, i in enumerate(idx):
                    ids, finished = _split_generated(new[row], stop_ids)
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    results[i] = Generation(text=text, token_ids=ids, finished=finished, num_tokens=len(ids))
                bar.update(len(idx))
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def generate_file(
    model_or_run: str,
    prompts_path: str,
    out_path: str,
    config: GenerationConfig | None = None,
    template: str | None = None,
    method_label: str | None = None,
) -> dict:
    """Answer every prompt in a file and write JSONL {"id", "instruction", "output", "finished",
    "num_tokens", "generator"} in input order, atomically. Returns a summary."""
    config = (config or GenerationConfig()).check()
    # Read the prompts before loading the model: a bad file fails in a second, not after a load.
    prompts = read_prompts(prompts_path)
    model, tokenizer, renderer = load_for_inference(model_or_run, template=template)
    generator = method_label or Path(str(model_or_run).rstrip("/")).name

    start = time.perf_counter()
    rows = answer_prompts(model, tokenizer, renderer, prompts, config, generator, progress=True)
    seconds = time.perf_counter() - start
    write_jsonl_atomic(out_path, rows)
    n = len(rows)
    return {
        "out": str(out_path),
        "count": n,
        "finished_share": sum(r["finished"] for r in rows) / n,
        "mean_tokens": sum(r["num_tokens"] for r in rows) / n,
        "seconds": round(seconds, 3),
        "prompts_per_s": round(n / seconds, 3) if seconds > 0 else None,
    }


def answer_prompts(model, tokenizer, renderer, prompts: list[dict], config: GenerationConfig, generator: str,
                   *, progress: bool = False) -> list[dict]:
    """Answer read_prompts() records: {"id", "instruction", "output", "finished", "num_tokens",
    "generator"} each, in input order (the rows generate_file writes)."""
    ids = [renderer.render_prompt(p["instruction"]) for p in prompts]
    gens = generate_ids(model, tokenizer, renderer, ids, config, progress=progress)
    return [
        {
            "id": p["id"],
            "instruction": p["instruction"],
            "output": g.text,
            "finished": g.finished,
            "num_tokens": g.num_tokens,
            "generator": generator,
        }
        for p, g in zip(prompts, gens)
    ]
