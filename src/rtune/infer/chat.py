"""A multi-turn chat in the terminal, prompted exactly as the model was trained.

Each turn renders the whole history with `renderer.render_chat_prompt`, generates one reply
(streamed as it is produced) and appends it to the history. Input and output are injectable so
the loop is testable without a terminal.
"""

from __future__ import annotations

import sys

from transformers import TextStreamer

from rtune.infer.generate import GenerationConfig, generate_ids, reply_stop_strings
from rtune.infer.load import load_for_inference

HELP = """commands:
  /reset   forget the conversation so far
  /exit    quit (also /quit, Ctrl-D)
  /help    show this help"""


class _Streamer(TextStreamer):
    """TextStreamer that writes to `output` instead of printing to stdout, and never shows a stop string.

    It holds back the tail of the text that could still begin a stop string (with the whitespace
    before it, which the cut removes too) and ends the reply where a stop string begins, so what is
    shown is exactly the reply generate_ids returns. With a reply cleanup (the in-context formats
    strip a trailing code fence) it also holds back trailing backticks, and applies the cleanup to
    the whole reply at its end.
    """

    def __init__(self, tokenizer, output, stop_strings: list[str] = (), cleanup=None):
        # skip_prompt: only the reply is shown; skip_special_tokens hides the stop token.
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.output = output
        self.stop_strings = [s for s in stop_strings if s]
        self.cleanup = cleanup
        self.pending = ""  # received, not yet shown
        self.shown = ""  # shown so far
        self.stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.stopped:
            return
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if found:
            shown, self.pending, self.stopped = self._last(self.pending[: min(found)].rstrip()), "", True
        elif stream_end:
            shown, self.pending = self._last(self.pending), ""
        elif not self.stop_strings and self.cleanup is None:
            shown, self.pending = self.pending, ""
        else:
            cut = len(self.pending) - _stop_prefix_len(self.pending, self.stop_strings)
            while cut > 0 and (self.pending[cut - 1].isspace() or (self.cleanup and self.pending[cut - 1] == "`")):
                cut -= 1
            shown, self.pending = self.pending[:cut], self.pending[cut:]
        if shown:
            self.shown += shown
            self.output.write(shown)
            self.output.flush()

    def _last(self, rest: str) -> str:
        """What is left to show at the end of the reply, after the cleanup of the whole reply."""
        if self.cleanup is None:
            return rest
        final = self.cleanup(self.shown + rest)
        return final[len(self.shown):] if final.startswith(self.shown) else ""


def _stop_prefix_len(text: str, stop_strings: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (0: none)."""
    return max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _fit_context(model, renderer, history: list[dict], max_new_tokens: int, output) -> list[int]:
    """The prompt for `history`, dropping the oldest exchanges if it would not fit the context."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompt = renderer.render_chat_prompt(history)
    while limit and len(prompt) + max_new_tokens > limit and len(history) > 2:
        del history[:2]  # the oldest user message and its reply
        output.write("[context full: the oldest exchange was dropped]\n")
        prompt = renderer.render_chat_prompt(history)
    return prompt


def chat_loop(
    model,
    tokenizer,
    renderer,
    *,
    config: GenerationConfig | None = None,
    input_fn=input,
    output=None,
    stream: bool = True,
) -> list[dict]:
    """Run the chat until /exit or end of input; returns the final history."""
    config = config or GenerationConfig()
    output = output or sys.stdout
    history: list[dict] = []
    output.write("rtune chat: type a message, /help for commands\n")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            output.write(HELP + "\n")
            continue
        if command == "/reset":
            history.clear()
            output.write("[conversation reset]\n")
            continue
        if not command:
            continue

        history.append({"role": "user", "content": line})
        prompt = _fit_context(model, renderer, history, config.max_new_tokens, output)
        streamer = (_Streamer(tokenizer, output, reply_stop_strings(renderer, config),
                              getattr(renderer, "reply_cleanup", None)) if stream else None)
        try:
            (reply,) = generate_ids(model, tokenizer, renderer, [prompt], config, streamer=streamer)
        except KeyboardInterrupt:
            # Ctrl-C while generating cancels this reply only; the user can ask again.
            history.pop()
            output.write("\n[interrupted]\n")
            continue
        if not stream:
            output.write(reply.text)
        output.write("\n")
        if not reply.finished:
            output.write(f"[reply cut at max_new_tokens={config.max_new_tokens}]\n")
        history.append({"role": "assistant", "content": reply.text})
    return history


def chat(
    model_or_run: str,
    *,
    template: str | None = None,
    icl_file: str | None = None,
    config: GenerationConfig | None = None,
    input_fn=input,
    output=None,
    stream: bool = True,
) -> list[dict]:
    """Load a model, run folder or merged folder and chat with it in the terminal.

    A plain model can be prompted in context (template urial, urial-r or zero-shot, demonstrations
    from icl_file): earlier exchanges become further query/answer pairs. With config.rules, the
    rule-based adapter applies to every reply (plain models only)."""
    from rtune.infer.rules import check_untrained

    check_untrained(model_or_run, config.rules if config else None)  # before the weights load
    model, tokenizer, renderer = load_for_inference(model_or_run, template=template, icl_file=icl_file)
    return chat_loop(
        model, tokenizer, renderer, config=config, input_fn=input_fn, output=output or sys.stdout, stream=stream
    )
