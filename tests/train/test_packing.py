"""Fast training paths change nothing that is trained: packed == padded, chunked loss == full logits,
in loss and in gradients, also under accumulation and for a soft-capped, tied-embedding Gemma 3."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import random_sequences
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from rtune.render import IGNORE
from rtune.train.batching import collate_packed, collate_padded, register_varlen_sdpa
from rtune.train.config import load_config
from rtune.models.heads import causal_lm_parts
from rtune.train.loss import chunked_linear_ce_sum, token_loss_sum
from rtune.train.recipe import train

FP32 = torch.autocast("cpu", enabled=False)
VOCAB = 97


def _impl(attn):
    return register_varlen_sdpa() if attn == "varlen" else attn


def llama(attn="sdpa"):
    attn = _impl(attn)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def gemma3(attn="sdpa"):
    """Tiny Gemma 3: tied embeddings, final logit soft-cap, sliding-window layers shorter than the sequences."""
    attn = _impl(attn)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
                           layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0,
                           attn_implementation=attn)
    return Gemma3ForCausalLM(cfg)


def seqs(lengths=(5, 17, 9, 30), trained_from=(2, 3, 8, 1), seed=0):
    return random_sequences(lengths, trained_from, VOCAB, seed)


def n_trained(batch_seqs):
    return sum(sum(1 for x in s["labels"][1:] if x != IGNORE) for s in batch_seqs)


def loss_and_grads(model, batches, impl="chunked", chunk=0, autocast=FP32):
    """Loss of one optimiser step over `batches` (collated micro-batches), and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b, n in batches:
        loss = token_loss_sum(model, b, autocast, impl, chunk) / n
        loss.backward()
        total += float(loss)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total, grads


def assert_same(a, b, rtol=1e-4, atol=1e-6):
    assert a[0] == pytest.approx(b[0], rel=rtol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("make", [llama, gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_equals_padded_loss_and_gradients(make, attn):
    """sdpa / eager: block-diagonal mask from the position ids; varlen: attention sequence by sequence."""
    model = make(attn)
    s = seqs()
    n = n_trained(s)
    padded = loss_and_grads(model, [(collate_padded(s, 0), n)], impl="full")
    packed = loss_and_grads(model, [(collate_packed(s), n)], impl="full")
    assert_same(packed, padded)
    # and the chunked loss on packed rows, with chunks that do not divide the trained positions
    assert_same(loss_and_grads(model, [(collate_packed(s), n)], chunk=7), padded)


def test_packing_really_separates_sequences():
    """Without the restarting position ids the second sequence would see the first: the loss changes."""
    model = llama()
    s = seqs((8, 8), (1, 1))
    b = collate_packed(s)
    joined = {"input_ids": b["input_ids"], "labels": b["labels"],
              "position_ids": torch.arange(b["input_ids"].size(1)).unsqueeze(0)}
    with torch.no_grad():
        apart = token_loss_sum(model, b, FP32)
        together = token_loss_sum(model, joined, FP32)
        alone = sum(token_loss_sum(model, collate_padded([x], 0), FP32) for x in s)
    torch.testing.assert_close(apart, alone)
    assert not torch.allclose(together, alone)


@pytest.mark.parametrize("make", [llama, gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("chunk, tile_bytes", [(0, None), (1, None), (5, None), (0, 4 * 32 * 61), (7, 4 * 32 * 7)])
def test_chunked_loss_equals_full_logits(make, chunk, tile_bytes, monkeypatch):
    """Every parameter trained (full fine-tuning): the output weight's gradient goes through the chunks too.
    With small tile_bytes the vocabulary (97) is split into tiles of 32 (the last one shorter)."""
    if tile_bytes:
        monkeypatch.setattr("rtune.train.loss.CPU_TILE_BYTES", tile_bytes)
    model = make()
    s = seqs()
    b = collate_padded(s, 0)
    n = n_trained(s)
    assert_same(loss_and_grads(model, [(b, n)], impl="chunked", chunk=chunk), loss_and_grads(model, [(b, n)], impl="full"))


@pytest.mark.parametrize("tile_bytes", [None, 4 * 4 * 32])
def test_chunked_loss_matches_cross_entropy_directly(tile_bytes, monkeypatch):
    if tile_bytes:
        monkeypatch.setattr("rtune.train.loss.CPU_TILE_BYTES", tile_bytes)  # the 50 columns in tiles of 32 and 18
    torch.manual_seed(1)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.randint(0, 50, (11,))
    for softcap in (None, 3.0):
        ours = chunked_linear_ce_sum(h, w, t, softcap, chunk=4)
        gh, gw = torch.autograd.grad(2.5 * ours, (h, w))  # the incoming gradient is a scale
        logits = h @ w.T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        ref = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        rh, rw = torch.autograd.grad(2.5 * ref, (h, w))
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(gh, rh)
        torch.testing.assert_close(gw, rw)
    with torch.no_grad():  # evaluation: no gradient work, same loss
        torch.testing.assert_close(chunked_linear_ce_sum(h, w, t, chunk=4), torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum"))


def test_chunked_loss_under_bf16_autocast_is_close_to_full():
    model = gemma3()
    s = seqs()
    b, n = collate_padded(s, 0), n_trained(s)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    chunked = loss_and_grads(model, [(b, n)], impl="chunked", chunk=5, autocast=bf16)
    full = loss_and_grads(model, [(b, n)], impl="full", autocast=bf16)
    assert chunked[0] == pytest.approx(full[0], rel=2e-2)
    for name in full[1]:
        assert torch.nn.functional.cosine_similarity(chunked[1][name].flatten(), full[1][name].flatten(), dim=0) > 0.98


def test_accumulation_over_packed_micro_batches_of_different_lengths():
    """Step loss = mean over the step's trained tokens: micro-batches of 1 and 3 sequences == one batch of 4."""
    model = gemma3()
    s = seqs()
    n = n_trained(s)
    one = loss_and_grads(model, [(collate_padded(s, 0), n)], impl="full")
    accum = loss_and_grads(model, [(collate_packed(s[:1]), n), (collate_packed(s[1:]), n)])
    assert_same(accum, one)


def test_body_and_head_are_found_through_peft():
    from peft import LoraConfig, get_peft_model

    model = gemma3()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    body, head, softcap = causal_lm_parts(peft_model)
    assert body is model.model and head is model.lm_head and softcap == 5.0


# -- whole training runs ---------------------------------------------------------------------------


def _write_records(path, n=12):
    words = "the quick brown fox jumps over lazy dog eat well sleep and exercise".split()
    with open(path, "w") as f:
        for i in range(n):
            response = " ".join(words[(i * 5 + j) % len(words)] for j in range(2 + (i * 7) % 19)) + "."
            f.write(json.dumps({"id": f"r{i}", "instruction": "say something", "response": response}) + "\n")
    return path


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_training_runs_agree_across_packing_and_loss_impl(tiny_model_path, tmp_path):
    data = _write_records(tmp_path / "d.jsonl")
    base = dict(batch_size=3, grad_accum=2, max_steps=2, max_length=64, lr=1e-3, lora_r=4, lora_alpha=8,
                lora_dropout=0.0, precision="fp32", log_steps=1, save_steps=0)
    runs, infos = {}, {}
    variants = {"padded-full": dict(loss_impl="full"), "padded": {}, "packed": dict(packing=True),
                "packed-mask": dict(packing=True, packed_attention="mask"),
                "packed-fused": dict(packing=True, fuse_steps=True)}  # each step's 2 micro-batches as one row
    for name, kw in variants.items():
        infos[name] = train(str(tiny_model_path), str(data), str(tmp_path / name), load_config(None, {**base, **kw}),
                            progress=False)
        runs[name] = (_log(tmp_path / name), load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")))
    assert infos["packed"]["training"]["attention"] == "rtune_varlen_sdpa"
    assert infos["packed-mask"]["training"]["attention"] == infos["padded"]["training"]["attention"] == "sdpa"
    ref_log, ref_w = runs["padded-full"]
    for name, (rows, weights) in runs.items():
        for a, b in zip(rows, ref_log):
            assert a["trained_tokens"] == b["trained_tokens"], name
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), name
        for k in ref_w:
            # Adam turns float-rounding differences of near-zero gradients into ~1e-6 weight differences
            torch.testing.assert_close(weights[k], ref_w[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_fuse_steps_runs_a_step_as_one_pass_and_needs_packing(tiny_model_path, tmp_path):
    from rtune.errors import RtuneError
    from rtune.train.batching import fuse_micro_batches as fused

    assert fused([([3, 1], 1.0), ([0], 1.0), ([2, 5], 1.0)]) == [([3, 1, 0, 2, 5], 1.0)]
    # A process short of micro-batches keeps its zero-weight stand-in (DDP needs its backward).
    assert fused([([3, 1], 0.0)]) == [([3, 1], 0.0)]
    assert fused([([3, 1], 1.0), ([4], 0.0)]) == [([3, 1], 1.0)]
    data = _write_records(tmp_path / "d.jsonl")
    with pytest.raises(RtuneError, match="fuse_steps needs packing"):
        train(str(tiny_model_path), str(data), str(tmp_path / "run"),
              load_config(None, dict(fuse_steps=True, max_steps=1, lora_r=4, save_steps=0)), progress=False)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_frozen_base_in_bf16_gives_the_same_numbers_under_autocast():
    """Autocast rounds the frozen weights to bf16 at every forward anyway: storing them in bf16 changes nothing."""
    import copy

    from peft import LoraConfig, get_peft_model

    from rtune.train.model import frozen_linears_to_bf16

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(gemma3(), lora)
    converted = copy.deepcopy(model)
    assert frozen_linears_to_bf16(converted) == 2 * 7  # q k v o gate up down in each of 2 layers
    s = seqs()
    b, n = collate_packed(s), n_trained(s)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    before, after = loss_and_grads(model, [(b, n)], autocast=bf16), loss_and_grads(converted, [(b, n)], autocast=bf16)
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_numpy_dropout_is_dropout_and_follows_torch_seed():
    from peft import LoraConfig, get_peft_model

    from rtune.train.model import NumpyDropout, use_numpy_dropout

    d = NumpyDropout(0.25).train()
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(1)
    y = d(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.005 and torch.allclose(y[kept], torch.tensor(1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows through the kept elements only, scaled alike
    torch.manual_seed(1)
    assert torch.equal(d(x), y)  # the mask is a function of torch's RNG state
    assert torch.equal(d.eval()(x), x)
    model = get_peft_model(llama(), LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    assert use_numpy_dropout(model) == 2 * 7


class _FakeLigerLoss(torch.nn.Module):
    """Liger's LigerFusedLinearCrossEntropyLoss interface (weight, hidden, targets) computed plainly:
    Liger's kernels need a GPU; this checks what rtune hands them and what it does with the result."""

    calls = []

    def __init__(self, ignore_index=-100, reduction="mean", softcap=None):
        super().__init__()
        self.reduction, self.softcap = reduction, softcap

    def forward(self, lin_weight, _input, target):
        _FakeLigerLoss.calls.append((lin_weight.dtype, _input.dtype, self.softcap, self.reduction))
        logits = (_input @ lin_weight.T).float()
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return torch.nn.functional.cross_entropy(logits, target, reduction=self.reduction)


@pytest.mark.parametrize("make", [llama, gemma3], ids=["llama", "gemma3"])
def test_liger_loss_gets_the_trained_positions_and_equals_full_logits(make, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("liger_kernel.transformers")
    fake.LigerFusedLinearCrossEntropyLoss = _FakeLigerLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    _FakeLigerLoss.calls.clear()
    model = make()
    s = seqs()
    b, n = collate_padded(s, 0), n_trained(s)
    assert_same(loss_and_grads(model, [(b, n)], impl="liger"), loss_and_grads(model, [(b, n)], impl="full"))
    softcap = model.config.final_logit_softcapping if make is gemma3 else None
    assert _FakeLigerLoss.calls == [(torch.float32, torch.float32, softcap, "sum")]
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)  # the matmul in the autocast dtype, as nn.Linear's
    loss_and_grads(model, [(b, n)], impl="liger", autocast=bf16)
    assert _FakeLigerLoss.calls[-1][:2] == (torch.bfloat16, torch.bfloat16)


def test_liger_loss_and_fused_adamw_choices(tiny_model_path, tmp_path):
    from rtune.errors import RtuneError
    from rtune.train.model import check_hardware, make_optimizer

    config = load_config(None, {"loss_impl": "liger"})
    with pytest.raises(RtuneError, match="needs a CUDA GPU"):
        check_hardware(config, torch.device("cpu"))
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(params, config).defaults["fused"] is None  # the CPU keeps the per-parameter loop
    assert make_optimizer(params, config, fused=True).defaults["fused"] is True  # what a GPU run asks for
