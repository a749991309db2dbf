"""Batched generation from a model, a run folder or a merged folder.

Prompts are rendered with the same Renderer as training (`render_prompt`), so a run answers in the
exact format it was trained on. Batches are left-padded here, not by the tokenizer, and sorted by
length so little padding is wasted; HF `generate` derives position ids from the attention mask,
so a prompt gets the same greedy tokens alone or in a batch in fp32 (tested with a tiny Llama
and a tiny GPT-2, whose learned absolute positions would expose wrong position ids).

Every generation setting is passed explicitly: a checkpoint's own generation_config.json (often
sampling with a temperature) never leaks into greedy evaluation runs.

A reply ends at a stop id (EOS, end of turn: finish_reason "eos"), at a stop string (the renderer's
next-turn headers such as "<|user|>", plus `GenerationConfig.stop`: "stop"), or at max_new_tokens
("length"). Stop strings use HF's StopStringCriteria, so each row of a batch stops on its own, but
only on the generated tokens: HF's stock `stop_strings` also matches a stop string that begins in the
prompt (with a prompt ending in a newline, a blank-line stop fires after one generated newline). The
text is then cut at the earliest stop string, with the whitespace before it, and the renderer's
reply cleanup applies (the in-context formats strip a trailing code fence: `Renderer.reply_cleanup`).

`GenerationConfig.rules` adds the rule-based adapter of Hewitt et al. 2024 (rtune.infer.rules) as a
logits processor, one per batch (the diversity rule needs each row's prompt).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rtune.errors import RtuneError

if TYPE_CHECKING:
    from rtune.infer.rules import RulesConfig


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
    stop: list[str] = field(default_factory=list)  # extra stop strings; the renderer's own always apply
    # The rule-based adapter of Hewitt et al. 2024 (rtune.infer.rules.RulesConfig); None: off.
    rules: "RulesConfig | None" = None

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
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RtuneError(f"stop strings must be non-empty text, got {s!r}")
        if self.rules is not None:
            self.rules.check()
        return self


FINISH_REASONS = ("eos", "stop", "length")
# A server that says only that a reply stopped, not whether at an end id or a stop string
# (rtune.infer.backends.endpoint): counted apart, never guessed.
ENDED = "ended"


@dataclass
class Generation:
    # Decoded reply, special tokens skipped, ending before the stop: a stop id, or a stop string
    # (removed with the whitespace before it); then the renderer's reply cleanup, if it has one.
    text: str
    # Generated ids up to the stop: a stop id is excluded; for a stop string, the ids up to the one
    # that completes `text` (that one may also hold the start of the stop string, e.g. "\n<|").
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos": a stop id; "stop": a stop string; "length": max_new_tokens
    num_tokens: int = 0  # len(token_ids)
    # The stop id that ended the reply (generated, not in token_ids); None after a stop string or at the length limit.
    stop_id: int | None = None
    stop_string: str | None = None  # the stop string the text was cut at (finish "stop" without a stop id)
    # Where token_ids come from, for backends other than HF: "server" (the engine's own ids) or
    # "retokenized" (a server that returns text only: its text tokenized here). None: this model's.
    token_ids_from: str | None = None

    @property
    def finished(self) -> bool:
        """True unless the reply was cut at max_new_tokens."""
        return self.finish_reason != "length"


# -- stops ------------------------------------------------------------------------------------------
def reply_stop_strings(renderer, config: GenerationConfig) -> list[str]:
    """The renderer's stop strings (next-turn headers) and the user's, without duplicates."""
    strings = list(getattr(renderer, "stop_strings", [])) + list(config.stop)
    return list(dict.fromkeys(s for s in strings if s))


class _Stops:
    """What ends a reply: stop ids (finish "eos") and stop strings (finish "stop").

    A stop string that is a special token (e.g. "<|user|>" added as one) is matched as an id:
    decoding skips special tokens, so it could not be found in the text. The same split serves the
    other generation backends (rtune.infer.backends), which send the ids as vLLM's stop_token_ids.
    """

    def __init__(self, tokenizer, renderer, config: GenerationConfig):
        self.eos_ids = list(renderer.stop_ids)
        strings = reply_stop_strings(renderer, config)
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special = {t.content: i for i, t in decoder.items() if getattr(t, "special", False)}
        self.string_ids = [special[s] for s in strings if s in special and special[s] not in self.eos_ids]
        self.strings = [s for s in strings if s not in special]
        self.all_ids = self.eos_ids + self.string_ids
        self.cleanup = getattr(renderer, "reply_cleanup", None)  # e.g. a trailing code fence stripped
        self.tokenizer = tokenizer

    def criteria(self, prompt_width: int):
        from transformers import StoppingCriteriaList

        # Built here, not in __init__: only HF generation needs the vocabulary scan.
        matcher = _stop_string_matcher(self.tokenizer, tuple(self.strings)) if self.strings else None
        return StoppingCriteriaList([_ReplyStopStrings(matcher, prompt_width)] if matcher else [])


# HF's StopStringCriteria scans the whole vocabulary when built (about 3 s for Gemma's 262k tokens). HF
# caches it keyed by the get_vocab() order, which varies from call to call for fast tokenizers, so its
# cache never hits; this one is keyed by the tokenizer object (a chat builds it once, not every turn).
_MATCHERS: OrderedDict = OrderedDict()


def _stop_string_matcher(tokenizer, strings: tuple[str, ...]):
    from transformers import StopStringCriteria

    key = (id(tokenizer), len(tokenizer), strings)
    hit = _MATCHERS.get(key)
    if hit is not None and hit[0]() is tokenizer:
        _MATCHERS.move_to_end(key)
        return hit[1]
    try:
        matcher = StopStringCriteria(tokenizer, list(strings))
    except ValueError as e:
        raise RtuneError(f"stop strings {list(strings)}: {e}") from e
    _MATCHERS[key] = (weakref.ref(tokenizer), matcher)
    while len(_MATCHERS) > 8:
        _MATCHERS.popitem(last=False)
    return matcher


class _ReplyStopStrings:
    """HF's StopStringCriteria on the generated tokens only (columns from prompt_width on: the same
    for every row, the batch being left-padded), so a stop string cannot begin in the prompt."""

    def __init__(self, matcher, prompt_width: int):
        self.matcher, self.prompt_width = matcher, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        return self.matcher(input_ids[:, self.prompt_width :], scores, **kwargs)


def _first_stop(text: str, strings: list[str]) -> tuple[int, str] | None:
    """(where, which): the earliest stop string in `text` (the longest of those starting there), or None."""
    found = [(i, -len(s), s) for s, i in ((s, text.find(s)) for s in strings) if i >= 0]
    if not found:
        return None
    at, _, string = min(found)
    return at, string


# -- generation -------------------------------------------------------------------------------------
def _hf_generation_config(tokenizer, stops: _Stops, config: GenerationConfig):
    from transformers import GenerationConfig as HFGenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = stops.eos_ids[0]
    settings = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        num_beams=1,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=0,
        min_length=0,
        eos_token_id=stops.all_ids,
        pad_token_id=pad_id,
    )
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    else:
        # Set (so the checkpoint's own values are not filled in), and HF's defaults (so HF does not
        # warn that sampling flags are set for greedy decoding, which ignores them anyway).
        settings.update(temperature=1.0, top_p=1.0, top_k=50)
    return HFGenerationConfig(**settings), pad_id


def _left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _split_generated(new_ids: list[int], stop_ids: list[int]) -> tuple[list[int], int | None]:
    """Generated ids up to the first stop id, and that id (None: there was none).

    Rows that stop early are padded (with pad_id) while the rest of the batch continues; the padding
    comes after the stop id, so cutting there removes it. A row without a stop id ran to
    max_new_tokens or stopped at a stop string (then the cut at the string removes the padding).
    """
    stops = set(stop_ids)
    for i, t in enumerate(new_ids):
        if t in stops:
            return new_ids[:i], t
    return new_ids, None


def _covering_prefix(tokenizer, ids: list[int], text: str) -> int:
    """The fewest leading ids whose decoded text starts with `text` (a prefix of decode(ids))."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenizer.decode(ids[:mid], skip_special_tokens=True).startswith(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _finish(tokenizer, new_ids: list[int], stops: _Stops) -> Generation:
    """One row of generated ids (padding included) as a Generation cut at its first stop."""
    ids, stop_id = _split_generated(new_ids, stops.all_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = _first_stop(text, stops.strings)
    if cut is not None:
        text = text[: cut[0]].rstrip()
        ids = ids[: _covering_prefix(tokenizer, ids, text)]
        reason = "stop"
    elif stop_id is None:
        reason = "length"
    else:
        reason = "eos" if stop_id in stops.eos_ids else "stop"
    if stops.cleanup is not None:
        clean = stops.cleanup(text)
        if clean != text:
            text = clean
            ids = ids[: _covering_prefix(tokenizer, ids, text)]
    return Generation(text=text, token_ids=ids, finish_reason=reason, num_tokens=len(ids),
                      stop_id=stop_id if reason != "length" and cut is None else None,
                      stop_string=cut[1] if cut is not None else None)


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

    stops = _Stops(tokenizer, renderer, config)
    gen_config, pad_id = _hf_generation_config(tokenizer, stops, config)
    rules = None
    if config.rules is not None:
        from rtune.infer.rules import RuleModel

        rules = RuleModel(tokenizer, renderer, config.rules)
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
                processors = None
                if rules is not None:
                    from transformers import LogitsProcessorList

                    processors = LogitsProcessorList([rules.processor([prompts[i] for i in idx], input_ids.shape[1])])
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=gen_config,
                    logits_processor=processors,
                    stopping_criteria=stops.criteria(input_ids.shape[1]),
                    streamer=streamer,
                )
                new = out[:, input_ids.shape[1] :].tolist()
                for row, i in enumerate(idx):
                    results[i] = _finish(tokenizer, new[row], stops)
                bar.update(len(idx))
    finally:
        bar.close()
    return results  # type: ignore[return-value]
