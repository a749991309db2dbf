"""Choosing each row's next token with its own settings, as HF generate would for that request alone.

The logits processors are HF's own, in the order `generate` applies them (repetition penalty; then,
when sampling, temperature, top-k, top-p), on one row at a time. A sampled row draws from its own
torch.Generator seeded with the request's seed (or a random one), so a seeded sample gives the
same tokens whatever else shares the batch, and the same tokens as `rtune generate` with that seed
(which seeds the global generator once per call and draws the same way).
"""

from __future__ import annotations

import secrets

import torch

from rtune.serve.engine import Settings


class RowSampler:
    def __init__(self, settings: Settings, device):
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.greedy = settings.greedy
        processors = []
        if settings.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        self.generator = None
        if not self.greedy:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                processors.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
            seed = settings.seed if settings.seed is not None else secrets.randbelow(2**63)
            self.generator = torch.Generator(device=device).manual_seed(seed % 2**63)
        self.processors = LogitsProcessorList(processors)

    @property
    def plain(self) -> bool:
        """Greedy without processors: the batch's argmax is this row's token."""
        return self.greedy and not self.processors

    def choose(self, logits: torch.Tensor, context: list[int]) -> int:
        """logits: this row's fp32 [1, vocab]; context: the prompt and the reply so far."""
        scores = logits
        if self.processors:
            ids = torch.tensor([context], device=logits.device)
            scores = self.processors(ids, logits.clone())
        if self.greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))
