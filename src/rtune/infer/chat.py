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
    shown is exactly the reply generate_ids returns.
    """

    def __init__(self, tokenizer, output, stop_strings: list[str] = ()):
        # skip_prompt: only the reply is shown; skip_special_tokens hides the stop token.
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.output = output
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""  # received, not yet shown
        self.stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.stopped:
            return
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if found:
            shown, self.pending, self.stopped = self.pending[: min(found)].rstrip(), "", True
        elif stream_end or not self.stop_strings:
            shown, self.pending = self.pending, ""
        else:
            cut = len(self.pending) - _stop_prefix_len(self.pending, self.stop_strings)
            while cut > 0 and self.pending[cut - 1].isspace():
                cut -= 1
            shown, self.pending = self.pending[:cut], self.pending[cut:]
        if shown:
            self.output.write(shown)
            self.output.flush()


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
        streamer = _Streamer(tokenizer, output, reply_stop_strings(renderer, config)) if stream else None
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
    config: GenerationConfig | None = None,
    input_fn=input,
    output=None,
    stream: bool = True,
) -> list[dict]:
    """Load a model, run folder or merged folder and chat with it in the terminal."""
    model, tokenizer, renderer = load_for_inference(model_or_run, template=template)
    return chat_loop(
        model, tokenizer, renderer, config=config, input_fn=input_fn, output=output or sys.stdout, stream=stream
    )
