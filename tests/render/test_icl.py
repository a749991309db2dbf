"""In-context formats for untrained base models (URIAL, URIAL-R, zero-shot): exact prompts, special-token
spellings kept as text, stop strings and the trailing-fence cleanup, demonstration files, the refusal to
train, the Jinja export, and the command line."""

import io
import json

import pytest
import tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from rtune.cli import main
from rtune.errors import RtuneError
from rtune.infer.chat import chat_loop
from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.infer.load import load_renderer
from rtune.render import ICL_TEMPLATES, Renderer
from rtune.render.templates import load_demonstrations, strip_trailing_fence
from rtune.run_folder import save_tokenizer

DEMOS = [
    {"query": "How do I boil an egg?", "answer": "Put it in boiling water for 8 minutes."},
    {"query": "Why is the sky blue?", "answer": "Air scatters blue light more than red light."},
]
# The prompts, written out by hand (not built by the code under test).
URIAL = ("# Query:\nHow do I boil an egg?\n\n# Answer:\nPut it in boiling water for 8 minutes.\n\n"
         "# Query:\nWhy is the sky blue?\n\n# Answer:\nAir scatters blue light more than red light.\n\n"
         "# Query:\nName a fruit.\n\n# Answer:\n")
URIAL_R = ("# Answer:\nPut it in boiling water for 8 minutes.\n\n"
           "# Answer:\nAir scatters blue light more than red light.\n\n"
           "# Query:\nName a fruit.\n\n# Answer:\n")
ZERO_SHOT = "# Query:\nName a fruit.\n\n# Answer:\n"
EXPECTED = {"urial": URIAL, "urial-r": URIAL_R, "zero-shot": ZERO_SHOT}

SPELLINGS = "<eos> <bos> <start_of_turn>model <end_of_turn> <pad> <|im_end|>"


def renderer(tok, name, demos=DEMOS):
    return Renderer(tok, name, demonstrations=None if name == "zero-shot" else demos)


def text_ids(tok, text):
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def control_ids(tok):
    return {i for i, a in tok.added_tokens_decoder.items() if a.special}


@pytest.fixture(params=["gemma", "tiny"])
def tok(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("gemma_tokenizer")


# -- exact prompts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ICL_TEMPLATES)
def test_exact_prompt(tok, name):
    r = renderer(tok, name)
    ids = r.render_prompt("Name a fruit.")
    assert ids == [tok.bos_token_id] + text_ids(tok, EXPECTED[name])
    assert tok.decode(ids) == tok.bos_token + EXPECTED[name]
    assert r.template_name == name and not r.trainable
    assert r.stop_strings == ["# Query:", "# Answer:", "# Instruction"]
    assert r.stop_ids == [tok.eos_token_id]


def test_content_is_stripped_and_the_frame_kept(tiny_tokenizer):
    r = renderer(tiny_tokenizer, "zero-shot")
    assert tiny_tokenizer.decode(r.render_prompt("\n  Name a fruit.  \n")) == "<bos>" + ZERO_SHOT


def test_chat_history_becomes_query_answer_pairs(tok):
    r = renderer(tok, "urial-r")
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
               {"role": "user", "content": "Name a fruit."}]
    expected = URIAL_R.replace("# Query:\nName a fruit.", "# Query:\nHi\n\n# Answer:\nHello! How can I help?\n\n"
                                                          "# Query:\nName a fruit.")
    assert r.render_chat_prompt(history) == [tok.bos_token_id] + text_ids(tok, expected)
    with pytest.raises(RtuneError, match="role 'system' is not supported by the urial-r template"):
        r.render_chat_prompt([{"role": "system", "content": "Be brief."}, history[-1]])


def test_default_demonstrations_are_rtunes_own_and_shipped():
    demos = load_demonstrations()
    assert len(demos) == 3 and all(d["query"] and d["answer"] for d in demos)
    refusal = demos[2]["answer"]
    assert "sorry" in refusal.lower() and "illegal" in refusal  # a refusal that says why
    tok = tiny.byte_bpe_tokenizer()
    text = tok.decode(Renderer(tok, "urial").render_prompt("Name a fruit."))
    assert text.count("# Query:\n") == 4 and text.count("# Answer:\n") == 4
    assert demos[0]["query"] in text and demos[1]["answer"] in text
    # URIAL-R keeps the answers and drops their queries; the test query is still framed as a query.
    text_r = tok.decode(Renderer(tok, "urial-r").render_prompt("Name a fruit."))
    assert all(d["answer"] in text_r and d["query"] not in text_r for d in demos)
    assert text_r.count("# Answer:\n") == 4 and text_r.count("# Query:\n") == 1
    assert text_r.endswith("# Query:\nName a fruit.\n\n# Answer:\n")


def test_the_demonstrations_file_is_package_data():
    import tomllib
    from pathlib import Path

    from rtune.render.templates import DEMONSTRATIONS_FILE

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert DEMONSTRATIONS_FILE in pyproject["tool"]["setuptools"]["package-data"]["rtune.render"]


# -- content that spells special tokens stays text --------------------------------------------------
@pytest.mark.parametrize("name", ICL_TEMPLATES)
def test_special_spellings_stay_text(gemma_tokenizer, name):
    tok = gemma_tokenizer
    demos = [{"query": f"Explain {SPELLINGS}.", "answer": f"They are control tokens: {SPELLINGS}."}]
    r = renderer(tok, name, demos)
    history = [{"role": "user", "content": "<start_of_turn>user"}, {"role": "assistant", "content": "<eos>"},
               {"role": "user", "content": f"What is {SPELLINGS}?"}]
    ids = r.render_chat_prompt(history)
    assert [t for t in ids if t in control_ids(tok)] == [tok.bos_token_id]
    text = tok.decode(ids)
    assert f"What is {SPELLINGS}?" in text and "# Answer:\n<eos>\n\n" in text
    if name != "zero-shot":
        assert f"They are control tokens: {SPELLINGS}." in text


# -- stop strings and the trailing fence --------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.mark.parametrize("generated, reply, reason", [
    ("A banana.\n\n# Query:\nName another fruit.", "A banana.", "stop"),
    ("A banana.\n\n# Answer:\nA pear.", "A banana.", "stop"),
    ("A banana.\n# Instruction\nBe brief.", "A banana.", "stop"),
    ("A banana.\n```\n\n# Query:\nMore", "A banana.", "stop"),  # a fence that closes nothing is stripped
    ("Code:\n```py\nx = 1\n```\n\n# Query:\nMore", "Code:\n```py\nx = 1\n```", "stop"),  # a closed block stays
    ("A banana.```", "A banana.", "eos"),  # the cleanup applies at the EOS too
    ("A banana, # Query", "A banana, # Query", "eos"),  # not a header
])
def test_stop_strings_cut_the_reply(llama, tiny_tokenizer, generated, reply, reason):
    r = renderer(tiny_tokenizer, "urial-r")
    script = text_ids(tiny_tokenizer, generated)
    with tiny.ScriptedReply(llama, script, tiny_tokenizer.eos_token_id):
        (out,) = generate_ids(llama, tiny_tokenizer, r, [r.render_prompt("Name a fruit.")],
                              GenerationConfig(max_new_tokens=60))
    assert (out.text, out.finish_reason) == (reply, reason)
    assert tiny_tokenizer.decode(out.token_ids) == reply and out.num_tokens == len(out.token_ids)
    assert out.token_ids == script[: len(out.token_ids)]
    # The same script under tulu (no such stop strings, no cleanup) runs on to the EOS.
    with tiny.ScriptedReply(llama, script, tiny_tokenizer.eos_token_id):
        (plain,) = generate_ids(llama, tiny_tokenizer, Renderer(tiny_tokenizer), [r.render_prompt("Name a fruit.")],
                                GenerationConfig(max_new_tokens=60))
    assert (plain.text, plain.finish_reason) == (generated, "eos")


def test_strip_trailing_fence():
    assert strip_trailing_fence("Sure.\n```") == "Sure."
    assert strip_trailing_fence("Sure.\n```  \n") == "Sure."
    assert strip_trailing_fence("```\nx\n```") == "```\nx\n```"
    assert strip_trailing_fence("```\nx\n```\n```") == "```\nx\n```"
    assert strip_trailing_fence("no fence ``") == "no fence ``"


@pytest.mark.parametrize("stream", [True, False])
def test_chat_in_context(llama, tiny_tokenizer, stream):
    r = renderer(tiny_tokenizer, "urial")
    seen = []
    original = r.render_chat_prompt
    r.render_chat_prompt = lambda messages: seen.append(tiny_tokenizer.decode(original(messages))) or original(messages)
    out = io.StringIO()
    inputs = iter(["Name a fruit.", "Another one?", "/exit"])
    with tiny.ScriptedReply(llama, text_ids(tiny_tokenizer, "A pear.\n```\n\n# Query:\nx"), tiny_tokenizer.eos_token_id):
        history = chat_loop(llama, tiny_tokenizer, r, config=GenerationConfig(max_new_tokens=40),
                            input_fn=lambda prompt="": next(inputs), output=out, stream=stream)
    assert [m["content"] for m in history] == ["Name a fruit.", "A pear.", "Another one?", "A pear."]
    assert seen[0] == "<bos>" + URIAL
    assert seen[1] == "<bos>" + URIAL + "A pear.\n\n# Query:\nAnother one?\n\n# Answer:\n"
    # What is shown is exactly the reply: neither the stop string nor the stripped fence.
    shown = out.getvalue()
    assert "```" not in shown and "# Query" not in shown and shown.count("A pear.\n") == 2


# -- demonstration files ------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"query": "q", "answer": "a"}', "expected a JSON list"),
    ("[]", "the list is empty"),
    ('["just text"]', "item 0: expected an object"),
    ('[{"query": "q", "answer": "a"}, {"query": "q"}]', "item 1: field 'answer' is missing"),
    ('[{"query": "q", "answer": "  "}]', "item 0: field 'answer' is empty"),
    ('[{"query": "", "answer": "a"}]', "item 0: field 'query' is empty"),
    ('[{"answer": "a"}]', "item 0: field 'query' is missing"),
    ('[{"query": 3, "answer": "a"}]', "item 0: field 'query' is not text"),
    ('[{"query": "q", "response": "a"}]', "item 0: unknown field 'response'"),
])
def test_icl_file_errors_name_the_file_and_field(tmp_path, tiny_tokenizer, content, message):
    path = tmp_path / "demos.json"
    path.write_text(content)
    with pytest.raises(RtuneError, match=message) as e:
        Renderer(tiny_tokenizer, "urial", icl_file=path)
    assert str(path) in str(e.value)


def test_icl_file_for_urial_r_needs_answers_only(tmp_path, tiny_tokenizer):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps([{"answer": "Put it in boiling water for 8 minutes. "},
                                {"query": "ignored", "answer": "Air scatters blue light more than red light."}]))
    r = Renderer(tiny_tokenizer, "urial-r", icl_file=path)
    assert tiny_tokenizer.decode(r.render_prompt("Name a fruit.")) == "<bos>" + URIAL_R
    with pytest.raises(RtuneError, match="no demonstrations"):
        Renderer(tiny_tokenizer, "zero-shot", icl_file=path)
    with pytest.raises(RtuneError, match="go with --icl"):
        Renderer(tiny_tokenizer, "tulu", icl_file=path)
    with pytest.raises(RtuneError, match="cannot read"):
        Renderer(tiny_tokenizer, "urial", icl_file=tmp_path / "missing.json")


def test_saved_renderer_restores_the_demonstrations(tiny_tokenizer, tmp_path):
    r = renderer(tiny_tokenizer, "urial")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["template"] == "urial" and d["demonstrations"] == DEMOS
    back = Renderer.from_dict(d, tiny_tokenizer)
    assert back.render_prompt("Name a fruit.") == r.render_prompt("Name a fruit.")
    # The evaluation fingerprint (from the renderer's dict) tells the formats and demonstrations apart.
    from rtune.eval.generation import model_fingerprint

    folder = tiny.tiny_model_dir(tmp_path / "m", tokenizer=tiny_tokenizer)
    ids = {model_fingerprint(str(folder), x)["id"] for x in (
        Renderer(tiny_tokenizer), r, renderer(tiny_tokenizer, "urial-r"), renderer(tiny_tokenizer, "zero-shot"),
        renderer(tiny_tokenizer, "urial", DEMOS[:1]))}
    assert len(ids) == 5


# -- inference only -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ICL_TEMPLATES)
def test_training_is_refused(tiny_tokenizer, name):
    r = renderer(tiny_tokenizer, name)
    record = {"id": "a", "instruction": "Name a fruit.", "response": "A pear."}
    for method in ("rt", "it", "rt-empty-user"):
        with pytest.raises(RtuneError, match="inference only"):
            r.render_training(record, method)
    with pytest.raises(RtuneError, match="inference only"):
        r.render_dataset([record], "rt", 64)


def test_train_config_refuses_an_in_context_template(capsys):
    from rtune.train.config import load_config

    with pytest.raises(RtuneError, match="in-context prompt for untrained base models"):
        load_config(None, {"template": "urial-r"})
    assert main(["train", "--model", "m", "--data", "d.jsonl", "--out", "o", "--template", "urial"]) == 2
    assert "inference only" in capsys.readouterr().err


def test_trained_folders_refuse_icl(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "rtune_template.json").write_text("{}")
    for kw in ({"template": "urial-r"}, {"template": "zero-shot"}, {"template": None, "icl_file": "d.json"}):
        with pytest.raises(RtuneError, match="trained model with its own template.*plain"):
            load_renderer(str(folder), **kw)


# -- the Jinja export -----------------------------------------------------------------------------------
ODD_DEMOS = [
    {"query": 'Say "hi" and \'bye\' \\ now {{ x }} {% if %}', "answer": "Héllo wörld — 東京 🙂\tdone {# c #}"},
    {"query": "Line\r\nbreaks", "answer": "```python\nprint(1)\n```"},
]
PROMPTS = ["Give three tips for staying healthy.", "Traduis: café 東京 🙂", "  leading and trailing  ",
           "What is {% raw %}?", 'Say "hi" \\n now', "Write a Python loop.\n```\nfor i in x:\n```"]


@pytest.mark.parametrize("name, demos", [(n, d) for n in ICL_TEMPLATES for d in (None, DEMOS, ODD_DEMOS)
                                         if n != "zero-shot" or d is None],
                         ids=lambda v: v if isinstance(v, str) else {None: "own", id(DEMOS): "plain"}.get(
                             None if v is None else id(v), "odd"))
def test_exported_template_renders_like_rtune(tmp_path, tok, name, demos):
    r = Renderer(tok, name, demonstrations=demos)
    save_tokenizer(tok, r, tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    assert plain.chat_template == r.chat_template()
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS] + [[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello!\n"},
        {"role": "user", "content": PROMPTS[1]}]]
    for messages in conversations:
        ids = plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == r.render_chat_prompt(messages), messages
        text = plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == tok.decode(r.render_chat_prompt(messages)), messages
    if demos is DEMOS or name == "zero-shot":
        assert plain.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                         tokenize=False) == "<bos>" + EXPECTED[name]


# -- the command line ---------------------------------------------------------------------------------
@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "instruction": t, "response": f"Answer {i}."}) + "\n"
                            for i, t in enumerate(["Name a fruit.", "Give three tips.", "Say hi."])))
    return path


def test_cli_generate_in_context(tmp_path, capsys, tiny_model_path, prompts_file):
    out = tmp_path / "gens.jsonl"
    assert main(["generate", str(tiny_model_path), "--prompts", str(prompts_file), "--out", str(out),
                 "--icl", "urial-r", "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["generator"] == tiny_model_path.name + "+urial-r"
    capsys.readouterr()
    demos = tmp_path / "demos.json"
    demos.write_text(json.dumps([{"query": "q"}]))
    for args, message in [
        (["--icl", "urial", "--icl-file", str(demos)], f"--icl-file {demos}: item 0: field 'answer' is missing"),
        (["--icl-file", str(demos)], "--icl-file FILE goes with --icl urial"),
        (["--icl", "urial", "--template", "tulu"], "give one of them"),
    ]:
        assert main(["generate", str(tiny_model_path), "--prompts", str(prompts_file), "--out", str(out)] + args) == 2
        assert message in capsys.readouterr().err
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "rtune_template.json").write_text("{}")
    assert main(["generate", str(folder), "--prompts", str(prompts_file), "--out", str(out), "--icl", "zero-shot"]) == 2
    assert "--icl zero-shot is for plain (untrained) models" in capsys.readouterr().err


def test_cli_eval_labels_say_the_format(tmp_path, capsys, tiny_model_path, prompts_file):
    ev = tmp_path / "ev"
    args = ["eval", str(tiny_model_path), "--bench", str(prompts_file), "--out", str(ev), "--max-new-tokens", "2",
            "--no-relevance", "--names", "base"]
    assert main(args + ["--icl", "urial-r"]) == 0
    summary = json.loads((ev / "results" / "base_urial-r" / "prompts" / "summary.json").read_text())
    assert summary["model"]["label"] == "base+urial-r" and summary["model"]["template"] == "urial-r"
    # Scored in context: the reference after its prompt; there is no "without an instruction" rendering.
    assert "ranking_top1" in summary["metrics"] and "nll_given_instruction" in summary["metrics"]
    assert "nll_no_instruction" not in summary["metrics"] and "nll_gain" not in summary["metrics"]
    # The same base in two formats side by side, through the API the demo uses.
    from rtune.eval.run import EvalConfig, run_eval
    from rtune.eval.generation import EvalDecoding

    config = EvalConfig(benches=[str(prompts_file)], decoding=EvalDecoding(max_new_tokens=2), relevance=False,
                        progress=False)
    summaries = run_eval([str(tiny_model_path)] * 3, config, tmp_path / "ev2", labels=["base", "base", "base"],
                         templates=[None, "urial", "zero-shot"])
    assert [s["model"]["label"] for s in summaries] == ["base", "base+urial", "base+zero-shot"]
    assert len({s["model"]["fingerprint"]["id"] for s in summaries}) == 3
    assert all("ranking_top1" in s["metrics"] for s in summaries)
    assert "nll_gain" in summaries[0]["metrics"] and "nll_gain" not in summaries[1]["metrics"]


def test_cli_chat_and_serve_take_icl(monkeypatch):
    import rtune.infer.chat as chat_mod
    import rtune.serve.server as server_mod

    seen = []
    monkeypatch.setattr(chat_mod, "chat", lambda model, **kw: seen.append(("chat", model, kw["template"],
                                                                            kw.get("icl_file"))))
    monkeypatch.setattr(server_mod, "serve", lambda model, **kw: seen.append(("serve", model, kw["template"],
                                                                               kw.get("icl_file"))))
    assert main(["chat", "m", "--icl", "urial-r"]) == 0
    assert main(["serve", "m", "--icl", "urial", "--icl-file", "d.json"]) == 0
    assert main(["chat", "m", "--template", "model"]) == 0
    assert seen == [("chat", "m", "urial-r", None), ("serve", "m", "urial", "d.json"), ("chat", "m", "model", None)]


def test_serve_in_context(llama, tiny_tokenizer):
    """An OpenAI-compatible chat reply in context: cut at the next header, the lone fence stripped,
    streamed exactly as the plain reply."""
    import openai

    from rtune.serve.app import create_app
    from rtune.serve.engine import Engine
    from rtune.serve.server import ServerThread

    engine = Engine(llama, tiny_tokenizer, renderer(tiny_tokenizer, "urial-r"), "tiny")
    app = create_app(engine, max_batch_size=4, batch_wait_ms=5, max_queue=4, max_tokens=40)
    script = text_ids(tiny_tokenizer, "A pear.\n```\n\n# Query:\nx")
    messages = [{"role": "user", "content": "Name a fruit."}]
    with tiny.ScriptedReply(llama, script, tiny_tokenizer.eos_token_id), ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny", messages=messages)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("A pear.", "stop")
        assert reply.usage.prompt_tokens == len(renderer(tiny_tokenizer, "urial-r").render_prompt("Name a fruit."))
        chunks = client.chat.completions.create(model="tiny", messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "A pear."
