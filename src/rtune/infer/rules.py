"""The rule-based adapter of Hewitt et al. 2024 (arXiv 2409.14254), for any tokenizer.

A product of experts: the base model's log-probabilities plus a hand-written rule model's
log-scores, decoded greedily by default. Three rules, each switchable (`RulesConfig`):

- eos: a bias on the template's end token(s) growing linearly with the reply's length, from 0 at
  its first token to +15 after 250 tokens, so answers end. The bias is held at +15 after that (the
  authors' code drops it to 0 past 250 tokens; a reply that has not ended by then should still end).
- uniform: fixed log-scores on a few words in every position (`UNIFORM`): penalties on words that
  continue the request or hedge ("I", "What", "We", "should") and on markup that imitates the
  template's tags ("<", "|"); small bonuses on list and structure tokens ("-", "*", "#", newlines).
- diversity: -1.5 on every token already seen from the instruction's first token on (the
  instruction, the template text after it, the reply so far), so the model does not echo the
  request or repeat itself. This is the authors' code; their paper speaks of the instruction.

The authors hard-code Llama-2 ids. Here a word's ids are every id whose decoded text is the word,
with or without a leading space (byte-level "Ġ", SentencePiece "▁", byte fallback "<0x0A>" all
decode to it); the index of decoded texts is built once per tokenizer (1 s for Gemma's 262k tokens).

Adding the rule scores to log-softmax(logits) is the product of experts up to a constant per step
(the rule model's normaliser), so greedy picks the same token as adding them to the logits; with
sampling HF renormalises, and the temperature and top-k/top-p warpers apply after the product.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor

from rtune import run_folder
from rtune.errors import RtuneError

RULES = ("eos", "uniform", "diversity")

# The uniform rule: word -> log-score, the authors' Llama-2 choices as words.
UNIFORM = {
    "<": -4.0,  # markup: the prompt's tags (<|assistant|>) are likely to be imitated
    "|": -4.0,
    "I": -5.0,  # "I" / "We" / "What" continue the request or say the model cannot answer
    "We": -3.0,
    "What": -5.0,
    "should": -6.0,
    "-": 1.0,  # structure: lists, emphasis, headings, line breaks
    "*": 1.0,
    "#": 1.0,
    "##": 1.0,
    "\n": 1.0,
    "\n\n": 1.0,  # one token in Gemma and SmolLM2 (two "\n" in Llama-2, each with the bonus)
    "!": 1.0,
}


@dataclass
class RulesConfig:
    """Which rules apply and how strongly (the defaults are the authors')."""

    eos: bool = True
    uniform: bool = True
    diversity: bool = True
    eos_max: float = 15.0  # the end-token bias reached after eos_tokens reply tokens (then held)
    eos_tokens: int = 250
    uniform_scale: float = 1.0  # multiplies every UNIFORM score
    diversity_penalty: float = 1.5

    @classmethod
    def parse(cls, names: str, **strengths) -> "RulesConfig":
        """'eos,uniform,diversity' (any subset) plus strengths (None: the default)."""
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in RULES]
        if unknown or not chosen:
            raise RtuneError(f"--rules takes a comma-separated subset of {','.join(RULES)}, got {names!r}")
        config = cls(**{r: r in chosen for r in RULES}, **{k: v for k, v in strengths.items() if v is not None})
        return config.check()

    def check(self) -> "RulesConfig":
        if not (self.eos or self.uniform or self.diversity):
            raise RtuneError("rules: every rule is off; leave --rules out instead")
        if self.eos_tokens < 1:
            raise RtuneError(f"rules: eos_tokens must be >= 1, got {self.eos_tokens}")
        for name in ("eos_max", "uniform_scale", "diversity_penalty"):
            if getattr(self, name) < 0:
                raise RtuneError(f"rules: {name} must be >= 0, got {getattr(self, name)}")
        return self

    @property
    def names(self) -> list[str]:
        return [r for r in RULES if getattr(self, r)]

    @property
    def label(self) -> str:
        """'rules' with every rule on, else e.g. 'rules-eos-uniform' (a model label's suffix)."""
        return "rules" if len(self.names) == len(RULES) else "rules-" + "-".join(self.names)

    def to_dict(self) -> dict:
        return asdict(self)


def check_untrained(model_or_run, rules: RulesConfig | None) -> None:
    """The rules are a baseline for untrained models: a run or merged folder is refused."""
    if rules is not None and run_folder.has_template(model_or_run):
        raise RtuneError(f"{model_or_run} is a trained model (a run or merged folder); --rules is the rule-based "
                         "baseline for an untrained base model (Hewitt et al. 2024): give the base model, or leave "
                         "--rules out")


# -- token sets ------------------------------------------------------------------------------------
_INDEXES: OrderedDict = OrderedDict()  # (id(tokenizer), len) -> (weakref, index): one build per tokenizer


def vocab_index(tokenizer) -> dict[str, list[int]]:
    """Decoded text (one leading space dropped) -> every non-special id that decodes to it."""
    key = (id(tokenizer), len(tokenizer))
    hit = _INDEXES.get(key)
    if hit is not None and hit[0]() is tokenizer:
        _INDEXES.move_to_end(key)
        return hit[1]
    special = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {i for i, t in decoder.items() if getattr(t, "special", False)}
    # One batch call: Rust decodes the whole vocabulary at once (per-id decode calls take minutes).
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    index: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        if i not in special:
            index.setdefault(text[1:] if text.startswith(" ") else text, []).append(i)
    _INDEXES[key] = (weakref.ref(tokenizer), index)
    while len(_INDEXES) > 4:
        _INDEXES.popitem(last=False)
    return index


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class RuleModel:
    """The rules for one tokenizer and template: token sets, end ids, where an instruction begins."""

    def __init__(self, tokenizer, renderer, config: RulesConfig):
        self.config = config.check()
        self.tokenizer = tokenizer
        self.end_ids = list(renderer.template.end_ids) or list(renderer.stop_ids)
        if config.eos and not self.end_ids:
            raise RtuneError("rules: the eos rule needs an end token and this template has none")
        index = vocab_index(tokenizer) if config.uniform else {}
        self.uniform = {word: (score * config.uniform_scale, index.get(word, [])) for word, score in UNIFORM.items()}
        # An instruction begins where a prompt leaves the empty instruction's prompt (the template's
        # fixed text and any in-context demonstrations before it are not the instruction).
        self.probe = renderer.render_prompt("")
        self.template_name = renderer.template_name

    def instruction_start(self, prompt: list[int]) -> int:
        return _common_prefix(prompt, self.probe)

    def uniform_bias(self, width: int) -> torch.Tensor:
        bias = torch.zeros(width)
        for score, ids in self.uniform.values():
            bias[[i for i in ids if i < width]] += score
        return bias

    def processor(self, prompts: list[list[int]], prompt_width: int) -> "RulesProcessor":
        """The logits processor for one left-padded batch of these prompts (prompt_width columns)."""
        return RulesProcessor(self, prompts, prompt_width)

    def describe(self) -> str:
        """What --rules-show prints: the rules, their strengths and the token sets found."""
        c, tok = self.config, self.tokenizer
        lines = [f"rules {','.join(c.names)} ({self.template_name} template, {len(tok)} tokens)"]
        if c.eos:
            ends = ", ".join(f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in self.end_ids)
            lines.append(f"  eos        +{c.eos_max:g} * min(n, {c.eos_tokens}) / {c.eos_tokens} after n reply "
                         f"tokens, on {ends}")
        if c.uniform:
            for word, (score, ids) in self.uniform.items():
                found = ", ".join(f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in ids) or "(none in this vocabulary)"
                lines.append(f"  uniform    {score:+g} {word!r}: {found}")
        if c.diversity:
            lines.append(f"  diversity  -{c.diversity_penalty:g} on each token seen from the instruction's first token "
                         "on (instruction, template after it, reply so far)")
        return "\n".join(lines)


class RulesProcessor(LogitsProcessor):
    """log_softmax(scores) + the rules' log-scores, for one batch (the same rules for every row)."""

    def __init__(self, rules: RuleModel, prompts: list[list[int]], prompt_width: int):
        self.rules, self.prompt_width = rules, prompt_width
        self.seen = [p[rules.instruction_start(p):] for p in prompts]  # per row: instruction on, unpadded
        self._uniform: torch.Tensor | None = None
        self._instruction: torch.Tensor | None = None  # (rows, width) bool: in the instruction span

    def _prepare(self, scores: torch.Tensor) -> None:
        width = scores.shape[-1]
        if self._uniform is not None and self._uniform.shape[-1] == width:
            return
        self._uniform = self.rules.uniform_bias(width).to(scores.device)
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        for row, ids in enumerate(self.seen):
            mask[row, [i for i in ids if i < width]] = True
        self._instruction = mask.to(scores.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        c = self.rules.config
        self._prepare(scores)
        out = scores.float().log_softmax(dim=-1)
        reply = input_ids[:, self.prompt_width:]  # left-padded batch: every row's reply starts here
        if c.uniform:
            out = out + self._uniform
        if c.diversity:
            # Once per token however often it was seen. End tokens are exempt: in a chat the earlier
            # turns' end tokens would otherwise work against the eos rule.
            seen = self._instruction.clone().scatter_(1, reply, True)
            seen[:, self.rules.end_ids] = False
            out = out - c.diversity_penalty * seen
        if c.eos:
            out[:, self.rules.end_ids] += c.eos_max * min(reply.shape[1], c.eos_tokens) / c.eos_tokens
        return out
