"""Exact loss masks for rt / it / rt-empty-user, with real and in-memory tokenizers."""

import pytest
import tiny

from rtune.errors import RtuneError
from rtune.render import IGNORE, METHODS, Renderer
from rtune.render.inspect import describe, visualize

HEADERS = {
    "it": "<|user|>\n{instruction}\n<|assistant|>\n",
    "rt": "<|assistant|>\n",
    "rt-empty-user": "<|user|>\n\n<|assistant|>\n",
}

RECORDS = [
    {"id": "plain", "instruction": "Give three tips for staying healthy.", "response": "1. Eat well.\n2. Sleep.\n3. Move."},
    {"id": "unicode", "instruction": "Traduis: café 東京", "response": "Héllo wörld — naïve café, 東京 🙂\tdone"},
    # A response that contains the template's own markers: a marker search would mis-mask it.
    {"id": "markers", "instruction": "Show the tags.", "response": "Write <|assistant|>\n then <|user|>\n and <eos>."},
    # Spellings of special tokens in content stay text (a tokenizer tutorial, HTML, a ChatML sample).
    {"id": "specials", "instruction": "Explain <bos> and <|im_end|> and <start_of_turn>user",
     "response": "<s>old</s> means strike; Gemma ends with <eos>, ChatML with <|im_end|>; <start_of_turn>model"},
    {"id": "spaces", "instruction": "  lead", "response": " starts with a space\n\nand ends with newline\n"},
    {"id": "long", "instruction": "Count.", "response": " ".join(str(i) for i in range(400))},
]


@pytest.fixture(params=["tiny-bpe", "tiny-metaspace", "gemma", "smollm2"])
def tokenizer(request):
    if request.param == "tiny-bpe":
        return tiny.byte_bpe_tokenizer()
    if request.param == "tiny-metaspace":
        return tiny.metaspace_tokenizer()
    return request.getfixturevalue(f"{request.param}_tokenizer")


def encode(tok, text):
    """Text as text: special-token spellings are not parsed (what rtune does with all content)."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def special_ids(tok):
    """Control tokens (<unk> is how a tiny vocabulary spells unknown text, not a control token)."""
    return {i for i, a in tok.added_tokens_decoder.items() if a.special} - {tok.unk_token_id}


def adds_bos(tok):
    return tok("a")["input_ids"][:1] == [tok.bos_token_id] != encode(tok, "a")[:1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_tulu_mask_is_exactly_response_and_eos(tokenizer, method, record):
    r = Renderer(tokenizer)
    seq = r.render_training(record, method)
    ids, labels = seq.input_ids, seq.labels
    assert len(ids) == len(labels)

    # Trained tokens: the response tokenized on its own, then EOS; contiguous, at the end.
    expected = encode(tokenizer, record["response"]) + [tokenizer.eos_token_id]
    n = len(expected)
    assert ids[-n:] == expected
    assert labels[-n:] == expected
    assert all(x == IGNORE for x in labels[:-n])

    # The untrained part is BOS (exactly one, only when the tokenizer adds one) and the header.
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    header = HEADERS[method].format(**record)
    assert ids[: len(ids) - n] == bos + encode(tokenizer, header)
    assert ids.count(tokenizer.bos_token_id) == len(bos) or not bos
    if bos:
        assert ids[1] != tokenizer.bos_token_id

    # The trained text decodes to the response and EOS; exactly one control token: the final EOS.
    assert describe(r, seq)["trained_text"].lstrip() == tokenizer.decode(expected).lstrip()
    assert [t for t in ids if t in special_ids(tokenizer)] == bos + [tokenizer.eos_token_id]


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_it_training_prompt_is_the_inference_prompt(tokenizer, record):
    r = Renderer(tokenizer)
    seq = r.render_training(record, "it")
    prompt = r.render_prompt(record["instruction"])
    assert seq.input_ids[: len(prompt)] == prompt
    assert all(x == IGNORE for x in seq.labels[: len(prompt)])
    assert seq.labels[len(prompt)] != IGNORE


def test_byte_level_segments_equal_joint_tokenization(gemma_tokenizer):
    # For byte-level BPE, segment-wise tokenization must decode to the exact training text.
    r = Renderer(gemma_tokenizer)
    for rec in RECORDS:
        seq = r.render_training(rec, "it")
        text = f"<bos><|user|>\n{rec['instruction']}\n<|assistant|>\n{rec['response']}<eos>"
        assert gemma_tokenizer.decode(seq.input_ids) == text


def test_gemma_facts(gemma_tokenizer):
    r = Renderer(gemma_tokenizer)
    seq = r.render_training(RECORDS[0], "rt")
    assert seq.input_ids[0] == 2 and seq.input_ids.count(2) == 1  # one <bos>
    assert seq.input_ids[-1] == gemma_tokenizer.convert_tokens_to_ids("<eos>") == r.stop_ids[0]


def trained_ids(seq):
    return [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]


def test_truncation_cuts_the_instruction_before_the_response(tiny_tokenizer):
    r = Renderer(tiny_tokenizer)
    rec = {"id": "x", "instruction": "word " * 50, "response": "ok then"}
    full = r.render_training(rec, "it")
    prompt_len = len(r.render_prompt(rec["instruction"]))
    # The it prompt alone fills max_length: its instruction is cut, the whole response still trains.
    cut = r.render_training(rec, "it", max_length=prompt_len)
    assert len(cut.input_ids) <= prompt_len and trained_ids(cut) == trained_ids(full)
    assert tiny_tokenizer.decode(cut.input_ids).startswith("<bos><|user|>\nword word")
    assert r.render_training(rec, "rt", max_length=prompt_len) == r.render_training(rec, "rt")

    seqs, stats = r.render_dataset([rec, RECORDS[0]], "it", max_length=prompt_len)
    assert stats.instruction_truncated == 1 and stats.truncated == 0 and stats.dropped_nothing_trained == 0
    assert stats.rendered == len(seqs) == 2
    assert stats.trained_tokens == sum(s.num_trained for s in seqs)
    # Nothing of the response fits after the instruction-free prompt: dropped under every method.
    tight = r.fixed_prefix_length()
    for method in METHODS:
        _, stats = r.render_dataset([rec], method, max_length=tight)
        assert stats.dropped_nothing_trained == 1, method


@pytest.mark.parametrize("max_length", [24, 40, 64, 200])
def test_every_method_trains_the_same_response_tokens(gemma_tokenizer, max_length):
    r = Renderer(gemma_tokenizer)
    long_instruction = {"id": "li", "instruction": "Explain this. " * 30, "response": "Short answer, then more. " * 8}
    for rec in RECORDS + [long_instruction]:
        kept = {m: r.render_training(rec, m, max_length) for m in METHODS}
        assert all(len(s.input_ids) <= max_length for s in kept.values() if s is not None)
        trained = {m: trained_ids(s) if s is not None else None for m, s in kept.items()}
        assert trained["rt"] == trained["it"] == trained["rt-empty-user"], rec["id"]


def test_long_response_truncated_loses_eos(gemma_tokenizer):
    r = Renderer(gemma_tokenizer)
    seq = r.render_training(RECORDS[-1], "rt", max_length=64)
    assert seq.input_ids[-1] != gemma_tokenizer.eos_token_id
    # The response budget is what is left after rt-empty-user's prompt, the longest without instruction.
    assert seq.num_trained == 64 - len([gemma_tokenizer.bos_token_id] + encode(gemma_tokenizer, "<|user|>\n\n<|assistant|>\n"))
    assert len(r.render_training(RECORDS[-1], "rt-empty-user", max_length=64).input_ids) == 64


def test_it_needs_an_instruction_but_rt_does_not(tiny_tokenizer):
    r = Renderer(tiny_tokenizer)
    rec = {"id": "resp-only", "instruction": "", "response": "An answer."}
    with pytest.raises(RtuneError, match="resp-only.*no instruction"):
        r.render_training(rec, "it")
    assert r.render_training(rec, "rt").num_trained > 0
    with pytest.raises(RtuneError, match="empty"):
        r.render_training({"id": "e", "response": "  "}, "rt")
    with pytest.raises(RtuneError, match="unknown method"):
        r.render_training(rec, "sft")


def test_model_template_chatml(smollm2_tokenizer):
    tok = smollm2_tokenizer
    r = Renderer(tok, "model")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert r.stop_ids[0] == im_end
    rec = RECORDS[1]
    for method, header_end in [("it", "<|im_start|>assistant\n"), ("rt", "<|im_start|>assistant\n"),
                               ("rt-empty-user", "<|im_start|>assistant\n")]:
        seq = r.render_training(rec, method)
        trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
        assert trained == encode(tok, rec["response"]) + [im_end]
        first = next(i for i, x in enumerate(seq.labels) if x != IGNORE)
        assert tok.decode(seq.input_ids[:first]).endswith(header_end)
        # The newline after <|im_end|> belongs to the template, not the response: untrained.
        assert seq.labels[-1] == IGNORE and tok.decode(seq.input_ids[-1:]) == "\n"
    rt = r.render_training(rec, "rt")
    assert "user" not in tok.decode(rt.input_ids)
    it = r.render_training(rec, "it")
    prompt = r.render_prompt(rec["instruction"])
    assert it.input_ids[: len(prompt)] == prompt


def test_model_template_missing_is_a_clear_error(gemma_tokenizer):
    with pytest.raises(RtuneError, match="no chat template.*--template tulu"):
        Renderer(gemma_tokenizer, "model")


def test_renderer_round_trips_through_run_metadata(smollm2_tokenizer, gemma_tokenizer):
    for tok, template in [(gemma_tokenizer, "tulu"), (smollm2_tokenizer, "model")]:
        r = Renderer(tok, template)
        again = Renderer.from_dict(r.to_dict(), tok)
        for method in METHODS:
            assert again.render_training(RECORDS[0], method) == r.render_training(RECORDS[0], method)
        assert again.render_prompt("hi") == r.render_prompt("hi")
    with pytest.raises(RtuneError, match="does not match"):
        Renderer.from_dict(Renderer(gemma_tokenizer).to_dict(), smollm2_tokenizer)


def test_multi_turn_prompt_repeats_training_rendering(gemma_tokenizer):
    r = Renderer(gemma_tokenizer)
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    ids = r.render_chat_prompt(msgs)
    assert gemma_tokenizer.decode(ids) == (
        "<bos><|user|>\nHi\n<|assistant|>\nHello!<eos>\n<|user|>\nTell me a joke.\n<|assistant|>\n"
    )
    with pytest.raises(RtuneError, match="end with a user"):
        r.render_chat_prompt(msgs[:2])


def test_visualize_marks_trained_span(tiny_tokenizer):
    r = Renderer(tiny_tokenizer)
    seq = r.render_training({"id": "v", "instruction": "Q?", "response": "A."}, "it")
    assert visualize(r, seq, color=False) == "<bos><|user|>\nQ?\n<|assistant|>\n⟦A.<eos>⟧"
    assert "\x1b[42;30mA.<eos>\x1b[0m" in visualize(r, seq, color=True)
