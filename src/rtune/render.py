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
template, decomposed into the same segments; see `_ModelTemplate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rtune.errors import RtuneError

IGNORE = -100
METHODS = ("rt", "it", "rt-empty-user")
TEMPLATES = ("tulu", "model")
RENDER_FORMAT_VERSION = 1

# The paper's chat format: plain-text tags, no added special tokens.
TULU = {
    "user_header": "<|user|>\n",
    "user_end": "\n",
    "assistant_header": "<|assistant|>\n",
    "turn_sep": "\n",  # after an assistant turn's end token, before the next user turn
}


@dataclass
class Segment:
    """A piece of a rendered conversation: text to tokenize, or token ids to insert as they are."""

    text: str = ""
    ids: list[int] | None = None
    trained: bool = False


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
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "rendered": self.rendered,
            "dropped_nothing_trained": self.dropped_nothing_trained,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


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
    """Tokenize one segment on its own (no special tokens added).

    Byte-level BPE tokenizers (Gemma 3, Llama 3, Qwen, SmolLM2) give the same ids as tokenizing the
    joined text at segment boundaries. SentencePiece tokenizers with a dummy prefix (Llama 2,
    Mistral) start each segment with a prefix-space piece; that is harmless because inference
    tokenizes the prompt as the same segment and the model learns to emit the response's pieces.
    """
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos_policy(tokenizer) -> int | None:
    """The BOS id the tokenizer itself puts first (the one the model was pre-trained with), or None."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and with_special[:1] == [bos] and without[:1] != [bos]:
        return bos
    return None


class _TuluTemplate:
    name = "tulu"

    def __init__(self, tokenizer, strings: dict | None = None):
        self.strings = dict(TULU if strings is None else strings)
        if tokenizer.eos_token_id is None:
            raise RtuneError("the tokenizer has no EOS token; rtune trains the EOS to make generation stop")
        self.end_ids = [tokenizer.eos_token_id]

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        s = self.strings
        out: list[Segment] = []
        for i, m in enumerate(messages):
            if m["role"] == "user":
                out.append(Segment(s["user_header"] + m["content"] + s["user_end"]))
            elif m["role"] == "assistant":
                out.append(Segment(s["assistant_header"]))
                out.append(Segment(m["content"], trained=True))
                out.append(Segment(ids=list(self.end_ids), trained=True))
                if i + 1 < len(messages):
                    out.append(Segment(s["turn_sep"]))
            else:
                raise RtuneError(f"message {i}: role {m['role']!r} is not supported by the tulu template")
        if add_generation_prompt:
            out.append(Segment(s["assistant_header"]))
        return out

    def to_dict(self) -> dict:
        return {"strings": self.strings}


class _ModelTemplate:
    """The tokenizer's own chat template, decomposed into prompt / response / end segments.

    For a conversation ending with an assistant turn, the template is rendered twice: the prompt
    with the generation header, and the whole conversation. The whole must extend the prompt, the
    extension must start with the response text verbatim, and what follows is the turn end: the
    first special token in it is trained (e.g. <end_of_turn>, <|im_end|>), the rest is not.
    For `rt` (no user turn) the assistant header is what the generation prompt adds after an empty
    user turn; a default system prompt the template would add is not rendered.
    """

    name = "model"

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tok = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise RtuneError(
                "--template model: this tokenizer has no chat template (base models usually have none); "
                "use --template tulu"
            )
        self.specials = sorted(
            {t for t in tokenizer.all_special_tokens if t} | set(getattr(tokenizer, "added_tokens_encoder", {})),
            key=len,
            reverse=True,
        )
        self.end_ids = self._end_ids()

    def _apply(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # jinja raises TemplateError, IndexError, ... for unsupported shapes
            raise RtuneError(f"--template model: the chat template cannot render {[m['role'] for m in messages]}: {e}")

    def _split_end(self, rest: str) -> tuple[str, str]:
        """Split the text after a response into (trained end marker, untrained remainder)."""
        best = None
        for sp in self.specials:
            j = rest.find(sp)
            if j != -1 and (best is None or j < best[0]):
                best = (j, sp)
        if best is None:
            return "", rest
        j, sp = best
        if rest[:j].strip():
            raise RtuneError(f"--template model: unexpected text {rest[:j]!r} between the response and {sp!r}")
        return rest[: j + len(sp)], rest[j + len(sp) :]

    def _end_ids(self) -> list[int]:
        probe = "rtune-probe-response"
        user = [{"role": "user", "content": "q"}]
        prompt = self._apply(user, True)
        full = self._apply(user + [{"role": "assistant", "content": probe}], False)
        if not full.startswith(prompt) or not full[len(prompt) :].startswith(probe):
            raise RtuneError(
                "--template model: the chat template does not render the assistant reply verbatim after "
                "its generation prompt, so the loss mask cannot be built exactly; use --template tulu"
            )
        end, self.after_end = self._split_end(full[len(prompt) + len(probe) :])
        ids = list(self.tok(end, add_special_tokens=False)["input_ids"]) if end else []
        if not ids:
            if self.tok.eos_token_id is None:
                raise RtuneError("the tokenizer has no EOS token and its template no end-of-turn token")
            ids = [self.tok.eos_token_id]
        return ids

    def _assistant_header(self) -> str:
        empty = [{"role": "user", "content": ""}]
        with_header = self._apply(empty, True)
        without = self._apply(empty, False)
        if not with_header.startswith(without):
            raise RtuneError("--template model: cannot isolate the assistant header for --method rt")
        return with_header[len(without) :]

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        if messages and messages[0]["role"] == "assistant" and len(messages) == 1:
            # rt: no user turn at all; keep only what precedes any turn (a textual BOS).
            full_empty = self._apply([{"role": "user", "content": ""}], False)
            bos = self.tok.bos_token
            textual_bos = bos and "bos_token" in self.chat_template and full_empty.startswith(bos)
            pre = bos if textual_bos else ""
            return [
                Segment(pre + self._assistant_header()),
                Segment(messages[0]["content"], trained=True),
                Segment(ids=list(self.end_ids), trained=True),
                Segment(self.after_end),
            ]
        if messages[-1]["role"] != "assistant" or add_generation_prompt:
            return [Segment(self._apply(messages, add_generation_prompt))]
        prompt = self._apply(messages[:-1], True)
        full = self._apply(messages, False)
        content = messages[-1]["content"]
        if not full.startswith(prompt) or not full[len(prompt) :].startswith(content):
            raise RtuneError(
                "--template model: the chat template changes the response text (it may strip or rewrite it), "
                "so the loss mask cannot be built exactly; use --template tulu"
            )
        _, remainder = self._split_end(full[len(prompt) + len(content) :])
        segs = [Segment(prompt), Segment(content, trained=True), Segment(ids=list(self.end_ids), trained=True)]
        if remainder:
            segs.append(Segment(remainder))
        return segs

    def to_dict(self) -> dict:
        return {"chat_template": self.chat_template}


class Renderer:
    """Renders records and conversations for one tokenizer and one template."""

    def __init__(self, tokenizer, template: str = "tulu", *, _saved: dict | None = None):
        if template not in TEMPLATES:
            raise RtuneError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")
        self.tokenizer = tokenizer
        self.template_name = template
        saved = _saved or {}
        if template == "tulu":
            self.template = _TuluTemplate(tokenizer, saved.get("strings"))
        else:
            self.template = _ModelTemplate(tokenizer, saved.get("chat_template"))
        self.bos_id = _bos_policy(tokenizer)

    # -- the one place where segments become ids and labels -------------------------------------
    def _tokenize(self, segments: list[Segment]) -> tuple[list[int], list[int]]:
        # Adjacent untrained text is joined first, so a prompt tokenizes exactly as it will at inference.
        merged: list[Segment] = []
        for seg in segments:
            if seg.ids is None and not seg.trained and merged and merged[-1].ids is None and not merged[-1].trained:
                merged[-1] = Segment(merged[-1].text + seg.text)
            else:
                merged.append(seg)
        input_ids: list[int] = []
        labels: list[int] = []
        for seg in merged:
            if seg.ids is not None:
                ids = list(seg.ids)
            else:
                ids = _encode(self.tokenizer, seg.text)
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
        seq = self.render_messages(training_messages(record, method))
        seq.id = str(record.get("id", ""))
        truncated = max_length is not None and len(seq.input_ids) > max_length
        if truncated:
            seq.input_ids, seq.labels = seq.input_ids[:max_length], seq.labels[:max_length]
        return (seq if seq.num_trained else None), truncated

    def render_training(self, record: dict, method: str, max_length: int | None = None) -> RenderedSequence | None:
        """The training sequence of a record, truncated to max_length; None if nothing is left to train."""
        return self._render_training(record, method, max_length)[0]

    def render_dataset(self, records: list[dict], method: str, max_length: int | None = None):
        """Render many records; returns (sequences, RenderStats)."""
        stats = RenderStats(records=len(records))
        out = []
        for r in records:
            seq, truncated = self._render_training(r, method, max_length)
            stats.truncated += truncated
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
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn (generation stops at any of them)."""
        ids = list(self.template.end_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

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


def describe(renderer: Renderer, seq: RenderedSequence) -> dict:
    """JSON view of a rendered sequence, for `rtune data inspect --json`."""
    trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
    tok = renderer.tokenizer
    return {
        "id": seq.id,
        "input_ids": seq.input_ids,
        "labels": seq.labels,
        "num_tokens": len(seq.input_ids),
        "num_trained": len(trained),
        "text": tok.decode(seq.input_ids),
        "trained_text": tok.decode(trained),
    }


def visualize(renderer: Renderer, seq: RenderedSequence, color: bool = True) -> str:
    """The rendered text with trained tokens highlighted (green) or, without colour, inside ⟦ ⟧."""
    tok = renderer.tokenizer
    out, run, run_trained = [], [], None

    def flush():
        if not run:
            return
        text = tok.decode(run)
        if run_trained:
            out.append(f"\x1b[42;30m{text}\x1b[0m" if color else f"⟦{text}⟧")
        else:
            out.append(text)

    for t, lab in zip(seq.input_ids, seq.labels):
        trained = lab != IGNORE
        if trained != run_trained:
            flush()
            run, run_trained = [], trained
        run.append(t)
    flush()
    return "".join(out)
