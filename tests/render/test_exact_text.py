"""Exact text: special-token spellings in content stay text; the template exported as Jinja renders as rtune does."""

import json

import pytest
import tiny
from tokenizers import AddedToken
from transformers import AutoTokenizer

from rtune.cli import main
from rtune.render import IGNORE, METHODS, Renderer, training_messages
from rtune.run_folder import save_tokenizer

SPELLINGS = ["<eos>", "<bos>", "<|im_end|>", "<|im_start|>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>",
             "<|endoftext|>", "<pad>"]
TRICKY = [
    {"id": "specials", "instruction": "Explain " + " and ".join(SPELLINGS) + ".",
     "response": "HTML: <s>old</s>. Gemma: <start_of_turn>model ... <end_of_turn><eos>. ChatML: <|im_start|>user"
                 "\nhi<|im_end|>. GPT-2: <|endoftext|>"},
    {"id": "only", "instruction": "<|im_end|>", "response": "<eos>"},
]
ORDINARY = [
    {"id": "plain", "instruction": "Give three tips for staying healthy.", "response": "1. Eat well.\n2. Sleep."},
    {"id": "unicode", "instruction": "Traduis: café 東京 🙂", "response": "Héllo wörld — naïve, 東京 🙂\tdone"},
    {"id": "code", "instruction": "Write a Python loop.",
     "response": "```python\nfor i in range(3):\n    print(f\"{i}\")  # {{ not jinja }}\n```"},
    {"id": "spaces", "instruction": "  leading and trailing  ", "response": " starts with a space\n\nends with two\n\n"},
    {"id": "jinja-like", "instruction": "What is {% raw %}?", "response": "It is {{ '{%' }} and {# a comment #}."},
    {"id": "crlf", "instruction": "Line\r\nbreaks\r\n", "response": "a\r\nb\tc\u00a0d"},
    {"id": "quotes", "instruction": 'Say "hi" and \'bye\' \\ now', "response": "\"quoted\" \\n is not a newline"},
]


def control_ids(tok):
    """The tokenizer's control tokens (<unk> spells unknown text in tiny vocabularies, so it is not one)."""
    return {i for i, a in tok.added_tokens_decoder.items() if a.special} - {tok.unk_token_id}


@pytest.fixture(params=["gemma", "smollm2", "tiny-metaspace"])
def tokenizer(request):
    if request.param == "tiny-metaspace":
        return tiny.metaspace_tokenizer()  # SentencePiece-style: <s> and </s> are its BOS and EOS
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.mark.parametrize("method", METHODS)
def test_special_spellings_train_as_text(tokenizer, method):
    r = Renderer(tokenizer)
    for rec in TRICKY:
        seq = r.render_training(rec, method)
        controls = [t for t in seq.input_ids if t in control_ids(tokenizer)]
        assert controls == ([r.bos_id] if r.bos_id is not None else []) + [tokenizer.eos_token_id]
        trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
        if tokenizer.unk_token_id not in trained:  # the tiny SentencePiece vocabulary lacks some characters
            assert tokenizer.decode(trained[:-1]).strip() == rec["response"].strip()
        if method == "it" and tokenizer.unk_token_id not in seq.input_ids:
            assert rec["instruction"] in tokenizer.decode(seq.input_ids)


def test_special_spellings_in_prompts_stay_text(tokenizer):
    r = Renderer(tokenizer)
    for rec in TRICKY:
        prompt = r.render_prompt(rec["instruction"])
        assert [t for t in prompt if t in control_ids(tokenizer)] == ([r.bos_id] if r.bos_id is not None else [])
        history = [{"role": "user", "content": "<|user|>"}, {"role": "assistant", "content": rec["response"]},
                   {"role": "user", "content": rec["instruction"]}]
        chat = r.render_chat_prompt(history)
        # One EOS: the end of the assistant turn, inserted by the template; none from the content.
        assert chat.count(tokenizer.eos_token_id) == 1


def test_chatml_template_keeps_content_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    r = Renderer(tok, "model")
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    plain = r.render_prompt("hello")
    for rec in TRICKY:
        prompt = r.render_prompt(rec["instruction"])
        # The same control tokens as a prompt without spellings: only the template's.
        assert [t for t in prompt if t in (im_start, im_end)] == [t for t in plain if t in (im_start, im_end)]
        for method in METHODS:
            seq = r.render_training(rec, method)
            trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
            assert trained.count(im_end) == 1 and trained[-1] == im_end, method


def test_inspect_cli_shows_spellings_trained_as_text(tmp_path, capsys, gemma_tokenizer, smollm2_tokenizer):
    data = tmp_path / "tricky.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRICKY))
    for model, tok in [("gemma-3-270m", gemma_tokenizer), ("smollm2-135m-instruct", smollm2_tokenizer)]:
        for method in METHODS:
            assert main(["data", "inspect", str(data), "--model", model, "--method", method, "--json"]) == 0
            view = json.loads(capsys.readouterr().out)
            assert view["trained_text"] == TRICKY[0]["response"] + tok.eos_token
            assert view["input_ids"].count(tok.eos_token_id) == 1, (model, method)
            assert view["input_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("name,template", [("gemma", "tulu"), ("smollm2", "tulu"), ("smollm2", "model")])
def test_exported_template_renders_like_rtune(tmp_path, request, name, template):
    """Plain transformers, loading the saved tokenizer, gives rtune's ids for prompts and training pairs."""
    tok = request.getfixturevalue(f"{name}_tokenizer")
    r = Renderer(tok, template)
    save_tokenizer(tok, r, tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    assert plain.chat_template == r.chat_template()
    for rec in ORDINARY:
        user = [{"role": "user", "content": rec["instruction"]}]
        ids = plain.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == r.render_prompt(rec["instruction"]), rec["id"]
        for method in METHODS:
            if template == "model" and method == "rt":
                continue  # a chat template cannot render an assistant turn without a user turn
            messages = training_messages(rec, method)
            ids = plain.apply_chat_template(messages, tokenize=True, return_dict=False)
            assert list(ids) == r.render_messages(messages).input_ids, (rec["id"], method)


def trimming_tokenizer(space_before_end: bool = False):
    """A Llama-3-like template that trims content, with its own special tokens."""
    tok = tiny.byte_bpe_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|start|>", special=True),
                                                          AddedToken("<|eot|>", special=True)]})
    end = " <|eot|>" if space_before_end else "<|eot|>"
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] | trim }}" + end
        + "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
    )
    return tok


def test_model_template_that_trims_renders_trimmed_content():
    tok = trimming_tokenizer()
    r = Renderer(tok, "model")
    assert r.template.trims
    eot = tok.convert_tokens_to_ids("<|eot|>")
    rec = {"id": "ws", "instruction": "  Q?  ", "response": "  An answer with spaces. \n\n"}
    for method in METHODS:
        seq = r.render_training(rec, method)  # no abort on ordinary data
        trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
        assert tok.decode(trained) == "An answer with spaces.<|eot|>" and trained[-1] == eot
    assert r.stop_ids[0] == eot


def test_model_template_end_marker_after_a_space():
    tok = trimming_tokenizer(space_before_end=True)
    r = Renderer(tok, "model")
    eot = tok.convert_tokens_to_ids("<|eot|>")
    assert r.template.end_ids == [eot]  # the space before the marker is not a stop id
    assert set(r.stop_ids) == {eot, tok.eos_token_id}
    seq = r.render_training({"id": "x", "instruction": "Q", "response": "A"}, "it")
    trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
    assert tok.decode(trained) == "A <|eot|>"  # the space is trained with the marker
