"""Tiny tokenizers, models and training data built in memory, so tests run offline in seconds."""

import json
import random

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Give three tips for staying healthy.\nEat well, sleep, and exercise.",
    "<|user|>\n<|assistant|>\n",
    "Héllo wörld — naïve café, 東京, emoji 🙂 and tabs\tok.",
    "1. First\n2. Second\n3. Third",
] * 20


def byte_bpe_tokenizer(add_bos: bool = True, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE like Gemma 3 / Llama 3: no prefix space; adds <bos> like Gemma when add_bos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left"
    )


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style (Llama 2 / Mistral): a dummy prefix space on every call, BOS added."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model_dir(path: Path, seed: int = 0, tokenizer=None) -> Path:
    """A 2-layer Llama with random weights plus its tokenizer, saved as a plain model folder."""
    import torch

    tokenizer = tokenizer or byte_bpe_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_gpt2(tokenizer, positions: int = 512):
    """A 2-layer GPT-2 with random weights. Its positions are learned and absolute, so wrong
    position ids (left padding, a continuation after a cached prefix) change its outputs; RoPE
    models are blind to a constant position offset."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=positions, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def random_sequences(lengths, trained_from, vocab, seed=0):
    """Rendered-sequence dicts of random ids (from 3: clear of special ids), trained from position k on."""
    import torch

    from rtune.render import IGNORE

    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in zip(lengths, trained_from):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * k + ids[k:]})
    return out


WORDS = "the quick brown fox jumps over lazy dog eat well sleep and exercise first second third".split()


def write_records(path, n=24, seed=0, responses=None):
    """Random word salad, or (responses=[...]) a few fixed responses a tiny model can learn quickly."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            instruction = " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))
            if responses:
                response = responses[i % len(responses)]
            else:
                response = " ".join(rng.choices(WORDS, k=rng.randint(1, 20))) + "."
            f.write(json.dumps({"id": f"r{i}", "instruction": instruction, "response": response, "source": "t"}) + "\n")
    return path


def tiny_config(**kw):
    base = dict(
        batch_size=2, grad_accum=2, epochs=1, max_length=64, lr=1e-2, lora_r=4, lora_alpha=8,
        precision="fp32", log_steps=1, save_steps=0,
    )
    base.update(kw)
    from rtune.train.config import load_config

    return load_config(None, base)


class ScriptedReply:
    """Make the model write exactly `ids` (then EOS) while registered."""

    def __init__(self, model, ids, eos_id):
        self.model, self.ids = model, list(ids) + [eos_id]

    def __enter__(self):
        step = {"n": 0}

        def hook(module, args, kwargs, output):
            if kwargs["input_ids"].shape[1] > 1:  # a new prompt: the script starts over
                step["n"] = 0
            output.logits[:, -1, self.ids[min(step["n"], len(self.ids) - 1)]] += 1e4
            step["n"] += 1
            return output

        self.handle = self.model.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
