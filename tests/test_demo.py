"""`rtune demo`: its judge-free answer heuristics, and the whole path on a tiny model and a local file."""

import json

import pytest

from rtune.demo import DemoConfig, repeats_instruction, run_demo, summarise, table, writes_instruction


@pytest.mark.parametrize("instruction,output,repeat", [
    ("Describe the key responsibilities of a software engineer.",
     "Describe the key responsibilities of a software engineer.\nDescribe the key", True),
    ("List the benefits of quantum computing", "benefits of quantum computing list", True),
    ("List the benefits of quantum computing", "Quantum computers solve some problems much faster.", False),
    ("Name a colour.", "", False),
])
def test_repeats_instruction(instruction, output, repeat):
    assert repeats_instruction(instruction, output) is repeat


@pytest.mark.parametrize("output,instruction_like", [
    ("What are the main duties and responsibilities of a software engineer?", True),
    ("Create a function that takes a list of strings and sorts it.", True),
    ("Come up with three names for a cat.", True),
    ("Compose a table with three columns.\n<|user|>", True),
    ("\n\nWrite a haiku about rain.", True),
    ("1. Apple\n2. Orange\n3. Banana", False),
    ("- Create robots that sort parcels.\n- Use robots to clean floors.", False),  # an answer, as a list
    ("1. What is the purpose of the program?", True),
    ("Quantum computing is faster than classical computing for some problems.", False),
    ("Listening is the key skill of a manager.", False),  # "listening" is not the verb "list"
    ("", False),
])
def test_writes_instruction(output, instruction_like):
    assert writes_instruction(output) is instruction_like


def test_the_demo_table_leads_with_reference_quality_and_labels_the_heuristic():
    from rtune.eval.results import metric

    summary = {"rt": {"metrics": {"answered": metric(0.75, (0.5, 0.9), 24, "rate", "answered"),
                                  "rouge_l": metric(0.21, (0.18, 0.25), 24, "mean", "ROUGE-L")}}}
    text = table({name: summarise(s) for name, s in summary.items()})
    header = text.splitlines()[0]
    assert header.index("ROUGE-L") < header.index("answered (heuristic)")
    assert "| rt | 0.210 [0.180, 0.250] | 75.0% [50.0%, 90.0%] |" in text


def test_demo_runs_end_to_end_on_a_tiny_model_and_resumes(tiny_model_path, tmp_path, capsys, rtune_cache_home):
    source = tmp_path / "answers.jsonl"
    with open(source, "w") as f:
        for i in range(20):
            f.write(json.dumps({"instruction": f"Say something {i}.", "output": f"Here is thing number {i}."}) + "\n")
    config = DemoConfig(out_dir=str(tmp_path / "demo"), model=str(tiny_model_path), source=str(source),
                        train_size=8, eval_size=3, epochs=1, max_new_tokens=4, save_steps=0, safety_size=2)
    report = run_demo(config)
    out = tmp_path / "demo"
    assert set(report["summary"]) == {"base", "rt", "it", "base+urial-r"}
    rows = [json.loads(line) for line in (out / "side_by_side.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"base_output", "rt_output", "it_output", "base+urial-r_output"} <= set(rows[0])
    assert "| rt |" in (out / "summary.md").read_text()
    for method in ("rt", "it"):
        assert json.loads((out / "runs" / method / "rtune_run.json").read_text())["method"] == method
    # The evaluation: every model on the held-out set and the two safety samples, and the report.
    results = sorted(p.parent.relative_to(out / "eval" / "results").as_posix()
                     for p in (out / "eval" / "results").glob("*/*/summary.json"))
    assert results == [f"{m}/{b}" for m in ("base", "base_urial-r", "it", "rt")
                       for b in ("advbench", "harmbench", "train.heldout")]
    # The fourth model is the untuned base prompted in context: the base's weights, the urial-r template.
    icl = json.loads((out / "eval" / "results" / "base_urial-r" / "train.heldout" / "summary.json").read_text())
    assert icl["model"]["template"] == "urial-r" and icl["model"]["spec"] == str(tiny_model_path)
    report = (out / "report" / "report.md").read_text()
    assert "ranking" in report and (out / "report" / "report.html").is_file()
    capsys.readouterr()
    run_demo(config)  # again: every step is found done and skipped, nothing is generated again
    printed = capsys.readouterr().out
    assert printed.count("already done") == 3  # data, 2 trainings
    assert printed.count("7 cached, 0 generated") == 4  # 3 held-out + 2 + 2 safety prompts, per model


def test_demo_cli_flags_override_the_defaults_and_nothing_else(monkeypatch, tmp_path):
    import rtune.demo
    from rtune.cli import main

    seen = []
    monkeypatch.setattr(rtune.demo, "run_demo", seen.append)
    assert main(["demo", "--out", str(tmp_path / "d"), "--lr", "1e-3", "--eval-size", "5", "--epochs", "2"]) == 0
    (config,) = seen
    assert (config.out_dir, config.lr, config.eval_size, config.epochs) == (str(tmp_path / "d"), 1e-3, 5, 2)
    defaults = DemoConfig()
    assert (config.train_size, config.max_new_tokens, config.model) == (
        defaults.train_size, defaults.max_new_tokens, defaults.model)


def test_a_training_that_fails_in_its_process_stops_the_demo_with_its_run_named(tmp_path):
    from rtune.errors import RtuneError

    source = tmp_path / "answers.jsonl"
    with open(source, "w") as f:
        for i in range(6):
            f.write(json.dumps({"instruction": f"Say something {i}.", "output": f"Here is thing number {i}."}) + "\n")
    config = DemoConfig(out_dir=str(tmp_path / "demo"), model=str(tmp_path / "no-such-model"), source=str(source),
                        train_size=4, eval_size=1, epochs=1, save_steps=0)
    with pytest.raises(RtuneError, match=r"training .*runs.rt failed \(exit code 1\)"):
        run_demo(config)
    assert not (tmp_path / "demo" / "runs" / "it").exists()  # stopped at the first failure
