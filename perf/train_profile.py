"""A per-step profile of `rtune train`: operators per step, host and device time, the top operators.

    python perf/train_profile.py --model gemma-3-270m --data train.jsonl --config cpu --steps 3
    python perf/train_profile.py --model gemma-3-270m --data train.jsonl --config cpu --set batch_size=8 \\
        --set grad_accum=1 --trace trace.json          # also a Chrome/Perfetto trace of the profiled steps

It trains with rtune's own loop (rtune.train.recipe.train, into a temporary run folder) and runs
torch.profiler over `--steps` optimiser steps after `--warmup` unprofiled ones:

    ops/step        aten operators dispatched per optimiser step (nested ones included: a linear
                    layer counts as linear, matmul, mm, ...); each costs host time whatever its size
    host ms/step    wall time per profiled step, and the CPU time spent in operators (self time)
    device ms/step  time the GPU spent in kernels per step (CUDA only), and kernels launched per step:
                    far below the host time means the GPU waits for the host (launch-bound)
    top operators   by self time (CPU) or device time (CUDA)

perf/train_throughput.py --profile prints the same for rtune and TRL side by side (StepProfiler).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict


class StepProfiler:
    """Call `step(n)` after each optimiser step n (1-based): profiles steps start+1 .. start+count."""

    def __init__(self, start: int, count: int, trace: str | None = None):
        import torch

        self.start, self.count, self.trace = start, count, trace
        activities = [torch.profiler.ProfilerActivity.CPU]
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.wall = None
        self.done = False

    def step(self, n: int) -> None:
        import torch

        if n == self.start:
            if self.cuda:
                torch.cuda.synchronize()
            self.profiler.start()
            self.wall = time.perf_counter()
        elif n == self.start + self.count and not self.done:
            if self.cuda:
                torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.wall
            self.profiler.stop()
            self.done = True
            if self.trace:
                self.profiler.export_chrome_trace(self.trace)

    def summary(self, top: int = 12) -> dict:
        """{"ops_per_step", "host_ms_per_step", "cpu_op_ms_per_step", "device_ms_per_step",
        "kernels_per_step", "top": [(name, calls per step, ms per step)]}."""
        if not self.done:
            raise RuntimeError("the profiled steps did not all run")
        events = self.profiler.key_averages()
        n = self.count
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        cpu_self = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e3
        device = kernels = 0.0
        if self.cuda:
            for e in self.profiler.events():
                if e.device_type.name == "CUDA":
                    device += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                    kernels += 1
        per_op = defaultdict(lambda: [0, 0.0])
        for e in events:
            if not e.key.startswith("aten::"):
                continue
            t = (getattr(e, "self_device_time_total", 0) if self.cuda else e.self_cpu_time_total) / 1e3
            per_op[e.key][0] += e.count
            per_op[e.key][1] += t
        ranked = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]
        return {"ops_per_step": ops / n, "host_ms_per_step": self.wall * 1e3 / n, "cpu_op_ms_per_step": cpu_self / n,
                "device_ms_per_step": device / 1e3 / n if self.cuda else None,
                "kernels_per_step": kernels / n if self.cuda else None,
                "top": [(name, calls / n, ms / n) for name, (calls, ms) in ranked]}


def print_summary(name: str, s: dict) -> None:
    device = (f", device {s['device_ms_per_step']:.1f} ms/step in {s['kernels_per_step']:.0f} kernels"
              if s["device_ms_per_step"] is not None else "")
    print(f"{name}: {s['ops_per_step']:.0f} ops/step, host {s['host_ms_per_step']:.1f} ms/step "
          f"({s['cpu_op_ms_per_step']:.1f} ms in operators' self time){device}")
    for op, calls, ms in s["top"]:
        print(f"    {op:<48} {calls:8.1f} calls/step {ms:9.2f} ms/step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="cpu", help="preset or YAML file, as rtune train --config")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config overrides")
    p.add_argument("--warmup", type=int, default=1, help="optimiser steps before profiling")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps profiled")
    p.add_argument("--trace", help="write a Chrome trace (chrome://tracing, ui.perfetto.dev) of the profiled steps")
    a = p.parse_args()

    from rtune.train.config import load_config
    from rtune.train.recipe import train

    overrides = dict(kv.split("=", 1) for kv in a.set)
    overrides.update(max_steps=a.warmup + a.steps, save_steps=0)
    config = load_config(a.config, overrides)
    profiler = StepProfiler(a.warmup, a.steps, a.trace)
    with tempfile.TemporaryDirectory(prefix="rtune-profile-") as tmp:
        train(a.model, a.data, f"{tmp}/run", config, progress=False, callback=lambda row: profiler.step(row["step"]))
    print_summary(f"rtune train ({a.config}, {', '.join(a.set) or 'as configured'})", profiler.summary())


if __name__ == "__main__":
    main()
