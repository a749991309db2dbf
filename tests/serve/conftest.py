"""Models and helpers for the serve tests: tiny models of three architectures, one that never ends its
reply, one with Gemma's real 262k-token tokenizer, and an Engine whose steps a test can hold."""

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import tiny
from rtune.serve.engine import Engine

TIMEOUT = 60


class GatedEngine(Engine):
    """An Engine whose forward steps can be held (gate cleared), made to fail, and counted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0
        self.held = False  # a step waits at the closed gate now
        self.fail: Exception | None = None

    def forward(self, *args, **kwargs):
        self.entered += 1
        self.held = not self.gate.is_set()
        opened = self.gate.wait(TIMEOUT)
        self.held = False
        if not opened:
            raise TimeoutError("the test gate never opened")
        if self.fail is not None:
            raise self.fail
        return super().forward(*args, **kwargs)


def _die_with_parent():
    """In the child: SIGTERM when the test process dies, so a killed test run leaves no server behind."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def popen_server(args: list[str], **kwargs) -> subprocess.Popen:
    """`python -m rtune ARGS` as a child that goes when the test process goes (on Linux)."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen([sys.executable, "-m", "rtune", *args], preexec_fn=preexec, **kwargs)


@pytest.fixture(scope="session")
def gated_engine_class():
    return GatedEngine


def endless_model_dir(path: Path, tokenizer=None, context: int = 8192, seed: int = 0) -> Path:
    """tiny.tiny_model_dir whose replies never end: the output rows of the special tokens (EOS among
    them) are zero, so their logit is 0 while some other token's is almost surely above it."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny.byte_bpe_tokenizer()
    tiny.tiny_model_dir(path, seed=seed, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.max_position_embeddings = context
    with torch.no_grad():
        model.lm_head.weight[sorted(set(tokenizer.all_special_ids))] = 0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def endless_model_path(tmp_path_factory):
    return endless_model_dir(tmp_path_factory.mktemp("endless-model"))


@pytest.fixture(scope="session")
def gemma_vocab_model(gemma_tokenizer):
    """A 2-layer Llama (hidden size 32, tied embeddings) over Gemma 3's real tokenizer and its 262k
    vocabulary: where a vocabulary scan per stop set is slow."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(gemma_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=gemma_tokenizer.bos_token_id, eos_token_id=gemma_tokenizer.eos_token_id,
                         pad_token_id=gemma_tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def gemma3_model(tokenizer, sliding_window: int = 6):
    """A 4-layer Gemma 3 text model (three sliding-window layers of `sliding_window` tokens, one full)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=sliding_window, max_position_embeddings=512,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()
