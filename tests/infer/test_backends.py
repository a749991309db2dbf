"""rtune.infer.backends: the HF backend is rtune generate's generation; the vLLM backend's settings
(read as code: vLLM cannot run here) and the cut of an engine's ids match the HF path's."""

import pytest
import tiny
import torch

from rtune.errors import RtuneError
from rtune.infer.backends import finish_ids, reply_stops
from rtune.infer.backends.hf import HFBackend
from rtune.infer.backends.vllm import VLLM_LORA_RANKS, max_lora_rank
from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.infer.load import load_for_inference, load_renderer


def test_hf_backend_generates_what_generate_ids_does(tiny_model_path):
    model, tokenizer, renderer = load_for_inference(str(tiny_model_path), dtype=torch.float32)
    prompts = [renderer.render_prompt(p) for p in ("Say hi.", "Name three colours, please.", "Eat well")]
    config = GenerationConfig(max_new_tokens=6, batch_size=2)
    backend = HFBackend(str(tiny_model_path), renderer, dtype=torch.float32, device="cpu")
    got = {}
    backend.generate([{"a": prompts[0], "b": prompts[1]}, {"c": prompts[2]}], config, got.update)
    expected = generate_ids(model, tokenizer, renderer, prompts, config)
    assert [got[k].token_ids for k in "abc"] == [g.token_ids for g in expected]
    assert backend.environment()["device_type"] == "cpu" and "torch" in backend.environment()["versions"]


def test_max_lora_rank_is_the_smallest_vllm_accepts():
    assert [max_lora_rank(r) for r in (1, 4, 8, 16, 17, 64, 100, 300, 512)] == [1, 8, 8, 16, 32, 64, 128, 320, 512]
    assert all(max_lora_rank(r) in VLLM_LORA_RANKS for r in range(1, 513))
    with pytest.raises(RtuneError, match="rtune merge"):
        max_lora_rank(513)


def test_an_engines_ids_are_cut_as_hf_cuts_them(tmp_path):
    tokenizer = tiny.byte_bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    renderer = load_renderer(str(tiny.tiny_model_dir(tmp_path / "m", tokenizer=tokenizer)))
    config = GenerationConfig(stop=["<|turn|>", "lazy"])
    stops = reply_stops(renderer.tokenizer, renderer, config)
    turn = renderer.tokenizer.convert_tokens_to_ids("<|turn|>")
    # A stop string that is a special token goes to the engine as a stop id (decoding skips it).
    assert turn in stops.all_ids and "<|turn|>" not in stops.strings and "lazy" in stops.strings
    words = renderer.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    eos = renderer.tokenizer.eos_token_id
    gen = finish_ids(renderer.tokenizer, words + [eos], stops, ended=True)
    assert (gen.text, gen.finish_reason, gen.num_tokens) == ("The quick brown fox", "eos", len(words))
    gen = finish_ids(renderer.tokenizer, words + [turn], stops, ended=True)
    assert (gen.finish_reason, gen.token_ids) == ("stop", words)
    lazy = renderer.tokenizer(" jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    gen = finish_ids(renderer.tokenizer, words + lazy, stops, ended=True, stop_reason="lazy")
    assert gen.text == "The quick brown fox jumps over the" and gen.finish_reason == "stop"
    # An engine that drops the end id: its stop_reason says why it ended (vLLM: None is EOS).
    assert finish_ids(renderer.tokenizer, words, stops, ended=True, stop_reason=None).finish_reason == "eos"
    assert finish_ids(renderer.tokenizer, words, stops, ended=False).finish_reason == "length"
