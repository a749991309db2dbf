"""The chunked loss re-implements the output layer; once per run it is checked against the model's own
loss. A head that scales its logits (Granite, Cohere) trains with the model's own forward instead; a
plain head (Llama, Gemma 3's soft-cap) keeps the chunked loss and trains exactly as before."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import byte_bpe_tokenizer, random_sequences, write_records
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import rtune.train.recipe as recipe
from rtune.data import read_records
from rtune.models import load_tokenizer
from rtune.render import Renderer
from rtune.run_folder import read_run_info
from rtune.train.batching import collate_padded, plan_steps, trained_tokens
from rtune.train.config import load_config
from rtune.train.loss import LossModel, check_output_head, token_loss_sum

VOCAB = 97
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Random models with the default initializer_range (0.02) have logits near 0, where a scale changes
# the loss by < 0.5%; larger weights give logits (and a scale's effect, ~10%) more like a trained model's.
INIT = 0.2


def make(kind, vocab=VOCAB, **ids):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, initializer_range=INIT, **SIZES, **ids)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if kind == "gemma3":  # soft-capped logits: the model rounds the cap in bf16, the chunked loss does it in fp32
        return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=6, final_logit_softcapping=5.0,
                                                  layer_types=["sliding_attention", "full_attention"]))
    if kind == "granite":  # logits / 8
        return GraniteForCausalLM(GraniteConfig(**common, logits_scaling=8.0))
    if kind == "cohere":  # logits * 0.0625
        return CohereForCausalLM(CohereConfig(**common, logit_scale=0.0625))
    raise ValueError(kind)


def check(model, precision):
    loss_model = LossModel(model, load_config(None, {"precision": precision}), torch.device("cpu")).train()
    s = random_sequences([64], [0], VOCAB)[0]
    return check_output_head(loss_model, model, collate_padded([{"input_ids": s["input_ids"], "labels": s["input_ids"]}], 0))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_plain_and_soft_capped_heads_pass_the_check(kind, precision):
    assert check(make(kind), precision) is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind, name", [("granite", "GraniteForCausalLM"), ("cohere", "CohereForCausalLM")])
def test_a_logit_scale_fails_the_check(kind, name, precision):
    why = check(make(kind), precision)
    assert why is not None and why.startswith(name) and "chunked loss" in why


def test_a_model_without_the_common_layout_is_reported(monkeypatch):
    monkeypatch.setattr("rtune.train.loss.causal_lm_parts", lambda model: None)
    assert "no separate output layer" in check(make("llama"), "fp32")


def test_the_check_draws_no_random_numbers_and_keeps_train_mode():
    """LoRA dropout is on in train mode: the check runs in eval mode, so training starts exactly as before."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make("llama"), LoraConfig(r=2, lora_dropout=0.5, target_modules="all-linear",
                                                     init_lora_weights=False))
    loss_model = LossModel(model, load_config(None, {"precision": "fp32"}), torch.device("cpu")).train()
    s = random_sequences([40], [0], VOCAB)[0]
    rng = torch.get_rng_state()
    assert check_output_head(loss_model, model, collate_padded([s], 0)) is None
    assert torch.equal(torch.get_rng_state(), rng) and loss_model.training and model.training


# -- whole training runs ---------------------------------------------------------------------------


def model_dir(kind, path):
    tok = byte_bpe_tokenizer()
    model = make(kind, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_config(**kw):
    return load_config(None, dict(batch_size=2, grad_accum=2, max_steps=2, max_length=64, lr=1e-2, lora_r=4,
                                  lora_alpha=8, precision="fp32", log_steps=1, save_steps=0, **kw))


def first_step_loss(path, data, config, impl):
    """The mean token loss of the run's first optimiser step, as the recipe plans it, with LoRA still a no-op."""
    tok = load_tokenizer(str(path))
    seqs, _ = Renderer(tok, template=config.template).render_dataset(read_records(data), config.method,
                                                                    config.max_length)
    seqs = [s for s in seqs if trained_tokens(s.labels) > 0]
    step = plan_steps([len(s.input_ids) for s in seqs], config, 0, 1)[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        total = sum(float(token_loss_sum(model, collate_padded([seqs[i] for i in b], tok.pad_token_id),
                                         torch.autocast("cpu", enabled=False), impl)) for b in step)
    return total / sum(trained_tokens(seqs[i].labels) for b in step for i in b)


def _log(run_dir):
    """The log rows, less their timings."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


@pytest.mark.parametrize("kind, name", [("granite", "GraniteForCausalLM"), ("cohere", "CohereForCausalLM")])
def test_a_scaled_head_trains_with_the_models_own_loss(kind, name, tmp_path, caplog):
    path = model_dir(kind, tmp_path / "model")
    data = write_records(tmp_path / "train.jsonl", n=8)
    config = run_config()
    with caplog.at_level("WARNING", logger="rtune.train"):
        info = recipe.train(str(path), str(data), str(tmp_path / "run"), config, progress=False)
    assert any(name in r.getMessage() and "loss_impl full" in r.getMessage() for r in caplog.records)
    for saved in (info, read_run_info(tmp_path / "run")):
        assert saved["training"]["loss_impl"] == "full" and saved["training"]["loss_impl_reason"].startswith(name)
        assert saved["config"]["loss_impl"] == "chunked"  # as asked: a resumed run compares equal
    logged = _log(tmp_path / "run")[0]["loss"]
    assert logged == pytest.approx(first_step_loss(path, data, config, "full"), rel=1e-5)
    assert abs(logged - first_step_loss(path, data, config, "chunked")) > 0.01 * logged  # what it would have trained


def test_a_plain_head_keeps_the_chunked_loss_and_trains_as_before(tiny_model_path, tmp_path, monkeypatch):
    data = write_records(tmp_path / "train.jsonl", n=8)
    checked = []

    def spy(*args):
        checked.append(check_output_head(*args))
        return checked[-1]

    monkeypatch.setattr(recipe, "check_output_head", spy)
    info = recipe.train(str(tiny_model_path), str(data), str(tmp_path / "checked"), run_config(), progress=False)
    assert checked == [None]
    assert info["training"]["loss_impl"] == "chunked" and "loss_impl_reason" not in info["training"]
    monkeypatch.setattr(recipe, "check_output_head", lambda *args: None)  # as before the check existed
    recipe.train(str(tiny_model_path), str(data), str(tmp_path / "unchecked"), run_config(), progress=False)
    assert _log(tmp_path / "checked") == _log(tmp_path / "unchecked")
    a = load_file(str(tmp_path / "checked" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "unchecked" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # asked for the full loss: no check, recorded as such
    monkeypatch.setattr(recipe, "check_output_head", spy)
    info = recipe.train(str(tiny_model_path), str(data), str(tmp_path / "full"), run_config(loss_impl="full"),
                        progress=False)
    assert checked == [None] and info["training"]["loss_impl"] == "full"
