"""Records -> token ids and labels, with the loss mask built while rendering.

A conversation is rendered as a list of segments, each either a piece of text or a special token
id, and each either trained or not. Segments are tokenized one by one and their labels are set as
they are appended, so the mask is exact for any tokenizer: nothing searches for a marker string
afterwards (the most reported SFT masking bug), and a response can never be half-masked by a
token that straddles the prompt/response boundary.

Methods (An, Kim & Kim 2024; Hewitt et al. 2024):
    it             <|user|>\\n{instruction}\\n<|assistant|>\\n{response}{eos}
    rt             <|assistant|>\\n{response}{eos}
    rt-empty-user  <|user|>\\n\\n<|assistant|>\\n{response}{eos}
    prompt         <|user|>\\n{instruction}\\n<|assistant|>\\n           (inference, all methods)
Only the response and the end token are trained (labels elsewhere are -100).

Templates: "tulu" (the paper's plain-text tags, the default) or "model" (the tokenizer's own chat
template, decomposed into the same segments; see `ModelTemplate`). For inference only, the in-context
formats "urial", "urial-r" and "zero-shot" prompt an untrained base model with demonstrations
(`IclTemplate`; `Renderer(tokenizer, "urial-r", icl_file=...)`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from rtune.errors import RtuneError
from rtune.render.templates import ICL_TEMPLATES, IclTemplate, ModelTemplate, Segment, TuluTemplate, load_demonstrations

IGNORE = -100
METHODS = ("rt", "it", "rt-empty-user")
TEMPLATES = ("tulu", "model")  # what training renders with
ALL_TEMPLATES = TEMPLATES + ICL_TEMPLATES  # and the in-context formats, for inference
RENDER_FORMAT_VERSION = 1


@dataclass
class RenderedSequence:
    input_ids: list[int]
    labels: list[int]
    id: str = ""

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class RenderStats:
    records: int = 0
    rendered: int = 0
    dropped_nothing_trained: int = 0
    truncated: int = 0  # the response was cut (the same records under every method)
    instruction_truncated: int = 0  # the instruction was cut to fit (it only)
    tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise RtuneError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def training_messages(record: dict, method: str) -> list[dict]:
    """The conversation a record is trained as, for each method."""
    check_method(method)
    response = record.get("response")
    if not isinstance(response, str) or not response.strip():
        raise RtuneError(f"record {record.get('id', '?')!r}: empty or missing 'response'")
    if method == "rt":
        return [{"role": "assistant", "content": response}]
    if method == "rt-empty-user":
        return [{"role": "user", "content": ""}, {"role": "assistant", "content": response}]
    instruction = record.get("instruction") or ""
    if not instruction.strip():
        raise RtuneError(
            f"record {record.get('id', '?')!r} has no instruction, which --method it needs "
            "(response-only data trains with --method rt or rt-empty-user)"
        )
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


def _encode(tokenizer, text: str) -> list[int]:
    """Tokenize text as text: no special tokens added, and none parsed from their spellings.

    A response that mentions `<eos>` or `<|im_end|>` (a tokenizer tutorial, a code sample) gets the
    pieces of that text, never the control token. Byte-level BPE tokenizers (Gemma 3, Llama 3,
    Qwen, SmolLM2) give the same ids as tokenizing the joined text at segment boundaries.
    SentencePiece tokenizers with a dummy prefix (Llama 2, Mistral) start each segment with a
    prefix-space piece; that is harmless because inference tokenizes the prompt the same way.
    """
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _special_splitter(tokenizer):
    """A function that splits template text at special-token spellings: [text, id, text, id, ...].

    Only template text goes through it (content never does). Like the tokenizer's own splitting,
    a token marked lstrip / rstrip takes the whitespace on its left / right with it."""
    specials = {a.content: (i, a.lstrip, a.rstrip) for i, a in tokenizer.added_tokens_decoder.items()
                if a.special and a.content}
    if not specials:
        return lambda text: [text]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def split(text: str) -> list:
        parts: list = []
        pos = 0
        for m in pattern.finditer(text):
            token_id, lstrip, rstrip = specials[m.group()]
            before = text[pos:m.start()]
            parts += [before.rstrip() if lstrip else before, token_id]
            pos = m.end()
            if rstrip:
                pos = len(text) - len(text[pos:].lstrip())
        return parts + [text[pos:]]

    return split


def _bos_policy(tokenizer) -> int | None:
    """The BOS id the tokenizer itself puts first (the one the model was pre-trained with), or None."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and with_special[:1] == [bos] and without[:1] != [bos]:
        return bos
    return None


def _prefix_length(seq: RenderedSequence) -> int:
    """Tokens before the first trained one."""
    return next((i for i, label in enumerate(seq.labels) if label != IGNORE), len(seq.labels))


def _untrained_tail(seq: RenderedSequence) -> int:
    """Untrained tokens after the last trained one (e.g. the newline after <|im_end|>)."""
    return next((i for i, label in enumerate(reversed(seq.labels)) if label != IGNORE), 0)


class Renderer:
    """Renders records and conversations for one tokenizer and one template."""

    def __init__(self, tokenizer, template: str = "tulu", *, icl_file=None, demonstrations: list[dict] | None = None,
                 _saved: dict | None = None):
        """template: tulu | model, or an in-context format (urial | urial-r | zero-shot, inference only)
        whose demonstrations are rtune's own, `demonstrations` ([{"query", "answer"}]) or `icl_file`'s."""
        if template not in ALL_TEMPLATES:
            raise RtuneError(f"unknown template {template!r}: choose one of {', '.join(ALL_TEMPLATES)}")
        if (icl_file is not None or demonstrations is not None) and template not in ICL_TEMPLATES:
            raise RtuneError(f"demonstrations (--icl-file) go with --icl {' or '.join(ICL_TEMPLATES[:2])}, "
                             f"not with the {template} template")
        self.tokenizer = tokenizer
        self.template_name = template
        saved = _saved or {}
        if template == "tulu":
            self.template = TuluTemplate(tokenizer, saved.get("strings"))
        elif template == "model":
            self.template = ModelTemplate(tokenizer, saved.get("chat_template"))
        else:
            if icl_file is not None:
                if demonstrations is not None:
                    raise RtuneError("give demonstrations or icl_file, not both")
                if template == "zero-shot":
                    raise RtuneError("--icl zero-shot uses no demonstrations; leave --icl-file out")
                demonstrations = load_demonstrations(icl_file, template)
            if _saved is not None:
                demonstrations = saved.get("demonstrations") or None
            self.template = IclTemplate(tokenizer, template, demonstrations)
        self.bos_id = _bos_policy(tokenizer)
        self._split_specials = _special_splitter(tokenizer)
        self._fixed_prefix: int | None = None

    # -- the one place where segments become ids and labels -------------------------------------
    def _tokenize(self, segments: list[Segment]) -> tuple[list[int], list[int]]:
        # Template text: its special-token spellings become ids (content's never do).
        pieces: list[Segment] = []
        for seg in segments:
            if seg.ids is not None or seg.content:
                pieces.append(seg)
                continue
            for part in self._split_specials(seg.text):
                pieces.append(Segment(ids=[part], trained=seg.trained) if isinstance(part, int)
                              else Segment(part, trained=seg.trained))
        # Adjacent untrained text is joined, so a prompt tokenizes exactly as it will at inference
        # (and as tools that tokenize the rendered string do); trained text stays a segment of its own.
        merged: list[Segment] = []
        for seg in pieces:
            if seg.ids is None and not seg.trained and merged and merged[-1].ids is None and not merged[-1].trained:
                merged[-1] = Segment(merged[-1].text + seg.text)
            elif seg.ids is not None or seg.text:
                merged.append(seg)
        input_ids: list[int] = []
        labels: list[int] = []
        for seg in merged:
            ids = list(seg.ids) if seg.ids is not None else _encode(self.tokenizer, seg.text)
            input_ids.extend(ids)
            labels.extend(ids if seg.trained else [IGNORE] * len(ids))
        if self.bos_id is not None and input_ids[:1] != [self.bos_id]:
            input_ids.insert(0, self.bos_id)
            labels.insert(0, IGNORE)
        if self.bos_id is not None and input_ids[1:2] == [self.bos_id]:
            raise RtuneError("rendering produced two BOS tokens; the template and the tokenizer both add one")
        return input_ids, labels

    # -- public API -------------------------------------------------------------------------------
    def render_messages(self, messages: list[dict]) -> RenderedSequence:
        ids, labels = self._tokenize(self.template.segments(messages, add_generation_prompt=False))
        return RenderedSequence(ids, labels)

    def _render_training(self, record: dict, method: str, max_length: int | None):
        """(sequence or None if nothing is left to train, response cut, instruction cut).

        Truncation keeps the same response tokens under every method: the response gets what is
        left of max_length after the longest prefix that has no instruction (rt-empty-user's); an
        it sequence that is still too long loses the end of its instruction, never more response.
        """
        messages = training_messages(record, method)
        seq = self.render_messages(messages)
        seq.id = str(record.get("id", ""))
        if max_length is None:
            return seq, False, False
        prefix = _prefix_length(seq)
        budget = max(0, max_length - self.fixed_prefix_length())  # response (and end) tokens kept
        trained = len(seq.input_ids) - prefix - _untrained_tail(seq)
        response_cut = trained > budget
        keep = min(trained, budget)
        instruction_cut = False
        if prefix + keep > max_length:  # only it: cut the instruction until the prompt fits
            seq = self._render_with_short_instruction(record, messages, max_length - keep)
            prefix, instruction_cut = _prefix_length(seq), True
        seq.input_ids, seq.labels = seq.input_ids[:prefix + keep], seq.labels[:prefix + keep]
        return (seq if seq.num_trained else None), response_cut, instruction_cut

    def fixed_prefix_length(self) -> int:
        """Tokens before the response when there is no instruction to cut (rt-empty-user's prompt)."""
        if self._fixed_prefix is None:
            probe = self.render_messages(training_messages({"response": "x"}, "rt-empty-user"))
            self._fixed_prefix = _prefix_length(probe)
        return self._fixed_prefix

    def _render_with_short_instruction(self, record: dict, messages: list[dict], max_prefix: int) -> RenderedSequence:
        """The it sequence with its instruction cut, token by token from its end, until the prompt fits."""
        instruction = messages[0]["content"]
        pieces = _encode(self.tokenizer, instruction)
        for n in range(len(pieces) - 1, -1, -1):
            short = self.tokenizer.decode(pieces[:n]) if n else ""
            seq = self.render_messages([{"role": "user", "content": short}, messages[1]])
            if _prefix_length(seq) <= max_prefix:
                seq.id = str(record.get("id", ""))
                return seq
        raise RtuneError(f"record {record.get('id', '?')!r}: the prompt does not fit max_length even without "
                         "an instruction")

    def render_training(self, record: dict, method: str, max_length: int | None = None) -> RenderedSequence | None:
        """The training sequence of a record, truncated to max_length; None if nothing is left to train."""
        return self._render_training(record, method, max_length)[0]

    def render_dataset(self, records: list[dict], method: str, max_length: int | None = None):
        """Render many records; returns (sequences, RenderStats)."""
        stats = RenderStats(records=len(records))
        out = []
        for r in records:
            seq, truncated, instruction_cut = self._render_training(r, method, max_length)
            stats.truncated += truncated
            stats.instruction_truncated += instruction_cut
            if seq is None:
                stats.dropped_nothing_trained += 1
                continue
            stats.rendered += 1
            stats.tokens += len(seq.input_ids)
            stats.trained_tokens += seq.num_trained
            out.append(seq)
        return out, stats

    def render_prompt(self, instruction: str) -> list[int]:
        """Inference prompt for one instruction (the same for every method)."""
        return self.render_chat_prompt([{"role": "user", "content": instruction}])

    def render_chat_prompt(self, messages: list[dict]) -> list[int]:
        """Inference prompt for a conversation that ends with a user turn."""
        if not messages or messages[-1]["role"] != "user":
            raise RtuneError("a generation prompt must end with a user message")
        ids, _ = self._tokenize(self.template.segments(messages, add_generation_prompt=True))
        return ids

    @property
    def stop_strings(self) -> list[str]:
        """Text at which generation stops and is cut (tulu: the next-turn headers <|user|>, <|assistant|>)."""
        return list(self.template.stop_strings)

    def encode_text(self, text: str) -> list[int]:
        """Content tokenized as text (no special tokens added or parsed), as every message's content is."""
        return _encode(self.tokenizer, text)

    @property
    def trainable(self) -> bool:
        """False for the in-context formats: they render prompts only, never a training example."""
        return getattr(self.template, "trainable", True)

    @property
    def reply_cleanup(self):
        """What is done to a generated reply after the stop-string cut (in-context formats: a trailing
        code fence is stripped), as a function of the text; None for the chat templates."""
        return getattr(self.template, "clean_reply", None)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn (generation stops at any of them)."""
        ids = list(self.template.end_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    def chat_template(self) -> str:
        """This renderer as a Jinja chat template, for tools that render and then tokenize a string.

        transformers' apply_chat_template, vLLM and lm-evaluation-harness give rtune's ids for any
        prompt and training pair, except for content that spells a special token: they tokenize the
        rendered string, so such a spelling becomes the control token there (rtune keeps it text)."""
        return self.template.jinja(with_bos=self.bos_id is not None)

    def to_dict(self) -> dict:
        """What a run folder stores, so that inference uses exactly the training template."""
        return {
            "version": RENDER_FORMAT_VERSION,
            "template": self.template_name,
            **self.template.to_dict(),
            "bos_id": self.bos_id,
            "end_ids": list(self.template.end_ids),
            "eos_token": self.tokenizer.eos_token,
        }

    @classmethod
    def from_dict(cls, d: dict, tokenizer) -> "Renderer":
        if d.get("version") != RENDER_FORMAT_VERSION:
            raise RtuneError(f"unsupported render format version {d.get('version')!r}")
        r = cls(tokenizer, d["template"], _saved=d)
        if r.template.end_ids != d["end_ids"] or r.bos_id != d["bos_id"]:
            raise RtuneError(
                "the tokenizer does not match the one the run was trained with "
                f"(end ids {r.template.end_ids} vs {d['end_ids']}, bos {r.bos_id} vs {d['bos_id']})"
            )
        return r
