"""The training recipe: records -> rendered sequences -> (Q)LoRA or full fine-tuning -> a run folder.

One readable loop on top of `accelerate.Accelerator`, in stages that read top to bottom:

    start          the processes, the validated config, the run folder (new, or one to resume)
    prepare_data   records -> rendered sequences, step counts, the run file's header
    setup_model    base model + adapters + optimiser, wrapped by accelerate; the run folder header
    resume_state   weights, optimiser, RNG and position from the newest checkpoint
    fit            the optimiser steps (`train_step` is one), logs (and --report-to dashboards), checkpoints
    finish         the final weights, the completed run file, an optional merge

`python -m rtune train ...` trains on one device, `accelerate launch -m rtune train ...` trains
data-parallel (DDP) with no code change, or fully sharded with FSDP2 given an accelerate config with
`fsdp_version: 2` (configs/accelerate/fsdp2.yaml). DeepSpeed is refused (rtune.train.distributed).

The loss of an optimiser step is exactly the mean token cross-entropy over every trained token of
the step: each micro-batch contributes the SUM of its token losses divided by the number of
trained tokens of the whole step (all micro-batches, all processes), known in advance from the
batch plan. Averaging per micro-batch (the "mean of means" bug) would weight a short response's
tokens more than a long one's and make the result depend on how the step is split.

Speed without changing what is trained (rtune.train.loss, rtune.train.batching): the output layer
runs only on positions whose next token is trained, in chunks, so the [tokens x vocabulary] logits
never exist at once (loss_impl "chunked", the default; checked once per run against the model's own
loss, which is used instead where they differ: `choose_loss_impl`); `packing` feeds each micro-batch as one
padding-free row; `group_by_length` makes padded batches nearly padding-free instead; gradient
checkpointing and torch.compile are options. All of them leave the optimiser steps and their loss
unchanged up to float rounding (tests/train/test_packing.py).

Resuming is exact: the batch order is a pure function of (seed, epoch), the learning rate a pure
function of the step, and a checkpoint holds the trainable weights, optimiser state and every RNG
state, so a resumed run ends with the same weights as an uninterrupted one.

The run folder's layout is rtune.run_folder's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rtune import run_folder
from rtune.errors import RtuneError
from rtune.io import atomic_dir, remove_tree, sha256_file
from rtune.train import report_to
from rtune.train.batching import (
    collate_packed,
    collate_padded,
    fuse_micro_batches,
    my_micro_batches,
    plan_steps,
    trained_tokens,
)
from rtune.train.checkpoint import (
    begin_checkpoint,
    clean_staging,
    finish_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    staging_dir,
    write_rank_state,
)
from rtune.train.config import TrainConfig, config_differences, config_from_dict, config_to_yaml, load_config
from rtune.train.distributed import check_distributed, gather_state, restore_state
from rtune.train.loss import HEAD_CHECK_TOKENS, LossModel, check_output_head
from rtune.train.model import (
    build_model,
    check_hardware,
    lr_at,
    make_optimizer,
    resolve_precision,
    seed_everything,
    trainable_parameters,
)

log = logging.getLogger("rtune.train")


@dataclass
class Job:
    """What every stage needs: the processes, the validated config and the run folder."""

    accelerator: object
    config: TrainConfig
    run_dir: Path
    world_size: int
    rank: int
    device: torch.device
    main: bool  # the main process writes the run folder
    sharded: bool  # FSDP2

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


@dataclass
class Data:
    """The rendered training set and the step plan derived from it."""

    tokenizer: object
    renderer: object
    seqs: list
    lengths: list[int]
    n_trained: list[int]  # trained tokens per sequence
    pad_id: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class Trainee:
    """The model being trained, as accelerate wrapped it."""

    loss_model: torch.nn.Module  # what DDP/FSDP wraps (see LossModel)
    unwrapped: torch.nn.Module  # the (peft) model itself
    optimizer: object
    params: dict[str, torch.nn.Parameter]  # trainable parameters by name


@dataclass
class Progress:
    step: int = 0  # optimiser steps done
    tokens_seen: int = 0  # trained tokens seen
    last_loss: float | None = None
    seconds: float = 0.0  # time spent in fit() by this process (this attempt)
    logged_step: int = 0  # log.jsonl's last step when this attempt began (past `step` after an interruption)


# ----------------------------------------------------------------------------------------------
# The recipe


def train(
    model_spec: str,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> dict:
    """Train `model_spec` on the records in `data_path` and write a run folder at `out_dir`.

    resume=True continues the run in `out_dir` from its newest checkpoint (from step 0 if it has
    none yet) and ends with the same weights as an uninterrupted run. `callback(row)` is called on
    every process after each optimiser step (and after any checkpoint of that step); an exception
    it raises stops training, which tests use to simulate an interruption.
    Returns the final rtune_run.json contents.
    """
    run_folder.check_base_model_spec(model_spec)
    job, saved = start(out_dir, config, resume)
    data, info = prepare_data(job, model_spec, data_path)
    if saved is not None:
        info = continue_saved_run(job, saved, info)
        if info.get("status") == "complete":
            return info
    trainee = setup_model(job, data, model_spec, info)
    state = resume_state(job, trainee, info, data) if resume else Progress()
    if not resume:
        seed_everything(job.config.seed + job.rank)
    log_start(job, data, model_spec, info, state)
    fit(job, data, trainee, state, progress, callback)
    return finish(job, trainee, info, state)


# ----------------------------------------------------------------------------------------------
# Stages


def start(out_dir: str | os.PathLike, config: TrainConfig, resume: bool) -> tuple[Job, dict | None]:
    """The processes and the config; the run folder checked (and its saved run file read when resuming)."""
    from accelerate import Accelerator

    run_dir = Path(out_dir)
    # bf16 is our own autocast around the forward pass (fp32 master weights, loss in fp32), the
    # same thing accelerate's mixed_precision="bf16" does, but decided by the config alone (not by
    # `accelerate launch` flags) and not frozen in accelerate's process-wide state.
    # Processes started by `accelerate launch --multi_gpu` or an FSDP config on a machine without a
    # GPU run on the CPU (gloo): accelerate's own --cpu flag starts a single process.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(mixed_precision="no", cpu=launched > 1 and not torch.cuda.is_available())
    if launched != accelerator.num_processes:  # otherwise each process would train alone, all into the same folder
        raise RtuneError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}")
    config = load_config(None, config.to_dict())  # re-validate (callers may have edited fields)
    sharded = check_distributed(accelerator, config)
    config.precision = resolve_precision(config.precision, accelerator.device)
    check_hardware(config, accelerator.device)
    if config.fuse_steps and not config.packing:
        raise RtuneError("fuse_steps needs packing: true (padded micro-batches of different widths cannot be one row)")
    report_to.check_installed(config)  # before anything is loaded or written
    if config.peft == "none" and config.merge:
        config.merge = False  # full fine-tuning already writes a standalone model/
    job = Job(accelerator, config, run_dir, accelerator.num_processes, accelerator.process_index,
              accelerator.device, accelerator.is_main_process, sharded)

    saved = None
    if resume:
        if not run_folder.is_run_dir(run_dir):
            has_ckpt = latest_checkpoint(run_dir) is not None
            raise RtuneError(
                f"--resume: {run_dir} has no {run_folder.RUN_INFO}"
                + ("" if has_ckpt else " and no checkpoint")
                + "; there is no run to resume there (start it without --resume, or delete the folder)"
            )
        saved = run_folder.read_run_info(run_dir)
    else:
        run_folder.check_new_run_dir(run_dir)
    job.wait()  # every process checked before the main one writes anything
    return job, saved


def prepare_data(job: Job, model_spec: str, data_path: str | os.PathLike) -> tuple[Data, dict]:
    """Records -> rendered sequences (those with nothing to train dropped), the step plan, the run file."""
    from rtune.data import read_records
    from rtune.models import library_versions, load_tokenizer
    from rtune.render import Renderer

    config = job.config
    tokenizer = load_tokenizer(model_spec)
    renderer = Renderer(tokenizer, template=config.template)
    records = read_records(data_path)
    seqs, stats = renderer.render_dataset(records, config.method, config.max_length)
    counts = stats.as_dict()
    kept = [s for s in seqs if trained_tokens(s.labels) > 0]  # a lone trained token at position 0 predicts nothing
    counts["dropped_nothing_trained"] += len(seqs) - len(kept)
    counts["rendered"] = len(kept)
    seqs = kept
    if counts["dropped_nothing_trained"] and job.main:
        log.warning(
            "dropped %d of %d records: nothing left to train after truncation to max_length %d",
            counts["dropped_nothing_trained"], len(records), config.max_length,
        )
    if not seqs:
        raise RtuneError(f"{data_path}: no record has a trainable token at max_length {config.max_length}")
    n_trained = [trained_tokens(s.labels) for s in seqs]
    counts["trained_tokens"] = sum(n_trained)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    steps_per_epoch = math.ceil(math.ceil(len(seqs) / config.batch_size) / (job.world_size * config.grad_accum))
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    data = Data(tokenizer, renderer, seqs, [len(s.input_ids) for s in seqs], n_trained, pad_id, steps_per_epoch,
                total_steps)

    info = {
        "format": "rtune-run",
        "version": run_folder.RUN_FORMAT_VERSION,
        "status": "running",
        "method": config.method,
        "renderer": renderer.to_dict(),
        "config": config.to_dict(),
        "base_model": run_folder.describe_base_model(model_spec),
        "weights": "model" if config.peft == "none" else "adapter",
        "data": {"path": str(Path(data_path).resolve()), "sha256": sha256_file(data_path), **counts},
        "training": {
            "world_size": job.world_size,
            "device": job.device.type,
            "precision": config.precision,
            "effective_batch": config.effective_batch(job.world_size),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        },
        "versions": library_versions(),
        "start_time": run_folder.now(),
        "end_time": None,
        "final_loss": None,
        "resumes": [],
    }
    return data, info


def continue_saved_run(job: Job, saved: dict, info: dict) -> dict:
    """The run file of a run being resumed: the saved one if it is complete, else `info` with its history.

    Refuses when anything that shapes the trained weights differs from the saved run."""
    check_resumable(job.run_dir, saved, info, job.config)
    if saved.get("status") == "complete":
        if job.main:
            log.info("%s is already complete; nothing to resume", job.run_dir)
        return saved
    info["start_time"] = saved.get("start_time", info["start_time"])
    info["resumes"] = saved.get("resumes", [])
    if saved.get("versions") != info["versions"] and job.main:
        log.warning("library versions differ from the interrupted run's (%s -> %s): the result may differ "
                    "slightly from an uninterrupted run", saved.get("versions"), info["versions"])
    return info


def check_resumable(run_dir: Path, saved: dict, expected: dict, config: TrainConfig) -> None:
    """Refuse to resume when anything that shapes the trained weights differs from the saved run."""
    problems = []
    saved_config = config_from_dict(saved["config"], f"{run_dir / run_folder.RUN_INFO} (config)")
    for name in config_differences(saved_config, config):
        problems.append(f"{name} (saved {getattr(saved_config, name)!r}, now {getattr(config, name)!r})")
    if saved["base_model"]["load"] != expected["base_model"]["load"]:
        problems.append(f"model (saved {saved['base_model']['load']!r}, now {expected['base_model']['load']!r})")
    if saved["data"]["sha256"] != expected["data"]["sha256"]:
        problems.append(f"data (sha256 of {expected['data']['path']} differs from the saved {saved['data']['path']})")
    if saved["renderer"] != expected["renderer"]:
        problems.append("renderer (the template or the tokenizer's special tokens changed)")
    if saved["training"]["world_size"] != expected["training"]["world_size"]:
        problems.append(
            f"number of processes (saved {saved['training']['world_size']}, now {expected['training']['world_size']})"
        )
    if problems:
        raise RtuneError(
            f"cannot resume {run_dir}: these differ from the saved run: " + "; ".join(problems)
            + ". Resume with the same settings, or start a new run with another --out."
        )


def setup_model(job: Job, data: Data, model_spec: str, info: dict) -> Trainee:
    """Base model, adapters and optimiser, wrapped by accelerate; then the run folder's header.

    The run folder is written only now: a model that fails to load leaves nothing behind."""
    config = job.config
    model, info["training"]["attention"] = build_model(model_spec, config, job.device, job.sharded)
    info["training"]["distributed"] = job.accelerator.distributed_type.value.lower() + ("2" if job.sharded else "")
    params = trainable_parameters(model)
    info["training"]["trainable_params"] = sum(p.numel() for p in params.values())
    info["training"]["total_params"] = sum(p.numel() for p in model.parameters())
    # Fused AdamW on a GPU (not under FSDP2, whose sharded parameters it is not verified with).
    optimizer = make_optimizer(list(params.values()), config, fused=job.device.type == "cuda" and not job.sharded)
    loss_model = LossModel(model, config, job.device)
    # Checked before accelerate wraps the model: every process holds all of it here, and a forward
    # through an FSDP2-wrapped model outside the training steps changes its first step's gradients.
    info["training"]["loss_impl"], why = choose_loss_impl(job, data, loss_model)
    if why:
        info["training"]["loss_impl_reason"] = why
    loss_model, optimizer = job.accelerator.prepare(loss_model, optimizer)
    unwrapped = job.accelerator.unwrap_model(loss_model).model
    if job.main:
        clean_staging(job.run_dir)
        run_folder.write_run_header(job.run_dir, info, config_to_yaml(config), data.tokenizer, data.renderer)
    job.wait()
    return Trainee(loss_model, unwrapped, optimizer, trainable_parameters(unwrapped))


def choose_loss_impl(job: Job, data: Data, loss_model: LossModel) -> tuple[str, str | None]:
    """(the loss this run trains with, why it is not config.loss_impl or None).

    The chunked loss only where it equals the model's own (rtune.train.loss.check_output_head),
    else the full one, set on the LossModel; config.loss_impl stays as asked, so that a resumed
    run compares equal and checks again (the same sequence, the same answer)."""
    config = job.config
    if config.loss_impl == "full":
        return "full", None
    first = data.seqs[plan_steps(data.lengths, config, 0, job.world_size)[0][0][0]]
    # Every position trained, so that a long prompt still leaves positions to compare.
    ids = list(first.input_ids[:HEAD_CHECK_TOKENS])
    seq = {"input_ids": ids, "labels": ids}
    batch = collate_packed([seq]) if config.packing else collate_padded([seq], data.pad_id)
    why = check_output_head(loss_model, loss_model.model, {k: v.to(job.device) for k, v in batch.items()})
    if why is None:
        return config.loss_impl, None
    loss_model.impl = "full"
    if job.main:
        log.warning("%s: training with the model's own loss (loss_impl full) instead", why)
    return "full", why


def resume_state(job: Job, trainee: Trainee, info: dict, data: Data) -> Progress:
    """Weights, optimiser state, RNG and position from the newest checkpoint (step 0 without one)."""
    # Dropout masks should differ between processes; process 0 of any run uses the plain seed.
    seed_everything(job.config.seed + job.rank)
    ckpt_path = latest_checkpoint(job.run_dir)
    state = Progress()
    if ckpt_path is None:
        info["resumes"].append({"from_step": 0, "time": run_folder.now()})
        if job.main:
            log.info("resuming %s: no checkpoint was written yet, starting from step 0", job.run_dir)
        return state
    ckpt = load_checkpoint(ckpt_path, job.rank)
    missing = set(trainee.params) - set(ckpt["trainable"])
    unexpected = set(ckpt["trainable"]) - set(trainee.params)
    if missing or unexpected:
        raise RtuneError(f"{ckpt_path}: parameters do not match the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    restore_state(trainee.loss_model, trainee.optimizer, trainee.params, ckpt["trainable"], ckpt["optimizer"],
                  job.sharded)
    restore_rng_state(ckpt["rng"])
    state.step, state.tokens_seen = ckpt["state"]["step"], ckpt["state"]["tokens_seen"]
    info["resumes"].append({"from_step": state.step, "time": run_folder.now()})
    if job.main:
        log.info("resuming %s from %s (step %d of %d)", job.run_dir, ckpt_path.name, state.step, data.total_steps)
    return state


def log_start(job: Job, data: Data, model_spec: str, info: dict, state: Progress) -> None:
    if not job.main:
        return
    state.logged_step = max([r.get("step", 0) for r in report_to.read_log(job.run_dir)] + [state.step])
    run_folder.trim_log(job.run_dir, state.step)
    config, training = job.config, info["training"]
    log.info(
        "training %s (%s, %s) on %d sequences: %d steps of %d sequences, %s, %s, %d/%d parameters trained",
        model_spec, config.method, config.peft, len(data.seqs), data.total_steps,
        config.effective_batch(job.world_size), job.device.type, config.precision,
        training["trainable_params"], training["total_params"],
    )


def fit(job: Job, data: Data, trainee: Trainee, state: Progress, progress: bool,
        callback: Callable[[dict], None] | None) -> None:
    """The optimiser steps from `state` to the end, with logs and checkpoints; updates `state`."""
    from tqdm.auto import tqdm

    config = job.config
    # --report-to: each row written to log.jsonl goes to these dashboards too (opened before the clock starts).
    dashboards = report_to.Dashboards(job.run_dir, config, state.step, state.logged_step) if job.main else None
    bar = tqdm(total=data.total_steps, initial=state.step, disable=not (progress and job.main), unit="step",
               dynamic_ncols=True)
    log_file = open(job.run_dir / run_folder.LOG_FILE, "a", encoding="utf-8") if job.main else None
    start_time = time.time()
    window_tokens, window_start = 0, time.time()
    trainee.loss_model.train()
    ok = False
    try:
        for epoch in range(state.step // data.steps_per_epoch, math.ceil(config.epochs)):
            steps = plan_steps(data.lengths, config, epoch, job.world_size)
            skip = state.step - epoch * data.steps_per_epoch  # steps of this epoch already done (resume)
            for step_in_epoch in range(skip, len(steps)):
                if state.step >= data.total_steps:
                    break
                step_tokens = sum(data.n_trained[i] for b in steps[step_in_epoch] for i in b)  # all processes
                loss, grad_norm, lr = train_step(job, data, trainee, steps[step_in_epoch], step_tokens, state.step)
                state.step += 1
                state.tokens_seen += step_tokens
                state.last_loss = loss
                window_tokens += step_tokens
                row = {
                    "step": state.step,
                    "epoch": round(epoch + (step_in_epoch + 1) / data.steps_per_epoch, 4),
                    "loss": round(loss, 6),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6),
                    "trained_tokens": state.tokens_seen,
                    "tokens_per_s": None,
                    "elapsed_s": round(time.time() - start_time, 2),
                }
                if state.step % config.log_steps == 0 or state.step == data.total_steps:
                    now = time.time()
                    row["tokens_per_s"] = round(window_tokens / max(now - window_start, 1e-9), 1)
                    window_tokens, window_start = 0, now
                    if log_file:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                        dashboards.log(row)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
                if config.save_steps and state.step % config.save_steps == 0 and state.step < data.total_steps:
                    save_checkpoint(job, trainee, state.step, {
                        "epoch": epoch, "step_in_epoch": step_in_epoch + 1, "tokens_seen": state.tokens_seen,
                        "loss": loss, "world_size": job.world_size, "time": run_folder.now()})
                if callback is not None:
                    callback(row)
            if state.step >= data.total_steps:
                break
        ok = True
    finally:
        state.seconds = time.time() - start_time
        bar.close()
        if log_file:
            log_file.close()
        if dashboards:
            dashboards.close(ok)


def train_step(job: Job, data: Data, trainee: Trainee, step: list[list[int]], step_tokens: int,
               step_index: int) -> tuple[float, float, float]:
    """One optimiser step over this process's micro-batches; returns (loss, grad norm, lr).

    The loss is the mean over every trained token of the step, across micro-batches and processes."""
    config, accelerator = job.config, job.accelerator
    # DDP averages gradients over processes; multiplying by world_size undoes that.
    scale = job.world_size / step_tokens
    micro = my_micro_batches(step, job.rank, job.world_size)
    if config.fuse_steps:
        micro = fuse_micro_batches(micro)
    local_sum = 0.0
    for j, (indices, weight) in enumerate(micro):
        batch_seqs = [data.seqs[i] for i in indices]
        batch = collate_packed(batch_seqs) if config.packing else collate_padded(batch_seqs, data.pad_id)
        batch = {k: v.to(job.device) for k, v in batch.items()}
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(trainee.loss_model):
            loss_sum = trainee.loss_model(batch)
            accelerator.backward(loss_sum * (weight * scale))
        local_sum += weight * loss_sum.item()

    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = float(accelerator.clip_grad_norm_(list(trainee.params.values()), max_norm))
    lr = lr_at(step_index, config, data.total_steps)
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    step_loss_sum = accelerator.reduce(torch.tensor(local_sum, dtype=torch.float64, device=job.device),
                                       reduction="sum")
    return float(step_loss_sum) / step_tokens, grad_norm, lr


def save_checkpoint(job: Job, trainee: Trainee, step: int, state: dict) -> None:
    """Main process stages the folder, every process adds its RNG state, main publishes it."""
    weights, optimizer_state = gather_state(trainee.loss_model, trainee.optimizer, trainee.params, job.sharded)
    tmp = begin_checkpoint(job.run_dir, step) if job.main else None
    job.wait()
    write_rank_state(staging_dir(job.run_dir, step), job.rank)
    job.wait()
    if job.main:
        finish_checkpoint(job.run_dir, tmp, step=step, trainable=dict(weights), optimizer_state=optimizer_state,
                          state=state, keep=job.config.save_total_limit)
    job.wait()


def finish(job: Job, trainee: Trainee, info: dict, state: Progress) -> dict:
    """The final weights and the completed run file (written last); then the merge, if asked."""
    job.wait()
    final_weights = None
    if job.sharded:  # gather the whole weights (a collective), to save them from the main process
        if job.config.peft == "none":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(trainee.loss_model,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            final_weights = {k.removeprefix("model."): v for k, v in full.items()}
        else:
            final_weights, _ = gather_state(trainee.loss_model, trainee.optimizer, trainee.params, job.sharded,
                                            with_optimizer=False)
    if job.main:
        target = run_folder.weights_dir(job.run_dir, info)
        if target.exists():  # written by an earlier attempt that died before the run file
            remove_tree(target)
        with atomic_dir(target) as tmp:
            # LoRA: peft writes adapter_config.json + adapter_model.safetensors; full: a model folder.
            # Under FSDP the parameters are shards: save the gathered weights instead.
            trainee.unwrapped.save_pretrained(tmp, **({"state_dict": final_weights} if job.sharded else {}))
        info.update(
            status="complete",
            end_time=run_folder.now(),
            final_loss=state.last_loss,
            steps_done=state.step,
            trained_tokens_seen=state.tokens_seen,
            train_seconds=round(state.seconds, 1),
        )
        run_folder.write_run_info(job.run_dir, info)  # the completion marker, written last
        log.info("done: %s (final loss %.4f)", job.run_dir,
                 state.last_loss if state.last_loss is not None else float("nan"))
    job.wait()
    if job.config.merge and job.main:
        # Free the training copy first: the merge loads the base again (on CPU, one copy at a time).
        trainee.loss_model = trainee.unwrapped = trainee.optimizer = trainee.params = None
        job.accelerator.free_memory()
        gc.collect()
        from rtune.infer.merge import merge_run

        merge_run(job.run_dir, job.run_dir / run_folder.MERGED_DIR)
        info["merged"] = run_folder.MERGED_DIR
        run_folder.write_run_info(job.run_dir, info)
    job.wait()
    return info
