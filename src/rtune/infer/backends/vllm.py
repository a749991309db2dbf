"""vLLM as a library (a CUDA machine, `pip install -e ".[vllm]"`): prompts as token ids, greedy by default.

A plain or merged folder is served as it is; a LoRA run as its base plus a LoRA request, with
max_lora_rank the smallest rank vLLM accepts that holds the run's (vLLM takes only a fixed set); a
QLoRA run's base is quantised to 4 bits by vLLM's bitsandbytes quantization, as it was trained.
Replies end at the template's stop ids, its stop strings (special-token ones as stop ids) and the
user's, and vLLM's token ids are cut exactly as the HF path cuts its own (rtune.infer.backends).

Not run in this project's CI (no GPU; the wheel is too large to carry): see docs/evaluation.md.
"""

from __future__ import annotations

from rtune import run_folder
from rtune.errors import RtuneError
from rtune.fingerprint import output_environment
from rtune.infer.backends import finish_ids, refuse_rules, reply_stops
from rtune.infer.generate import GenerationConfig

# vLLM's LoRAConfig.max_lora_rank is a Literal of these (vllm/config/lora.py, MaxLoRARanks, 0.26-0.34);
# read from vLLM itself when it says.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_ranks() -> tuple[int, ...]:
    try:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks

        return tuple(sorted(get_args(MaxLoRARanks))) or VLLM_LORA_RANKS
    except Exception:  # noqa: BLE001 (older or newer layouts: the known set)
        return VLLM_LORA_RANKS


def max_lora_rank(rank: int, allowed: tuple[int, ...] = VLLM_LORA_RANKS) -> int:
    """The smallest rank vLLM accepts that holds `rank` (LoRA weights are padded up to it)."""
    fits = [r for r in sorted(allowed) if r >= rank]
    if not fits:
        raise RtuneError(f"--backend vllm: the run's LoRA rank {rank} is above the largest vLLM supports "
                         f"({max(allowed)}); merge it (rtune merge) and evaluate the merged folder")
    return fits[0]


def model_path(spec: str) -> str:
    from rtune.models import resolve_model

    ref = resolve_model(spec)
    if ref.gguf_file:
        raise RtuneError(f"--backend vllm: {spec} is a .gguf file; convert it to a model folder first")
    return ref.path


class VLLMBackend:
    name = "vllm"
    keyed_by_batch = False  # vLLM schedules prompts itself: outputs are keyed by prompt alone

    def __init__(self, spec: str, renderer, label: str, *, dtype: str = "bfloat16", device_type: str = "cuda"):
        self.spec, self.renderer, self.label = str(spec), renderer, label
        self.dtype, self.device_type = dtype, device_type
        self.quantization = None
        if run_folder.is_run_dir(self.spec):
            self.quantization = run_folder.base_quantization(run_folder.read_run_info(self.spec), "evaluating")
        self.llm = self.lora_request = None

    def environment(self) -> dict:
        return output_environment(self.device_type, self.quantization, "vllm")

    def load(self) -> None:
        if self.llm is not None:
            return
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise RtuneError('--backend vllm needs vLLM on a CUDA machine: pip install -e ".[vllm]" '
                             "(see docs/evaluation.md), or serve the model with `vllm serve` and evaluate with "
                             "--gen-url") from None
        settings = {"dtype": self.dtype}
        if self.quantization == "nf4":  # the adapter was trained against a 4-bit base: serve it on one
            settings.update(quantization="bitsandbytes", load_format="bitsandbytes")
        if run_folder.is_run_dir(self.spec):
            info = run_folder.read_run_info(self.spec)
            weights = str(run_folder.weights_dir(self.spec, info))
            if info["weights"] == "adapter":
                rank = max_lora_rank(int(info["config"]["lora_r"]), vllm_lora_ranks())
                self.llm = LLM(model=model_path(info["base_model"]["load"]), enable_lora=True, max_lora_rank=rank,
                               **settings)
                self.lora_request = LoRARequest(self.label, 1, weights)
            else:
                self.llm = LLM(model=weights, **settings)
        else:
            self.llm = LLM(model=model_path(self.spec), **settings)

    def generate(self, batches: list[dict[str, list[int]]], config: GenerationConfig, done,
                 progress: bool = False) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        refuse_rules(config, "vLLM")
        self.load()
        tokenizer = self.renderer.tokenizer
        stops = reply_stops(tokenizer, self.renderer, config)
        params = SamplingParams(
            max_tokens=config.max_new_tokens, temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p if config.do_sample else 1.0, top_k=config.top_k if config.do_sample else 0,
            repetition_penalty=config.repetition_penalty, seed=config.seed, stop=stops.strings or None,
            # The end ids and the stop strings that are special tokens (decoding skips those, so vLLM
            # could never find them in the text).
            stop_token_ids=stops.all_ids, include_stop_str_in_output=False, skip_special_tokens=True,
        )
        prompts = {k: ids for batch in batches for k, ids in batch.items()}
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts.values()], params,
                                    lora_request=self.lora_request, use_tqdm=progress)
        gens = {}
        for key, out in zip(prompts, outputs):
            o = out.outputs[0]
            gens[key] = finish_ids(tokenizer, o.token_ids, stops, o.finish_reason == "stop", o.stop_reason)
        done(gens)

    def close(self) -> None:
        self.llm = self.lora_request = None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
