"""`rtune eval` end to end on tiny models: results layout, cache reuse, resume after kill -9, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tiny
from tiny import tiny_config, write_records

from rtune.cli import main
from rtune.errors import RtuneError
from rtune.eval.generation import EvalDecoding
from rtune.eval.results import read_items, read_summaries
from rtune.eval.run import EvalConfig, run_eval
from rtune.train.recipe import train


@pytest.fixture(scope="module")
def lora_run(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-runs") / "rt"
    data = write_records(out.parent / "easy.jsonl", responses=["The quick brown fox jumps over the lazy dog.",
                                                               "Eat well, sleep, and exercise."])
    train(str(tiny_model_path), str(data), str(out), tiny_config(epochs=2, method="rt"), progress=False)
    return out


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("benches")
    heldout = folder / "heldout.jsonl"
    with open(heldout, "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"h{i}", "instruction": f"Say the word number {i}, please.",
                                "response": f"Word {i} is " + "fox " * (i + 1)}) + "\n")
    harmful = folder / "harmful.csv"
    harmful.write_text("id,instruction,harmful\nx1,Explain how to pick a lock,true\nx2,Tell me a joke,false\n")
    return heldout, harmful


def settings(**kw):
    decoding = EvalDecoding(max_new_tokens=kw.pop("max_new_tokens", 8), batch_size=kw.pop("batch_size", 4),
                            dtype="fp32")
    return EvalConfig(benches=kw.pop("benches"), decoding=decoding, relevance=kw.pop("relevance", False),
                      progress=False, **kw)


def test_models_side_by_side_results_layout(tmp_path, tiny_model_path, lora_run, bench_files):
    heldout, harmful = bench_files
    out = tmp_path / "eval"
    summaries = run_eval([str(tiny_model_path), str(lora_run)], settings(benches=[str(heldout), str(harmful)]), out,
                         labels=["base", "rt"])
    assert len(summaries) == 4
    found = {(s["model"]["label"], s["benchmark"]["name"]): s for s in read_summaries(out)}
    assert set(found) == {("base", "heldout"), ("base", "harmful"), ("rt", "heldout"), ("rt", "harmful")}
    rt = found[("rt", "heldout")]
    # What makes the number repeatable travels with it.
    assert rt["model"]["fingerprint"]["kind"] == "run" and rt["decoding"]["dtype"] == "fp32"
    assert rt["benchmark"]["sha256"] and rt["benchmark"]["total"] == 6 and rt["judges"]["refusal"] == "keyword-v1"
    metrics = rt["metrics"]
    for name in ("ends_with_eos", "cut_at_length", "length_tokens", "ranking_top1", "ranking_pairwise",
                 "nll_given_instruction", "nll_no_instruction", "nll_gain", "shift_top1_differs", "over_refusal_rate"):
        assert name in metrics, name
    for m in metrics.values():
        if m["ci"] is not None:
            assert m["ci"][0] <= m["value"] + 1e-9 and m["value"] <= m["ci"][1] + 1e-9
    # The base model has no untuned base to shift from; refusal splits by the items' harmful flag.
    assert "shift_top1_differs" not in found[("base", "heldout")]["metrics"]
    harm = found[("base", "harmful")]["metrics"]
    assert harm["refusal_rate"]["n"] == 1 and harm["over_refusal_rate"]["n"] == 1
    rows = read_items(out / "results" / "rt" / "heldout")
    assert [r["id"] for r in rows] == [f"h{i}" for i in range(6)]
    assert all(r["finish_reason"] in ("eos", "stop", "length") and "values" in r for r in rows)
    assert json.loads((out / "eval.json").read_text())["models"]["rt"]["spec"] == str(lora_run)
    # Reference-based quality leads where items have references; intervals say how they were made.
    assert list(metrics)[0] == "rouge_l" and 0 <= metrics["rouge_l"]["value"] <= 1
    assert metrics["ends_with_eos"]["ci_method"].startswith("Wilson")
    assert metrics["rouge_l"]["ci_method"].startswith("percentile bootstrap")
    assert rt["environment"]["device_type"] == "cpu" and "torch" in rt["environment"]["versions"]
    # Paired differences on the same items, beside the summaries.
    comparisons = json.loads((out / "comparisons.json").read_text())["comparisons"]
    pair = comparisons["heldout"]["base - rt"]
    base_rows, rt_rows = read_items(out / "results" / "base" / "heldout"), rows
    expected = sum(b["values"]["rouge_l"] - r["values"]["rouge_l"] for b, r in zip(base_rows, rt_rows)) / 6
    assert pair["rouge_l"]["value"] == pytest.approx(expected) and pair["rouge_l"]["n"] == 6
    assert pair["ends_with_eos"]["ci_method"].startswith("Newcombe")
    assert comparisons["harmful"]["base - rt"]["refusal_keyword"]["n"] == 1
    from rtune.report import build_report

    md = build_report([out], tmp_path / "report").read_text()
    assert "### Paired differences on heldout" in md and "| difference | base - rt |" in md
    assert "ROUGE-L F1 against the reference" in md.split("### Paired differences on heldout")[1]


def test_rerun_and_added_model_regenerate_nothing(tmp_path, tiny_model_path, lora_run, bench_files, monkeypatch):
    heldout, harmful = bench_files
    out = tmp_path / "eval"
    run_eval([str(tiny_model_path)], settings(benches=[str(heldout)]), out, labels=["base"])
    first = read_items(out / "results" / "base" / "heldout")
    from rtune.infer.backends.hf import HFBackend

    monkeypatch.setattr(HFBackend, "load", lambda *a, **k: pytest.fail("nothing is missing: no model is loaded"))
    again = run_eval([str(tiny_model_path)], settings(benches=[str(heldout)]), out, labels=["base"])
    assert again[0]["generation"]["generated"] == 0 and again[0]["generation"]["from_cache"] == 6
    assert read_items(out / "results" / "base" / "heldout") == first
    monkeypatch.undo()
    # Adding a benchmark generates only its prompts.
    more = run_eval([str(tiny_model_path)], settings(benches=[str(heldout), str(harmful)]), out, labels=["base"])
    assert more[0]["generation"]["generated"] == 0 and more[0]["generation"]["from_cache"] == 6
    assert more[1]["generation"]["generated"] == 2 and more[1]["generation"]["from_cache"] == 0


def test_corrupt_cache_lines_are_redone(tmp_path, tiny_model_path, bench_files):
    heldout, _ = bench_files
    out = tmp_path / "eval"
    run_eval([str(tiny_model_path)], settings(benches=[str(heldout)]), out, labels=["base"])
    cache = next((out / "cache").glob("*/generations-*.jsonl"))
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-2] + ["{broken", lines[-1][: len(lines[-1]) // 2]]))
    summary = run_eval([str(tiny_model_path)], settings(benches=[str(heldout)]), out, labels=["base"])[0]
    assert summary["generation"]["corrupt_cache_lines"] == 2 and summary["generation"]["generated"] == 2
    assert len(cache.read_text().splitlines()) == 6


def test_kill_9_midway_resumes_without_regenerating(tmp_path, tiny_model_path):
    """A real `rtune eval` process killed with SIGKILL: the re-run generates only what was missing and
    ends with the same results as an uninterrupted run."""
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "instruction": f"Count to {i} slowly."}) + "\n"
                               for i in range(120)))
    args = [str(tiny_model_path), "--names", "base", "--bench", str(prompts), "--max-new-tokens", "24",
            "--batch-size", "1", "--dtype", "fp32", "--no-relevance"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rtune", "eval", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 120
    cache_lines = 0
    while time.time() < deadline and proc.poll() is None:
        files = list((killed / "cache").glob("*/generations-*.jsonl")) if (killed / "cache").exists() else []
        cache_lines = len(files[0].read_text().splitlines()) if files else 0
        if cache_lines >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(next((killed / "cache").glob("*/generations-*.jsonl")).read_text().splitlines())
    assert 10 <= done_before < 120 and not (killed / "results").exists()

    assert main(["eval", *args, "--out", str(killed)]) == 0
    summary = read_summaries(killed)[0]
    assert summary["generation"]["from_cache"] == done_before
    assert summary["generation"]["generated"] == 120 - done_before
    cache = next((killed / "cache").glob("*/generations-*.jsonl")).read_text().splitlines()
    assert len(cache) == 120 and len({json.loads(x)["key"] for x in cache}) == 120  # nothing twice

    assert main(["eval", *args, "--out", str(tmp_path / "whole")]) == 0
    strip = lambda rows: [{k: r[k] for k in ("id", "output", "finish_reason", "num_tokens")} for r in rows]  # noqa: E731
    assert strip(read_items(killed / "results" / "base" / "many")) == strip(
        read_items(tmp_path / "whole" / "results" / "base" / "many"))


def test_bad_input_is_a_clear_error(tmp_path, tiny_model_path, capsys):
    no_field = tmp_path / "p.jsonl"
    no_field.write_text('{"question": "hi"}\n')
    assert main(["eval", str(tiny_model_path), "--bench", str(no_field), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:1" in err and "instruction" in err
    assert main(["eval", str(tiny_model_path), "--bench", "no-such-bench", "--out", str(tmp_path / "e")]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    with pytest.raises(RtuneError, match="names"):
        run_eval([str(tiny_model_path)] * 2, settings(benches=[str(no_field)]), tmp_path / "e")


def test_a_resumed_run_forms_the_batches_an_uninterrupted_run_forms(tmp_path, monkeypatch):
    """bf16 answers can depend on batch neighbours, so batches are a function of the prompts alone."""
    import rtune.eval.generation as gen
    import rtune.infer.backends.hf as hf
    from rtune.eval.cache import JsonlCache
    from rtune.infer.generate import Generation

    prompts = {f"k{i:02d}": [1] * (i % 7 + 1) for i in range(23)}
    seen, fail_after = [], [None]

    def fake_generate(model, tokenizer, renderer, batch_ids, config, progress=False):
        if fail_after[0] is not None and len(seen) >= fail_after[0]:
            raise KeyboardInterrupt  # killed
        seen.append([len(ids) for ids in batch_ids])
        return [Generation(text="x", token_ids=[5], finish_reason="eos", num_tokens=1) for _ in batch_ids]

    monkeypatch.setattr(hf, "generate_ids", fake_generate)
    backend = hf.HFBackend("m", None)
    backend.model = object()  # "loaded"
    decoding = EvalDecoding(batch_size=5)
    whole = JsonlCache(tmp_path / "whole.jsonl", gen.GENERATION_FIELDS)
    gen.generate_missing(backend, "m", prompts, whole, decoding, progress=False)
    plan, seen[:] = list(seen), []

    fail_after[0] = 2
    cut = JsonlCache(tmp_path / "cut.jsonl", gen.GENERATION_FIELDS)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_missing(backend, "m", prompts, cut, decoding, progress=False)
    first, seen[:], fail_after[0] = list(seen), [], None
    counts = gen.generate_missing(backend, "m", prompts, JsonlCache(tmp_path / "cut.jsonl", gen.GENERATION_FIELDS),
                                  decoding, progress=False)
    assert first + seen == plan and len(plan) == 5  # the same batches, none repeated
    assert counts["from_cache"] == 10 and counts["generated"] == 13
    assert decoding.key("cpu") != EvalDecoding(batch_size=6).key("cpu")  # the batch size is in the cache key


def test_models_differing_only_mid_file_and_files_sharing_a_stem_get_their_own_results(tmp_path, monkeypatch):
    """The old fingerprint read only the ends of files over 64 MiB, and named local files by their stem:
    two fine-tunes differing in the middle shared a cache, and a/test.jsonl overwrote b/test.jsonl."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))
    tokenizer = tiny.byte_bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    a, b = tmp_path / "a", tmp_path / "b"
    LlamaForCausalLM(config).save_pretrained(a)
    tokenizer.save_pretrained(a)
    weights = load_file(a / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"  # stored in the middle of the file
    weights[name] = weights[name] * 3.0
    b.mkdir()
    for f in a.iterdir():
        if f.name != "model.safetensors":
            (b / f.name).write_bytes(f.read_bytes())
    save_file(weights, b / "model.safetensors", metadata={"format": "pt"})
    size = (a / "model.safetensors").stat().st_size
    assert size > 64 * 2**20 and size == (b / "model.safetensors").stat().st_size
    with open(a / "model.safetensors", "rb") as fa, open(b / "model.safetensors", "rb") as fb:
        assert fa.read(1 << 20) == fb.read(1 << 20)
        fa.seek(size - (1 << 20)), fb.seek(size - (1 << 20))
        assert fa.read() == fb.read()  # both ends equal: only the middle differs

    sets = []
    for folder, prompts in (("one", ["Say hello.", "Name a colour."]), ("two", ["Count to three.", "Eat well."])):
        path = tmp_path / folder / "test.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"id": f"{folder}{i}", "instruction": p}) + "\n"
                                for i, p in enumerate(prompts)))
        sets.append(str(path))
    cfg = settings(benches=sets, shift=False, relevance=False)
    cfg.decoding.max_new_tokens = 5
    out = tmp_path / "together"
    summaries = run_eval([str(a), str(b)], cfg, out, labels=["a", "b"])
    found = {(s["model"]["label"], s["benchmark"]["name"]): s for s in summaries}
    assert set(found) == {(m, n) for m in "ab" for n in ("one-test", "two-test")}
    assert found["a", "one-test"]["model"]["fingerprint"]["id"] != found["b", "one-test"]["model"]["fingerprint"]["id"]
    assert [r["id"] for r in read_items(out / "results" / "a" / "two-test")] == ["two0", "two1"]
    # Each model's outputs are its own: equal to evaluating it alone in a fresh folder.
    for label, model in (("a", a), ("b", b)):
        run_eval([str(model)], cfg, tmp_path / f"alone-{label}", labels=[label])
        for bench in ("one-test", "two-test"):
            together = [r["output"] for r in read_items(out / "results" / label / bench)]
            alone = [r["output"] for r in read_items(tmp_path / f"alone-{label}" / "results" / label / bench)]
            assert together == alone
    outputs = {m: [r["output"] for r in read_items(out / "results" / m / "one-test")] for m in "ab"}
    assert outputs["a"] != outputs["b"]
