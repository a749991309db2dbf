"""A multi-turn chat in the terminal, prompted exactly as the model was trained.

Each turn renders the whole history with `renderer.render_chat_prompt`, generates one reply
(streamed as it is produced) and appends it to the history. Input and output are injectable so
the loop is testable without a terminal.
"""

from __future__ import annotations

import sys

from transformers import TextStreamer

from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.infer.load import load_for_inference

HELP = """commands:
  /reset   forget the conversation so far
  /exit    quit (also /quit, Ctrl-D)
  /help    show this help"""


class _Streamer(TextStreamer):
    """TextStreamer that writes to `output` instead of printing to stdout."""

    def __init__(self, tokenizer, output):
        # skip_prompt: only the reply is shown; skip_special_tokens hides the stop token.
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.output = output

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.output.write(text)
        self.output.flush()


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
        streamer = _Streamer(tokenizer, output) if stream else None
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
