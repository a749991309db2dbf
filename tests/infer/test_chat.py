"""The terminal chat loop with scripted input, on the tiny random model."""

import io

import pytest
from transformers import AutoModelForCausalLM

import rtune.infer.chat as chat_mod
from rtune.infer.chat import chat, chat_loop
from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.render import Renderer


class RecordingRenderer(Renderer):
    """A Renderer that keeps the conversations it was asked to render."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, "tulu")
        self.rendered: list[list[dict]] = []

    def render_chat_prompt(self, messages):
        self.rendered.append([dict(m) for m in messages])
        return super().render_chat_prompt(messages)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


def scripted(lines):
    """input() replacement: returns the lines in turn, then raises EOFError like Ctrl-D."""
    it = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError

    return fake_input


CONFIG = GenerationConfig(max_new_tokens=6)


@pytest.mark.parametrize("stream", [True, False])
def test_reset_and_exit(model, tiny_tokenizer, stream, monkeypatch):
    renderer = RecordingRenderer(tiny_tokenizer)
    out = io.StringIO()
    seen = []  # the prompt text the model was actually given, per turn

    def recording_generate(model, tokenizer, renderer, prompts, config, **kw):
        seen.extend(tokenizer.decode(p) for p in prompts)
        return generate_ids(model, tokenizer, renderer, prompts, config, **kw)

    monkeypatch.setattr(chat_mod, "generate_ids", recording_generate)
    history = chat_loop(
        model, tiny_tokenizer, renderer, config=CONFIG,
        input_fn=scripted(["Hi", "/reset", "Hello again", "/exit", "never read"]), output=out, stream=stream,
    )  # fmt: skip
    assert renderer.rendered == [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hello again"}],
    ]
    assert len(seen) == 2 and "Hi" in seen[0]
    assert "Hello again" in seen[1] and "Hi" not in seen[1]
    # Both replies were written, and the history holds the last exchange only.
    assert [m["role"] for m in history] == ["user", "assistant"]
    reply = history[1]["content"]
    text = out.getvalue()
    assert "[conversation reset]" in text and reply in text and reply
    assert text.count("[reply cut at max_new_tokens=6]") == 2


def test_history_grows_across_turns(model, tiny_tokenizer):
    renderer = RecordingRenderer(tiny_tokenizer)
    history = chat_loop(model, tiny_tokenizer, renderer, config=CONFIG, input_fn=scripted(["Hi", "More"]),
                        output=io.StringIO())  # fmt: skip
    second = renderer.rendered[1]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"] == "Hi" and second[1]["content"] == history[1]["content"]


def test_streamed_text_matches_reply(model, tiny_tokenizer):
    out_stream, out_plain = io.StringIO(), io.StringIO()
    h1 = chat_loop(model, tiny_tokenizer, Renderer(tiny_tokenizer), config=CONFIG, input_fn=scripted(["Hi"]),
                   output=out_stream, stream=True)  # fmt: skip
    h2 = chat_loop(model, tiny_tokenizer, Renderer(tiny_tokenizer), config=CONFIG, input_fn=scripted(["Hi"]),
                   output=out_plain, stream=False)  # fmt: skip
    assert h1 == h2
    assert out_stream.getvalue() == out_plain.getvalue()


def test_eof_help_and_blank_lines(model, tiny_tokenizer):
    out = io.StringIO()
    history = chat_loop(model, tiny_tokenizer, Renderer(tiny_tokenizer), config=CONFIG,
                        input_fn=scripted(["", "   ", "/help"]), output=out)  # fmt: skip
    assert history == []
    assert "/reset" in out.getvalue() and "/exit" in out.getvalue()


def test_ctrl_c_at_prompt_quits(model, tiny_tokenizer):
    def interrupt(prompt=""):
        raise KeyboardInterrupt

    assert chat_loop(model, tiny_tokenizer, Renderer(tiny_tokenizer), input_fn=interrupt, output=io.StringIO()) == []


def test_context_full_drops_oldest_exchange(model, tiny_tokenizer, monkeypatch):
    renderer = RecordingRenderer(tiny_tokenizer)
    monkeypatch.setattr(model.config, "max_position_embeddings", 60)
    out = io.StringIO()
    chat_loop(model, tiny_tokenizer, renderer, config=GenerationConfig(max_new_tokens=20),
              input_fn=scripted(["Give three tips for staying healthy."] * 3), output=out)  # fmt: skip
    # Turns 2 and 3 do not fit with the previous exchange, so each drops it.
    assert out.getvalue().count("oldest exchange was dropped") == 2
    assert renderer.rendered[-1] == [{"role": "user", "content": "Give three tips for staying healthy."}]


def test_chat_loads_then_loops(monkeypatch, model, tiny_tokenizer):
    seen = []

    def fake_load(model_or_run, template=None, **kw):
        seen.append((model_or_run, template))
        return model, tiny_tokenizer, Renderer(tiny_tokenizer)

    monkeypatch.setattr(chat_mod, "load_for_inference", fake_load)
    out = io.StringIO()
    history = chat("runs/rt", template="tulu", config=CONFIG, input_fn=scripted(["Hi"]), output=out)
    assert seen == [("runs/rt", "tulu")] and len(history) == 2
