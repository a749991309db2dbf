"""A reply's stops and its text as tokens arrive, without a vocabulary scan.

transformers' StopStringCriteria (what `rtune generate` uses) precomputes a table over the whole
vocabulary for each new set of stop strings: seconds for Gemma's 262k tokens, minutes for a long
stop string, all on the model thread. The server instead decodes each reply incrementally and looks
for its stop strings in the new text, so a new stop set costs nothing up front and a step costs
about the length of the new text plus the stop strings.

`StopSet` says what ends a reply (the same split as `rtune.infer.generate._Stops`: end ids, stop
strings that are special tokens matched as ids, the rest as text). `ReplyText` follows one reply:
it decodes a short window of the newest ids each step (the offsets technique of vLLM and TGI: the
text of window + new id minus the text of the window), says when a stop string has appeared, and
for streams what can be shown: everything but a tail that could still begin a stop string (with the
whitespace before it, which the final cut removes too). The final reply is always cut from the
whole decoded text by `rtune.infer.generate._finish`, exactly as `rtune generate` cuts it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopSet:
    eos_ids: tuple[int, ...]  # the model's end ids: finish "eos"
    string_ids: tuple[int, ...]  # stop strings that are special tokens, and the request's stop_token_ids
    strings: tuple[str, ...]  # matched in the decoded text
    cleanup: object | None = None  # the renderer's reply cleanup (e.g. a trailing code fence stripped)

    @property
    def all_ids(self) -> list[int]:
        return list(self.eos_ids) + [i for i in self.string_ids if i not in self.eos_ids]

    @property
    def longest(self) -> int:
        return max((len(s) for s in self.strings), default=0)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Special tokens' text -> id (decoding skips them, so as stop strings they are matched as ids)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {t.content: i for i, t in decoder.items() if getattr(t, "special", False)}


def stop_set(renderer, special: dict[str, int], extra_strings=(), extra_ids=()) -> StopSet:
    """The renderer's stops plus a request's `stop` strings and `stop_token_ids`."""
    strings = list(dict.fromkeys(s for s in [*getattr(renderer, "stop_strings", []), *extra_strings] if s))
    eos = tuple(renderer.stop_ids)
    as_ids = [special[s] for s in strings if s in special and special[s] not in eos]
    return StopSet(
        eos_ids=eos,
        string_ids=tuple(dict.fromkeys([*as_ids, *(i for i in extra_ids if i not in eos)])),
        strings=tuple(s for s in strings if s not in special),
        cleanup=getattr(renderer, "reply_cleanup", None),
    )


def held_back(text: str, strings: tuple[str, ...], backticks: bool = False) -> int:
    """How many characters at the end of `text` a stream must not show yet: the longest end that
    begins a stop string, then the whitespace before it (and backticks, when a cleanup may strip a
    trailing code fence)."""
    if not text or not (strings or backticks):
        return 0  # nothing can cut the end: show it all
    n = 0
    last = text[-1]
    for s in strings:
        # Candidate prefixes s[:k + 1] end with `last`; the longest one `text` ends with wins.
        k = s.rfind(last, 0, min(len(s) - 1, len(text)))
        while k + 1 > n:
            if text.endswith(s[: k + 1]):
                n = k + 1
                break
            k = s.rfind(last, 0, k)
    end = len(text) - n
    while end > 0 and (text[end - 1].isspace() or (backticks and text[end - 1] == "`")):
        end -= 1
    return len(text) - end


class ReplyText:
    """One reply's decoded text, grown a few ids at a time, and where its first stop string begins."""

    def __init__(self, decode, strings: tuple[str, ...]):
        self.decode = decode  # ids -> text, special tokens skipped
        self.strings = strings
        self.longest = max((len(s) for s in strings), default=0)
        self.text = ""
        self.stop_at: int | None = None  # where the first stop string begins in `text`
        self._prefix = 0  # the window ids[prefix:read] was decoded last; its text is known
        self._read = 0

    def add(self, ids: list[int]) -> None:
        """`ids` is the whole reply so far (the same list, grown); decode what is new."""
        if self.stop_at is not None:
            return
        before = self.decode(ids[self._prefix : self._read]) if self._read > self._prefix else ""
        now = self.decode(ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return  # nothing yet, or an incomplete UTF-8 sequence: wait for the next id
        start = max(0, len(self.text) - self.longest + 1)  # a stop string may begin in the old text
        self.text += now[len(before) :]
        self._prefix, self._read = self._read, len(ids)
        found = [i for i in (self.text.find(s, start) for s in self.strings) if i >= 0]
        if found:
            self.stop_at = min(found)

    def showable(self, backticks: bool = False) -> int:
        """How much of `text` a stream may show now (nothing past a stop string, see `held_back`)."""
        if self.stop_at is not None:  # the reply ends there, without the whitespace (and a fence) before it
            text = self.text[: self.stop_at]
            return len(text) - held_back(text, (), backticks) if backticks else len(text.rstrip())
        return len(self.text) - held_back(self.text, self.strings, backticks)
