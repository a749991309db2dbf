"""Training recipe on a tiny Llama (built in conftest/tiny.py): loss, LoRA vs full FT, run folder, merge, config."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import random_sequences, tiny_config, write_records
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rtune.errors import RtuneError
from rtune.infer.merge import merge_run
from rtune.render import IGNORE
from rtune.run_folder import load_run, read_run_info
from rtune.train.batching import collate_padded
from rtune.train.config import PRESETS, TrainConfig, load_config
from rtune.train.loss import token_loss_sum
from rtune.train.recipe import train

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def lora_run(tiny_model_path, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    easy = write_records(out.parent / "easy.jsonl", responses=["The quick brown fox jumps over the lazy dog.",
                                                               "Eat well, sleep, and exercise."])
    info = train(str(tiny_model_path), str(easy), str(out), tiny_config(epochs=3), progress=False)
    return out, info


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# -- config -------------------------------------------------------------------------------------


def test_presets_and_defaults():
    assert load_config("paper") == TrainConfig()
    c = TrainConfig()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.lr, c.epochs, c.max_grad_norm, c.seed) == (64, 16, 0.1, 1e-4, 10, 0.3, 0)
    assert c.batch_size * c.grad_accum == 64 and c.max_length == 2048 and c.lr_scheduler == "constant"
    q = load_config("paper-qlora")
    assert (q.peft, q.optimizer, q.gradient_checkpointing, q.precision) == ("qlora", "paged_adamw_32bit", True, "bf16")
    cpu = load_config("cpu", {"lr": "2e-4", "epochs": "0.5", "max_steps": "none"})
    assert cpu.max_length == 512 and cpu.lr == 2e-4 and cpu.epochs == 0.5 and cpu.max_steps is None


def test_shipped_yaml_files_mirror_the_presets():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in PRESETS:  # every preset is written out (README says so)
        assert load_config(root / f"{name}.yaml") == load_config(name), name
    assert set(PRESETS) >= {"paper", "paper-qlora", "cpu"}


@pytest.mark.parametrize(
    "text, words",
    [
        ("lr: 1e-4\nlearning_rate: 3\n", ["learning_rate", "unknown field"]),
        ("batch_size: eight\n", ["'batch_size'", "integer"]),
        ("lora_dropout: 1.5\n", ["'lora_dropout'", "[0, 1)"]),
        ("peft: adalora\n", ["'peft'", "lora, qlora, none"]),
        ("epochs: -1\n", ["'epochs'", "> 0"]),
        ("- a list\n", ["mapping"]),
        ("lr: [1\n", ["not valid YAML"]),
    ],
)
def test_yaml_errors_name_the_file_and_field(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RtuneError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_yaml_reads_scientific_notation_and_overrides_name_their_source(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("lr: 1e-4\nlora_target: [q_proj, v_proj]\ngroup_by_length: true\n")
    c = load_config(path, {"seed": "3"})
    assert c.lr == 1e-4 and c.lora_target == ["q_proj", "v_proj"] and c.group_by_length and c.seed == 3
    with pytest.raises(RtuneError, match="command line: field 'seed'"):
        load_config(path, {"seed": "x"})
    with pytest.raises(RtuneError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")


# -- loss normalisation ---------------------------------------------------------------------------


def test_grad_accumulation_equals_one_big_batch():
    """4 micro-batches of 1 (different lengths and trained counts) == one batch of 4, same gradients."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    seqs = random_sequences([5, 17, 9, 30], [2, 3, 8, 1], 97)
    n_tokens = sum(sum(1 for x in s["labels"][1:] if x != IGNORE) for s in seqs)
    fp32 = torch.autocast("cpu", enabled=False)

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return g

    for s in seqs:  # accumulation: sum of token losses / tokens of the whole step
        (token_loss_sum(model, collate_padded([s], 0), fp32) / n_tokens).backward()
    accum = grads()
    (token_loss_sum(model, collate_padded(seqs, 0), fp32) / n_tokens).backward()
    big = grads()
    for name in big:
        torch.testing.assert_close(accum[name], big[name], rtol=1e-4, atol=1e-6)

    # the classic bug (mean of per-micro-batch means) gives a visibly different gradient
    for s in seqs:
        b = collate_padded([s], 0)
        n = int((b["labels"][:, 1:] != IGNORE).sum())
        (token_loss_sum(model, b, fp32) / n / len(seqs)).backward()
    wrong = grads()
    assert not torch.allclose(wrong["lm_head.weight"], big["lm_head.weight"], rtol=1e-2)


def test_loss_matches_the_models_own_mean_loss():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    (s,) = random_sequences([12], [4], 97)
    b = collate_padded([s], 0)
    ours = token_loss_sum(model, b, torch.autocast("cpu", enabled=False)) / 8  # 12 - 4 trained tokens
    theirs = model(input_ids=b["input_ids"], labels=b["labels"]).loss
    torch.testing.assert_close(ours, theirs)


def test_accumulation_layout_does_not_change_training(tiny_model_path, data, tmp_path):
    """Same optimiser steps via 4 x 1 accumulation and via batches of 4: same losses, norms, weights."""
    kw = dict(lora_dropout=0.0, max_steps=3, lr=1e-3)
    a = train(str(tiny_model_path), str(data), str(tmp_path / "a"), tiny_config(batch_size=1, grad_accum=4, **kw), progress=False)
    b = train(str(tiny_model_path), str(data), str(tmp_path / "b"), tiny_config(batch_size=4, grad_accum=1, **kw), progress=False)
    for ra, rb in zip(_log(tmp_path / "a"), _log(tmp_path / "b")):
        assert ra["trained_tokens"] == rb["trained_tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)


# -- LoRA and full fine-tuning ----------------------------------------------------------------------


def test_lora_training_lowers_loss_and_trains_only_the_adapter(lora_run, tiny_model_path):
    out, info = lora_run
    rows = _log(out)
    assert len(rows) == info["steps_done"] == 18  # 24 records / (2 x 2) = 6 steps x 3 epochs
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.25  # a random 2-layer model learns slowly through rank-4 adapters; still clear
    assert [r["step"] for r in rows] == list(range(1, 19))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "trained_tokens", "tokens_per_s", "elapsed_s"} <= set(rows[0])
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and weights[k].abs().sum() > 0 for k in weights)  # B starts at zero
    # the base model on disk is what the run uses: with the adapter switched off, logits are the base's
    model, tokenizer, renderer, _ = load_run(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = torch.tensor([renderer.render_prompt("the quick brown fox")])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        torch.testing.assert_close(plain, base(input_ids=ids).logits)
    assert not torch.allclose(tuned, plain)


def test_run_folder_describes_itself(lora_run):
    out, info = lora_run
    data = out.parent / "easy.jsonl"
    for name in ("rtune_run.json", "config.yaml", "log.jsonl", "tokenizer", "adapter"):
        assert (out / name).exists(), name
    saved = read_run_info(out)
    assert saved == json.loads(json.dumps(info))
    assert saved["status"] == "complete" and saved["method"] == "rt" and saved["weights"] == "adapter"
    assert saved["renderer"]["template"] == "tulu"
    from rtune.io import sha256_file

    assert saved["data"]["sha256"] == sha256_file(data)
    assert saved["data"]["records"] == 24 and saved["data"]["rendered"] == 24
    assert saved["data"]["trained_tokens"] > 0
    assert saved["final_loss"] == pytest.approx(_log(out)[-1]["loss"], rel=1e-5)
    assert {"torch", "transformers", "peft"} <= set(saved["versions"])
    assert load_config(out / "config.yaml") == load_config(None, saved["config"])
    assert saved["training"]["precision"] == "fp32" and saved["training"]["effective_batch"] == 4
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True


def test_full_finetuning_changes_base_weights(tiny_model_path, data, tmp_path):
    out = tmp_path / "full"
    info = train(str(tiny_model_path), str(data), str(out), tiny_config(peft="none", max_steps=3, lr=1e-3), progress=False)
    assert info["weights"] == "model" and (out / "model").is_dir() and not (out / "adapter").exists()
    before = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed
    model, _, _, run_info = load_run(out)
    assert run_info["weights"] == "model"


def test_truncated_records_are_counted(tiny_model_path, tmp_path):
    data = tmp_path / "d.jsonl"
    long = " ".join(["word"] * 40)
    rows = [{"id": "short", "instruction": "hi", "response": "ok."},
            {"id": "long", "instruction": long, "response": "fine."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = train(str(tiny_model_path), str(data), str(tmp_path / "r"),
                 tiny_config(method="it", max_length=16, batch_size=1, grad_accum=1), progress=False)
    # The long instruction is cut to fit (the response, the same as RT would train, is whole).
    counts = info["data"]
    assert (counts["records"], counts["rendered"], counts["dropped_nothing_trained"]) == (2, 2, 0)
    assert (counts["instruction_truncated"], counts["truncated"]) == (1, 0)


def test_bf16_autocast_trains_with_fp32_master_weights(tiny_model_path, data, tmp_path):
    info = train(str(tiny_model_path), str(data), str(tmp_path / "bf16"), tiny_config(precision="bf16", max_steps=2),
                 progress=False)
    assert info["training"]["precision"] == "bf16" and info["final_loss"] == info["final_loss"]  # not NaN
    weights = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_new_run_into_a_nonempty_folder_is_refused(tiny_model_path, data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(RtuneError, match="exists and is not empty; use --resume"):
        train(str(tiny_model_path), str(data), str(out), tiny_config(), progress=False)


def test_qlora_and_paged_optimizer_need_cuda(tiny_model_path, data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RtuneError, match="CUDA"):
        train(str(tiny_model_path), str(data), str(tmp_path / "q"), tiny_config(peft="qlora"), progress=False)
    with pytest.raises(RtuneError, match="CUDA"):
        train(str(tiny_model_path), str(data), str(tmp_path / "p"), tiny_config(optimizer="paged_adamw_32bit"),
              progress=False)


# -- merge --------------------------------------------------------------------------------------------


def test_merge_gives_a_plain_transformers_folder(lora_run, tmp_path):
    out, _ = lora_run
    merged = merge_run(out, tmp_path / "merged", dtype="fp32")
    assert (merged / "rtune_template.json").is_file() and (merged / "tokenizer_config.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    peft_model, tokenizer, renderer, _ = load_run(out)
    ids = torch.tensor([renderer.render_prompt("eat well and sleep")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    # rtune reads the template back from the merged folder
    _, _, renderer2, info2 = load_run(merged)
    assert renderer2.to_dict() == renderer.to_dict() and info2["method"] == "rt"
    with pytest.raises(RtuneError, match="exists"):
        merge_run(out, merged)


def test_gradient_checkpointing_gives_the_same_training(tiny_model_path, data, tmp_path):
    """Non-reentrant checkpointing replays the dropout RNG: same numbers, less memory."""
    kw = dict(max_steps=2, lr=1e-3)
    train(str(tiny_model_path), str(data), str(tmp_path / "plain"), tiny_config(**kw), progress=False)
    train(str(tiny_model_path), str(data), str(tmp_path / "gc"), tiny_config(gradient_checkpointing=True, **kw),
          progress=False)
    for ra, rb in zip(_log(tmp_path / "plain"), _log(tmp_path / "gc")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)



def test_checkpoint_tokens_recomputes_layers_of_large_micro_batches_only():
    from rtune.train.model import layers_to_checkpoint

    assert layers_to_checkpoint(2048, 2048, 18) == 0  # within the budget: every layer keeps its activations
    assert layers_to_checkpoint(4096, 2048, 18) == 9  # twice the budget: half the layers recompute
    assert layers_to_checkpoint(4096, 1024, 18) == 14
    assert layers_to_checkpoint(10**6, 1, 18) == 18


def test_checkpoint_tokens_gives_the_same_training_bit_for_bit(tiny_model_path, data, tmp_path, monkeypatch):
    """Layers chosen per micro-batch recompute the same numbers (dropout masks replayed): same losses,
    gradient norms and weights as without checkpointing, and the setting may change on resume."""
    import transformers.modeling_utils
    from torch.utils.checkpoint import checkpoint

    from rtune.train.config import BOOKKEEPING_FIELDS

    kw = dict(max_steps=3, lr=1e-3, lora_dropout=0.1)
    train(str(tiny_model_path), str(data), str(tmp_path / "plain"), tiny_config(**kw), progress=False)
    recomputed = []
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    # Micro-batches of 2 x ~10-40 tokens: a budget of 24 tokens checkpoints one or both layers of most.
    info = train(str(tiny_model_path), str(data), str(tmp_path / "auto"), tiny_config(checkpoint_tokens=24, **kw),
                 progress=False)
    assert info["config"]["checkpoint_tokens"] == 24 and recomputed
    for ra, rb in zip(_log(tmp_path / "plain"), _log(tmp_path / "auto")):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"]
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "auto" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "checkpoint_tokens" in BOOKKEEPING_FIELDS


def test_checkpoint_tokens_switches_layers_per_micro_batch(tiny_model_path):
    from rtune.train.loss import LossModel
    from rtune.train.model import build_model, checkpoint_layers

    config = tiny_config(checkpoint_tokens=40, precision="fp32")
    model, _ = build_model(str(tiny_model_path), config, torch.device("cpu"))
    loss_model = LossModel(model, config, torch.device("cpu")).train()
    layers = checkpoint_layers(model)
    calls = []
    for layer in layers:
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda f, *a, _func=func, **k: calls.append(1) or _func(f, *a, **k)
    small = collate_padded(random_sequences([10, 12], [2, 2], 100), 0)  # 24 tokens
    large = collate_padded(random_sequences([30, 20, 25], [2, 2, 2], 100), 0)  # 90 tokens: 2 of 2 layers
    loss_model(small).backward()
    assert calls == [] and not any(layer.gradient_checkpointing for layer in layers)
    loss_model(large).backward()
    assert len(calls) == 2
    loss_model(small).backward()
    assert len(calls) == 2 and not any(layer.gradient_checkpointing for layer in layers)
