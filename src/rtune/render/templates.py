"""Chat templates as segments: what a conversation looks like before it becomes token ids.

A template turns messages into a list of `Segment`s: template text, content (a message's text,
from a user or a dataset), or token ids to insert as they are; each trained or not.
`rtune.render.renderer` turns segments into ids and labels, parsing special-token spellings only in
template text: content is always tokenized as plain text. Two templates:

    tulu   the paper's plain-text tags (<|user|>, <|assistant|>), the EOS id as the end token
    model  the tokenizer's own chat template, with each message's content spliced in as content

Each template also exports itself as a Jinja chat template (`jinja`), so plain transformers,
vLLM and lm-evaluation-harness prompt an rtune model as rtune does.

A third kind, `IclTemplate`, prompts an untrained base model in context (inference only):

    urial      K (query, answer) demonstrations, then "# Query:\n{instruction}\n\n# Answer:\n"
    urial-r    the K demonstrations' answers alone (their queries dropped), then the query frame
    zero-shot  the query frame alone
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

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
    """A piece of a rendered conversation: text to tokenize, or token ids to insert as they are.

    content: the text came from a user or a dataset, so special-token spellings in it stay text."""

    text: str = ""
    ids: list[int] | None = None
    trained: bool = False
    content: bool = False


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
                out += [Segment(s["user_header"]), Segment(m["content"], content=True), Segment(s["user_end"])]
            elif m["role"] == "assistant":
                out.append(Segment(s["assistant_header"]))
                out.append(Segment(m["content"], trained=True, content=True))
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

    def jinja(self, with_bos: bool) -> str:
        """The same format as a Jinja chat template (bos_token first when the renderer adds a BOS)."""
        s = {k: "{{ " + json.dumps(v) + " }}" for k, v in self.strings.items()}  # literal text, escaped
        return (
            ("{{ bos_token }}" if with_bos else "")
            + "{% for message in messages %}"
            + "{% if message['role'] == 'user' %}" + s["user_header"] + "{{ message['content'] }}" + s["user_end"]
            + "{% elif message['role'] == 'assistant' %}" + s["assistant_header"]
            + "{{ message['content'] }}{{ eos_token }}{% if not loop.last %}" + s["turn_sep"] + "{% endif %}"
            + "{% else %}{{ raise_exception('the tulu template has user and assistant turns only') }}{% endif %}"
            + "{% endfor %}"
            + "{% if add_generation_prompt %}" + s["assistant_header"] + "{% endif %}"
        )

    def to_dict(self) -> dict:
        return {"strings": self.strings}


def _sentinel(i: int) -> str:
    """Stands in for message i's content while the chat template renders (then content is spliced in)."""
    return f"@@rtune-content-{i}@@"


class ModelTemplate:
    """The tokenizer's own chat template, decomposed into template text, content and end segments.

    The template renders the conversation with a sentinel in place of each message's content; the
    rendered text is split at the sentinels and each message's content is spliced back in as a
    content segment, so special-token spellings in content never become control tokens. For a
    conversation ending with an assistant turn, what follows its content is the turn end: the
    first special token in it is trained (e.g. <end_of_turn>, <|im_end|>), along with any
    whitespace before it; the rest is not. For `rt` (no user turn) the assistant header is what the
    generation prompt adds after an empty user turn; a default system prompt is not rendered.

    Templates that trim message content (Llama 3, Gemma: `content | trim`) would render a response
    with surrounding whitespace differently from the response itself; under such a template every
    message's content is trimmed before rendering (`self.trims`), which is exactly what the
    template renders, so ordinary data never aborts a run.
    """

    name = "model"
    stop_strings: list[str] = []  # the end-of-turn token(s) stop generation

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tok = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise RtuneError(
                "--template model: this tokenizer has no chat template (base models usually have none); "
                "use --template tulu"
            )
        self.specials = sorted({t for t in tokenizer.all_special_tokens if t}
                               | set(getattr(tokenizer, "added_tokens_encoder", {})), key=len, reverse=True)
        self.trims = self._probe_trims()
        self.end_ids, self.end_space, self.after_end = self._probe_end()

    def _apply(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # jinja raises TemplateError, IndexError, ... for unsupported shapes
            raise RtuneError(f"--template model: the chat template cannot render {[m['role'] for m in messages]}: {e}")

    def _probe_trims(self) -> bool:
        padded = f"  {_sentinel(1)}\n"
        text = self._apply([{"role": "user", "content": "q"}, {"role": "assistant", "content": padded}], False)
        return padded not in text and _sentinel(1) in text

    def _split_end(self, rest: str) -> tuple[str, str, str]:
        """Split the text after a response into (whitespace before the end marker, end marker, remainder)."""
        best = None
        for sp in self.specials:
            j = rest.find(sp)
            if j != -1 and (best is None or j < best[0]):
                best = (j, sp)
        if best is None:
            return "", "", rest
        j, sp = best
        if rest[:j].strip():
            raise RtuneError(f"--template model: unexpected text {rest[:j]!r} between the response and {sp!r}")
        return rest[:j], sp, rest[j + len(sp):]

    def _probe_end(self) -> tuple[list[int], str, str]:
        """(end ids: the special token only, whitespace trained before it, untrained text after it)."""
        text = self._apply([{"role": "user", "content": "q"}, {"role": "assistant", "content": _sentinel(1)}], False)
        if text.count(_sentinel(1)) != 1:
            raise RtuneError("--template model: the chat template does not render the assistant reply verbatim, "
                             "so the loss mask cannot be built exactly; use --template tulu")
        space, marker, after = self._split_end(text.split(_sentinel(1))[1])
        if marker:
            return [self.tok.convert_tokens_to_ids(marker)], space, after
        if self.tok.eos_token_id is None:
            raise RtuneError("the tokenizer has no EOS token and its template no end-of-turn token")
        return [self.tok.eos_token_id], "", after

    def _assistant_header(self) -> str:
        empty = [{"role": "user", "content": ""}]
        with_header = self._apply(empty, True)
        without = self._apply(empty, False)
        if not with_header.startswith(without):
            raise RtuneError("--template model: cannot isolate the assistant header for --method rt")
        return with_header[len(without):]

    def _content(self, text: str) -> str:
        return text.strip() if self.trims else text

    def _spliced(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        """The template's rendering with each message's content spliced in as a content segment."""
        stand_ins = [{**m, "content": _sentinel(i)} for i, m in enumerate(messages)]
        text = self._apply(stand_ins, add_generation_prompt)
        out: list[Segment] = []
        for i, m in enumerate(messages):
            before, found, text = text.partition(_sentinel(i))
            if not found or _sentinel(i) in text:
                raise RtuneError(f"--template model: the chat template does not render message {i}'s content "
                                 "verbatim exactly once; use --template tulu")
            out += [Segment(before), Segment(self._content(m["content"]), content=True)]
        return out + [Segment(text)]

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        if messages and messages[0]["role"] == "assistant" and len(messages) == 1:
            # rt: no user turn at all; keep only what precedes any turn (a textual BOS).
            full_empty = self._apply([{"role": "user", "content": ""}], False)
            bos = self.tok.bos_token
            textual_bos = bos and "bos_token" in self.chat_template and full_empty.startswith(bos)
            pre = bos if textual_bos else ""
            content = Segment(self._content(messages[0]["content"]), trained=True, content=True)
            return [Segment(pre + self._assistant_header()), content, Segment(self.end_space, trained=True),
                    Segment(ids=list(self.end_ids), trained=True), Segment(self.after_end)]
        if messages[-1]["role"] != "assistant" or add_generation_prompt:
            return self._spliced(messages, add_generation_prompt)
        # Training: the prompt must render exactly as at inference, then the response and the end.
        segs = self._spliced(messages, False)
        if [seg.text for seg in segs[:-2]] != [seg.text for seg in self._spliced(messages[:-1], True)]:
            raise RtuneError("--template model: the chat template renders the prompt of a training example "
                             "differently from the inference prompt; use --template tulu")
        segs[-2].trained = True
        space, marker, after = self._split_end(segs[-1].text)
        if marker and [self.tok.convert_tokens_to_ids(marker)] != self.end_ids:
            raise RtuneError(f"--template model: unexpected turn end {marker!r} after a response")
        return segs[:-1] + [Segment(space, trained=True), Segment(ids=list(self.end_ids), trained=True),
                            Segment(after)]

    def jinja(self, with_bos: bool) -> str:
        return self.chat_template

    def to_dict(self) -> dict:
        return {"chat_template": self.chat_template}


# -- in-context formats (no training) ----------------------------------------------------------------
# URIAL (Lin et al. 2024): stylistic demonstrations in a "# Query:" / "# Answer:" format prompt an
# untrained base model; URIAL-R (An, Kim & Kim 2025) keeps only the demonstrations' answers.
ICL_TEMPLATES = ("urial", "urial-r", "zero-shot")
ICL = {"query_header": "# Query:\n", "answer_header": "# Answer:\n", "block_end": "\n\n"}
ICL_STOP_STRINGS = ("# Query:", "# Answer:", "# Instruction")
DEMONSTRATIONS_FILE = "icl_demonstrations.json"  # rtune's own demonstrations, shipped with the package
FENCE = "```"


def load_demonstrations(path: str | os.PathLike | None = None, template: str = "urial") -> list[dict]:
    """[{"query", "answer"}, ...] from a JSON file (None: rtune's own), checked for `template`.

    urial needs a query and an answer in each item; urial-r only the answer (a query is ignored).
    Errors name the file, the item and the field."""
    if path is None:
        source = f"rtune's own {DEMONSTRATIONS_FILE}"
        text = resources.files("rtune.render").joinpath(DEMONSTRATIONS_FILE).read_text(encoding="utf-8")
    else:
        source = f"--icl-file {path}"
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as e:
            raise RtuneError(f"{source}: cannot read it: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise RtuneError(f"{source}: not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RtuneError(f"{source}: not valid JSON: {e}") from None
    return check_demonstrations(data, template, source)


def check_demonstrations(data, template: str, source: str = "demonstrations") -> list[dict]:
    """The demonstrations as [{"query": str | None, "answer": str}], stripped; errors name source and field."""
    if not isinstance(data, list):
        raise RtuneError(f"{source}: expected a JSON list of {{\"query\", \"answer\"}} objects, "
                         f"got {type(data).__name__}")
    if not data:
        raise RtuneError(f"{source}: the list is empty (use --icl zero-shot for no demonstrations)")
    out = []
    for i, item in enumerate(data):
        where = f"{source}: item {i}"
        if not isinstance(item, dict):
            raise RtuneError(f"{where}: expected an object with \"query\" and \"answer\", got {type(item).__name__}")
        unknown = sorted(set(item) - {"query", "answer"})
        if unknown:
            raise RtuneError(f"{where}: unknown field {unknown[0]!r} (the fields are \"query\" and \"answer\")")
        needed = ("query", "answer") if template == "urial" else ("answer",)
        for name in needed:  # urial-r ignores a query
            value = item.get(name)
            if not isinstance(value, str) or not value.strip():
                what = "missing" if name not in item else ("empty" if isinstance(value, str) else
                                                             f"not text ({type(value).__name__})")
                raise RtuneError(f"{where}: field {name!r} is {what}"
                                 + (" (urial shows each demonstration's query)" if name == "query" else ""))
        query = item.get("query")
        out.append({"query": query.strip() if template == "urial" else None, "answer": item["answer"].strip()})
    return out


def strip_trailing_fence(text: str) -> str:
    """The reply without a code fence at its end that closes no block (and the whitespace around it).

    A base model that imitates fenced answers (URIAL's demonstrations wrap them in ```) ends its
    own with a lone fence; a reply whose code block is closed keeps its closing fence."""
    t = text.rstrip()
    if t.endswith(FENCE) and t.count(FENCE) % 2 == 1:
        return t[: -len(FENCE)].rstrip()
    return text


class IclTemplate:
    """An in-context prompt for an untrained base model: no chat template, no special tokens but a BOS.

    Every turn is a block: a user message "# Query:\n{content}\n\n", an assistant message
    "# Answer:\n{content}\n\n" (content stripped), and the generation prompt "# Answer:\n". The
    demonstrations come first as such blocks: (query, answer) pairs for urial, answers alone for
    urial-r, none for zero-shot; an earlier exchange of a chat is one more (query, answer) pair.
    A reply ends at the next block header ("# Query:", "# Answer:", or URIAL's "# Instruction"),
    or at the EOS; a trailing code fence is stripped (`clean_reply`). Inference only: a
    conversation that ends with an assistant turn (a training or scoring example) is refused.
    """

    trainable = False

    def __init__(self, tokenizer, name: str, demonstrations: list[dict] | None = None):
        if name not in ICL_TEMPLATES:
            raise RtuneError(f"unknown in-context format {name!r}: choose one of {', '.join(ICL_TEMPLATES)}")
        self.name = name
        if name == "zero-shot":
            if demonstrations:
                raise RtuneError("--icl zero-shot uses no demonstrations; leave --icl-file out")
            self.demonstrations: list[dict] = []
        elif demonstrations is None:
            self.demonstrations = load_demonstrations(None, name)
        else:
            self.demonstrations = check_demonstrations(demonstrations, name)
        self.strings = dict(ICL)
        # The EOS also ends a reply; nothing is trained, so nothing needs it.
        self.end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    @property
    def stop_strings(self) -> list[str]:
        return list(ICL_STOP_STRINGS)

    def demonstration_messages(self) -> list[dict]:
        out: list[dict] = []
        for d in self.demonstrations:
            if self.name == "urial":
                out.append({"role": "user", "content": d["query"]})
            out.append({"role": "assistant", "content": d["answer"]})
        return out

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        if messages and messages[-1]["role"] == "assistant" and not add_generation_prompt:
            raise RtuneError(
                f"the {self.name} template is an in-context prompt for untrained base models (inference only): "
                "it cannot render a training or scoring example; train with --template tulu or model"
            )
        s = self.strings
        out: list[Segment] = []
        for i, m in enumerate(self.demonstration_messages() + list(messages)):
            if m["role"] not in ("user", "assistant"):
                raise RtuneError(f"message {i - len(self.demonstration_messages())}: role {m['role']!r} is not "
                                 f"supported by the {self.name} template (user and assistant turns only)")
            header = s["query_header"] if m["role"] == "user" else s["answer_header"]
            out += [Segment(header), Segment(m["content"].strip(), content=True), Segment(s["block_end"])]
        if add_generation_prompt:
            out.append(Segment(s["answer_header"]))
        return out

    @staticmethod
    def clean_reply(text: str) -> str:
        return strip_trailing_fence(text)

    def jinja(self, with_bos: bool) -> str:
        """The same prompt as a Jinja chat template: the demonstrations as literal text, then the turns."""
        s = self.strings
        lit = lambda text: "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # noqa: E731  (escaped literal text)
        demos = "".join((s["query_header"] if m["role"] == "user" else s["answer_header"]) + m["content"]
                        + s["block_end"] for m in self.demonstration_messages())
        return (
            ("{{ bos_token }}" if with_bos else "")
            + (lit(demos) if demos else "")
            + "{% for message in messages %}"
            + "{% if message['role'] == 'user' %}" + lit(s["query_header"])
            + "{% elif message['role'] == 'assistant' %}" + lit(s["answer_header"])
            + "{% else %}{{ raise_exception('the " + self.name + " template has user and assistant turns only') }}"
            + "{% endif %}"
            + "{{ message['content'] | trim }}" + lit(s["block_end"])
            + "{% endfor %}"
            + "{% if add_generation_prompt %}" + lit(s["answer_header"]) + "{% endif %}"
        )

    def to_dict(self) -> dict:
        return {"demonstrations": [{k: v for k, v in d.items() if v is not None} for d in self.demonstrations]}
