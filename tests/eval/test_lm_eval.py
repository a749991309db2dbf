"""rtune's lm-evaluation-harness path (rtune.eval.lm_eval) on tiny models, offline.

The proof that rtune drives lm-eval rather than re-implementing it: on a merged LoRA model, rtune's
path and lm-eval's own CLI give the same accuracies, the same per-choice log-likelihoods and the same
chat-templated prompts (which are rtune's own prompts)."""

import json
import math
import os
import subprocess
import sys

import pytest
from tiny import tiny_config, write_records

import lm_eval  # noqa: F401  (the dev extra installs it: a missing lm_eval must fail here, not skip)

from rtune.errors import RtuneError
from rtune.eval import lm_eval as rl
from rtune.eval.generation import EvalDecoding
from rtune.eval.results import read_items, read_summaries
from rtune.eval.run import EvalConfig, run_eval
from rtune.infer.merge import merge_run
from rtune.train.recipe import train

TASKS = ["rtune_demo_mc", "rtune_demo_gen"]


@pytest.fixture(scope="module")
def lora_run(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval-runs") / "rt"
    data = write_records(out.parent / "easy.jsonl", responses=["The quick brown fox jumps over the lazy dog.",
                                                               "Eat well, sleep, and exercise."])
    train(str(tiny_model_path), str(data), str(out), tiny_config(epochs=2, method="rt"), progress=False)
    return out


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    return merge_run(lora_run, tmp_path_factory.mktemp("lm-eval-merged") / "rt-merged", dtype="fp32")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return rl.export_builtin_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="module")
def task_manager(tasks_dir):
    return rl.make_task_manager(tasks_dir, tasks=TASKS)


@pytest.fixture(scope="module")
def ours_merged(merged):
    # The public entry point as a user calls it: no task manager given, rtune's examples exported on the fly.
    return rl.run_lm_eval(merged, TASKS, batch_size=4, dtype="fp32", device="cpu", progress=False)


def _logliks(out: dict, task: str = "rtune_demo_mc") -> dict:
    return {r["doc_id"]: [x[0] for x in r["filtered_resps"]] for r in out["samples"][task]}


def test_rtune_path_equals_lm_eval_cli(merged, tasks_dir, ours_merged, tmp_path):
    out_dir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", json.dumps({"pretrained": str(merged), "dtype": "float32"}),
           "--tasks", ",".join(TASKS), "--include_path", str(tasks_dir), "--apply_chat_template",
           "--fewshot_as_multiturn", "--batch_size", "4", "--device", "cpu",
           "--gen_kwargs", json.dumps(rl.GREEDY), "--output_path", str(out_dir), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = list(out_dir.rglob("results_*.json"))
    cli = json.loads(results_file.read_text())

    for task in TASKS:
        ours = ours_merged["tasks"][task]
        assert ours["n"] == cli["n-samples"][task]["effective"] == {"rtune_demo_mc": 32, "rtune_demo_gen": 16}[task]
        theirs = {k: v for k, v in cli["results"][task].items() if "," in k}  # metric,filter (not alias, sample_len)
        assert theirs, task
        for key, value in theirs.items():
            metric, flt = key.split(",")
            if metric.endswith("_stderr"):
                assert ours["metrics"][metric[:-7] if flt == "none" else f"{metric[:-7]},{flt}"]["stderr"] == \
                    pytest.approx(value, abs=1e-12)
            else:
                found = ours["metrics"][metric if flt == "none" else key]["value"]
                assert found == pytest.approx(value, abs=1e-12), key
    print("\nrtune vs lm-eval CLI:", {t: {k: m["value"] for k, m in ours_merged["tasks"][t]["metrics"].items()}
                                     for t in TASKS}, {t: cli["results"][t] for t in TASKS})

    # Same prompts (the chat template applied, few-shot examples as earlier turns) and the same log-likelihoods.
    samples = {}
    for task in TASKS:
        [f] = list(out_dir.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = {s["doc_id"]: s for s in map(json.loads, f.read_text().splitlines())}
    ours_rows = {r["doc_id"]: r for r in ours_merged["samples"]["rtune_demo_mc"]}
    for doc_id, s in samples["rtune_demo_mc"].items():
        args = s["arguments"]
        theirs_prompt = args["gen_args_0"]["arg_0"] if isinstance(args, dict) else args[0][0]
        assert ours_rows[doc_id]["prompt"] == theirs_prompt
        assert [x[0] for x in ours_rows[doc_id]["filtered_resps"]] == pytest.approx(
            [float(x[0]) for x in s["filtered_resps"]], abs=1e-5)
    gen = {r["doc_id"]: r for r in ours_merged["samples"]["rtune_demo_gen"]}
    for doc_id, s in samples["rtune_demo_gen"].items():
        assert gen[doc_id]["filtered_resps"] == s["filtered_resps"]


def test_prompts_are_rtunes_own(merged, ours_merged):
    """lm-eval renders each document with the run's template: rtune's prompt, byte for byte."""
    from rtune.infer.load import load_renderer

    renderer = load_renderer(str(merged))
    tok = renderer.tokenizer
    row = next(r for r in ours_merged["samples"]["rtune_demo_mc"] if r["doc_id"] == 0)
    expected = tok.decode(renderer.render_prompt("Question: What color is the sky on a clear day?\nAnswer:"))
    assert row["prompt"] == expected and "<|assistant|>" in expected
    # Few-shot as multi-turn: three earlier user/assistant turns before the question.
    gen = next(r for r in ours_merged["samples"]["rtune_demo_gen"] if r["doc_id"] == 0)
    assert gen["prompt"].count("<|user|>") == 4 and gen["prompt"].count("<|assistant|>") == 4
    assert gen["prompt"].endswith("What is 2 + 3?\n<|assistant|>\n")
    assert ours_merged["settings"]["chat_template"] == renderer.chat_template()
    assert ours_merged["settings"]["fewshot_as_multiturn"] is True
    assert ours_merged["lm_eval_version"] == rl.LM_EVAL_VERSION


def test_run_folder_includes_its_adapter(lora_run, tiny_model_path, ours_merged, task_manager):
    run = rl.run_lm_eval(lora_run, ["rtune_demo_mc"], batch_size=4, dtype="fp32", device="cpu",
                         task_manager=task_manager, progress=False)
    base = rl.run_lm_eval(tiny_model_path, ["rtune_demo_mc"], batch_size=4, dtype="fp32", device="cpu",
                          task_manager=task_manager, progress=False)
    merged_ll, run_ll, base_ll = _logliks(ours_merged), _logliks(run), _logliks(base)
    # The run folder (adapter merged in memory) scores like the merged folder, not like its base.
    assert all(run_ll[d] == pytest.approx(merged_ll[d], abs=1e-4) for d in merged_ll)
    assert max(abs(a - b) for d in base_ll for a, b in zip(base_ll[d], run_ll[d])) > 1e-2
    assert run["tasks"]["rtune_demo_mc"]["metrics"]["acc"]["value"] == \
        ours_merged["tasks"]["rtune_demo_mc"]["metrics"]["acc"]["value"]
    assert run["settings"]["template"] == "tulu"


def test_rtune_eval_writes_the_results_layout(tiny_model_path, lora_run, tmp_path, monkeypatch):
    from rtune.cli import main
    from rtune.report import build_report

    out = tmp_path / "eval"
    # The default lm-eval dtype is the checkpoint's (fp32 here), as lm_eval's own CLI loads it, whatever
    # rtune's generation dtype ("auto" is bf16 on a bf16-capable CPU).
    config = EvalConfig(benches=[], lm_eval_tasks=["rtune_demo_mc"], decoding=EvalDecoding(batch_size=4, dtype="auto"),
                        progress=False)
    summaries = run_eval([str(tiny_model_path), str(lora_run)], config, out, labels=["base", "rt"])
    assert len(summaries) == 2
    found = {(s["model"]["label"], s["benchmark"]["name"]): s for s in read_summaries(out)}
    assert set(found) == {("base", "lm-eval"), ("rt", "lm-eval")}
    assert (out / "results" / "rt" / "lm-eval" / "summary.json").is_file()
    for (label, _), s in found.items():
        metrics = s["metrics"]
        assert set(metrics) == {"rtune_demo_mc/acc", "rtune_demo_mc/acc_norm", "average"}
        raw = s["lm_eval"]["results"]["rtune_demo_mc"]
        for name in ("acc", "acc_norm"):
            m, se = metrics[f"rtune_demo_mc/{name}"], raw[f"{name}_stderr,none"]
            assert m["value"] == raw[f"{name},none"] and m["n"] == 32 and m["kind"] == "rate"
            assert m["label"] == f"rtune_demo_mc {name} (fp32)" and m["higher_is_better"] is True
            assert se > 0 and m["ci"] == pytest.approx([max(0.0, m["value"] - 1.96 * se),
                                                        min(1.0, m["value"] + 1.96 * se)], abs=1e-3)
        # One task: the average is its primary metric (acc_norm), with the same interval.
        assert metrics["average"]["value"] == metrics["rtune_demo_mc/acc_norm"]["value"]
        assert metrics["average"]["ci"] == pytest.approx(metrics["rtune_demo_mc/acc_norm"]["ci"])
        assert s["lm_eval"]["version"] == rl.LM_EVAL_VERSION and s["lm_eval"]["apply_chat_template"] is True
        rows = read_items(out / "results" / label / "lm-eval")
        assert len(rows) == 32 and all(r["task"] == "rtune_demo_mc" and "acc" in r["values"] for r in rows)
    eval_info = json.loads((out / "eval.json").read_text())
    assert eval_info["lm_eval"]["tasks"] == ["rtune_demo_mc"]
    assert (out / "lm_eval_tasks" / "rtune_demo_mc.yaml").is_file()  # lm_eval --include_path EVAL_DIR/lm_eval_tasks

    # Again, through the CLI: the results are there with the same settings, so no model is loaded.
    def no_load(*a, **k):
        raise AssertionError("a finished lm-eval result was recomputed")

    monkeypatch.setattr(rl, "load_for_lm_eval", no_load)
    main(["eval", str(tiny_model_path), str(lora_run), "--names", "base,rt", "--lm-eval-tasks", "rtune_demo_mc",
          "--out", str(out), "--dtype", "fp32", "--batch-size", "4"])
    report = build_report([out], tmp_path / "report").read_text()
    assert "Benchmark: lm-eval" in report and "rtune_demo_mc acc_norm" in report and "average over tasks" in report
    line = next(x for x in report.splitlines() if x.startswith("| rtune_demo_mc acc (fp32) ↑"))
    assert line.count("%") >= 6  # base and rt side by side, each value with its interval


def test_hub_tasks_offline_fail_before_loading(tiny_model_path, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(rl, "load_for_lm_eval", lambda *a, **k: pytest.fail("a model was loaded"))
    config = EvalConfig(benches=["core:5"], decoding=EvalDecoding(dtype="fp32"), progress=False)
    with pytest.raises(RtuneError) as e:
        run_eval([str(tiny_model_path)], config, tmp_path / "eval")
    msg = str(e.value)
    # Every core task is named with its hub dataset, and the way out is local tasks.
    for dataset in ("cais/mmlu", "allenai/openbookqa", "Rowan/hellaswag", "allenai/ai2_arc (ARC-Challenge)",
                    "baber/piqa", "openai/gsm8k"):
        assert dataset in msg
    assert "Hugging Face hub" in msg and "switched off" in msg
    assert "--lm-eval-include" in msg and "rtune_demo_mc" in msg and "dataset_path: json" in msg
    assert not (tmp_path / "eval" / "results").exists()


def test_unknown_task_and_plan(task_manager):
    plan = rl.LmEvalPlan.from_config(EvalConfig(benches=["advbench", "core:10"], lm_eval_tasks=["rtune_demo_mc"]))
    assert plan.benches == ["advbench"] and plan.limit == 10
    assert plan.tasks == [*rl.CORE_TASKS, "rtune_demo_mc"]
    assert not rl.LmEvalPlan.from_config(EvalConfig(benches=["advbench"]))
    with pytest.raises(RtuneError, match="unknown lm-eval task.*rtune_demo_mcq.*did you mean rtune_demo_mc"):
        rl.check_tasks(task_manager, ["rtune_demo_mcq"])


def test_interval_and_average():
    out = {"settings": {"dtype": "fp32"}, "tasks": {
        "a": {"metrics": {"acc": {"value": 0.5, "stderr": 0.1, "metric": "acc", "filter": "none",
                                  "higher_is_better": True}}, "n": 10, "primary": "acc"},
        "b": {"metrics": {"exact_match,strict-match": {"value": 0.98, "stderr": 0.02, "metric": "exact_match",
                                                       "filter": "strict-match", "higher_is_better": True}},
              "n": 30, "primary": "exact_match,strict-match"}}}
    m = rl.to_metrics(out)
    assert m["a/acc"]["ci"] == pytest.approx([0.5 - 0.196, 0.5 + 0.196], abs=1e-3)
    assert m["b/exact_match,strict-match"]["ci"][1] == 1.0  # clipped: a rate
    assert m["b/exact_match,strict-match"]["label"] == "b exact_match,strict-match (fp32)"  # the dtype beside it
    avg = m["average"]
    assert avg["value"] == pytest.approx(0.74) and avg["n"] == 40
    se = math.sqrt(0.1 ** 2 + 0.02 ** 2) / 2
    assert avg["ci"] == pytest.approx([0.74 - 1.96 * se, 0.74 + 1.96 * se], abs=1e-3)


def test_the_default_lm_eval_dtype_is_the_checkpoints(tmp_path, tiny_model_path, lora_run):
    import torch
    from transformers import AutoModelForCausalLM

    assert rl.checkpoint_dtype(str(tiny_model_path)) == "fp32"
    assert rl.checkpoint_dtype(str(lora_run)) == "fp32"  # a LoRA run: its base's
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert rl.checkpoint_dtype(str(tmp_path / "bf16")) == "bf16"
