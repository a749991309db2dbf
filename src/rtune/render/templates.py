"""Chat templates as segments: what a conversation looks like before it becomes token ids.

A template turns messages into a list of `Segment`s, each a piece of text to tokenize or token ids
to insert as they are, and each trained or not. `rtune.render.renderer` turns segments into ids and
labels. Two templates:

    tulu   the paper's plain-text tags (<|user|>, <|assistant|>), the EOS id as the end token
    model  the tokenizer's own chat template, decomposed into the same segments
"""

from __future__ import annotations

from dataclasses import dataclass

from rtune.errors import RtuneError

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

class TuluTemplate:
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

    @property
    def stop_strings(self) -> list[str]:
        """Text that opens a new turn: generation stops there (a model running on into an invented dialogue)."""
        return [h.strip() for h in (self.strings["user_header"], self.strings["assistant_header"]) if h.strip()]

    def to_dict(self) -> dict:
        return {"strings": self.strings}


class ModelTemplate:
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

    stop_strings: list[str] = []  # the end-of-turn token(s) stop generation

    def to_dict(self) -> dict:
        return {"chat_template": self.chat_template}
