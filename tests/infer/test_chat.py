"""The terminal chat loop with scripted input, on the tiny random model."""

import io

import pytest
from tiny import ScriptedReply
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


@pytest.mark.parametrize("stream", [True, False])
def test_reply_ends_at_a_stop_string(model, tiny_tokenizer, stream):
    # The model runs on into an invented next turn: neither the screen nor the history shows it.
    script = tiny_tokenizer("Sure thing.\n<|user|>\nAnd more", add_special_tokens=False)["input_ids"]
    out = io.StringIO()
    with ScriptedReply(model, script, tiny_tokenizer.eos_token_id):
        history = chat_loop(model, tiny_tokenizer, Renderer(tiny_tokenizer), config=GenerationConfig(max_new_tokens=40),
                            input_fn=scripted(["Hi"]), output=out, stream=stream)  # fmt: skip
    assert history[1] == {"role": "assistant", "content": "Sure thing."}
    # Exactly the reply on screen: no stop text, no newline held back from before it, no "[reply cut".
    assert out.getvalue() == "rtune chat: type a message, /help for commands\nSure thing.\n\n"


def test_user_stop_in_chat(model, tiny_tokenizer):
    script = tiny_tokenizer("Eat well. Third. More", add_special_tokens=False)["input_ids"]
    out = io.StringIO()
    with ScriptedReply(model, script, tiny_tokenizer.eos_token_id):
        history = chat_loop(model, tiny_tokenizer, Renderer(tiny_tokenizer),
                            config=GenerationConfig(max_new_tokens=40, stop=["Third"]), input_fn=scripted(["Hi"]),
                            output=out)  # fmt: skip
    assert history[1]["content"] == "Eat well." and "Eat well.\n" in out.getvalue() and "Th" not in out.getvalue()


def test_streamer_holds_back_a_possible_stop():
    out = io.StringIO()
    s = chat_mod._Streamer(None, out, ["<|user|>", "STOP"])
    shown = []
    for piece in ["Sure", " thing.", "\n", "<", "|us", "er|", ">\nAnd", " more"]:
        s.on_finalized_text(piece)
        shown.append(out.getvalue())
    s.on_finalized_text("", stream_end=True)
    # "\n" and every prefix of "<|user|>" wait; at the stop the reply ends, the newline before it cut too.
    assert shown == ["Sure", "Sure thing.", "Sure thing.", "Sure thing.", "Sure thing.", "Sure thing.",
                     "Sure thing.", "Sure thing."]  # fmt: skip

    out = io.StringIO()
    s = chat_mod._Streamer(None, out, ["<|user|>", "STOP"])
    shown = []
    for piece in ["a <", "|x", " ST", "OP!", " b"]:
        s.on_finalized_text(piece)
        shown.append(out.getvalue())
    # A held-back tail that turns out not to be a stop is shown; "ST" waits, then "STOP" ends the reply.
    assert shown == ["a", "a <|x", "a <|x", "a <|x", "a <|x"]

    out = io.StringIO()
    s = chat_mod._Streamer(None, out, ["STOP"])
    for piece in ["tail ", "ST"]:
        s.on_finalized_text(piece)
    assert out.getvalue() == "tail"
    s.on_finalized_text("", stream_end=True)  # no stop came: the held-back text is shown at the end
    assert out.getvalue() == "tail ST"


def test_cli_chat_stop_flags(monkeypatch, capsys):
    from rtune.cli import main

    seen = []
    monkeypatch.setattr(chat_mod, "chat", lambda model, template=None, config=None: seen.append((model, config)))
    assert main(["chat", "runs/rt", "--stop", "###", "--stop", "\n\n", "--max-new-tokens", "7"]) == 0
    assert main(["chat", "runs/rt"]) == 0
    assert [(m, c.stop, c.max_new_tokens) for m, c in seen] == [("runs/rt", ["###", "\n\n"], 7), ("runs/rt", [], 512)]


def test_chat_loads_then_loops(monkeypatch, model, tiny_tokenizer):
    seen = []

    def fake_load(model_or_run, template=None, **kw):
        seen.append((model_or_run, template))
        return model, tiny_tokenizer, Renderer(tiny_tokenizer)

    monkeypatch.setattr(chat_mod, "load_for_inference", fake_load)
    out = io.StringIO()
    history = chat("runs/rt", template="tulu", config=CONFIG, input_fn=scripted(["Hi"]), output=out)
    assert seen == [("runs/rt", "tulu")] and len(history) == 2
