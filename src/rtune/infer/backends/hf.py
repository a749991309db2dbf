"""transformers on this machine: rtune's own batched generation (rtune.infer.generate.generate_ids).

Each batch it is given is generated whole, with all its rows (left-padded, longest first), so the
caller decides which prompts share a batch (rtune eval: a pure function of one benchmark's prompts).
"""

from __future__ import annotations

from rtune import run_folder
from rtune.fingerprint import output_environment
from rtune.infer.generate import GenerationConfig, generate_ids


class HFBackend:
    name = "hf"
    keyed_by_batch = True

    def __init__(self, spec: str, renderer, *, template: str | None = None, icl_file=None, dtype=None,
                 device=None, merge_lora: bool = False, quantization: str | None = None):
        """dtype/device: torch's (None: rtune.infer.load's defaults); merge_lora: a LoRA run on an
        unquantised base is merged after loading (about twice as fast to decode)."""
        self.spec, self.renderer = str(spec), renderer
        self.template, self.icl_file = template, icl_file
        self.dtype, self.device = dtype, device
        self.merge_lora = merge_lora
        self.quantization = quantization  # "nf4" when a QLoRA base loads in 4 bits (part of the environment)
        self.model = self.tokenizer = None

    def environment(self) -> dict:
        device_type = self.device if isinstance(self.device, str) else getattr(self.device, "type", None)
        if device_type is None:
            import torch

            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return output_environment(device_type, self.quantization, "hf")

    def load(self) -> None:
        if self.model is not None:
            return
        from rtune.infer.load import load_for_inference

        self.model, self.tokenizer, _ = load_for_inference(self.spec, self.template, dtype=self.dtype,
                                                           device=self.device, icl_file=self.icl_file)
        if self.merge_lora and hasattr(self.model, "merge_and_unload") and run_folder.base_quantization(
                run_folder.read_run_info(self.spec), "evaluating") is None:
            # One matmul per layer instead of three; a QLoRA base stays as it is.
            self.model = self.model.merge_and_unload()

    def generate(self, batches: list[dict[str, list[int]]], config: GenerationConfig, done,
                 progress: bool = False) -> None:
        self.load()
        for batch in batches:
            gens = generate_ids(self.model, self.tokenizer, self.renderer, list(batch.values()), config,
                                progress=progress)
            done(dict(zip(batch, gens)))

    def close(self) -> None:
        self.model = self.tokenizer = None
