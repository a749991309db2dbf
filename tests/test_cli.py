"""The real CLI, end to end, on a tiny model: prepare -> inspect -> train -> generate -> merge -> chat."""

import json
import os
import subprocess
import sys

import pytest

from rtune.cli import EXAMPLES, build_parser, main
from rtune.render import IGNORE

RECORDS = [
    {"instruction": f"Question number {i}?", "input": "" if i % 3 else "with context", "output": f"Answer {i}. " * (1 + i % 4)}
    for i in range(14)
]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def test_every_subcommand_has_help_with_an_example(capsys):
    parser = build_parser()
    for name, example in EXAMPLES.items():
        with pytest.raises(SystemExit) as e:
            parser.parse_args(name.split() + ["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out and example in out


def test_end_to_end_on_a_tiny_model(tmp_path, capsys, alpaca_file, tiny_model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_file = tmp_path / "data" / "train.jsonl"
    code, out, _ = run_cli(capsys, "data", "prepare", "--source", alpaca_file, "--out", train_file, "--holdout", 3)
    assert code == 0, out
    assert len(read_jsonl(train_file)) == 11 and len(read_jsonl(tmp_path / "data" / "train.heldout.jsonl")) == 3
    joined = [r for r in read_jsonl(train_file) if "\n\nwith context" in r["instruction"]]
    assert joined, "instruction and input are joined with a blank line"

    # inspect --json: the trained text is the response and EOS, for each method.
    record = read_jsonl(train_file)[0]
    for method in ("rt", "it", "rt-empty-user"):
        code, out, _ = run_cli(capsys, "data", "inspect", train_file, "--model", tiny_model_path, "--method", method, "--json")
        assert code == 0
        view = json.loads(out)
        assert view["trained_text"] == record["response"] + "<eos>"
        assert len(view["input_ids"]) == len(view["labels"])
        assert (record["instruction"] in view["text"]) == (method == "it")

    # train: a few steps with checkpoints, fp32 for exactness.
    run = tmp_path / "runs" / "rt"
    code, out, err = run_cli(
        capsys, "train", "--model", tiny_model_path, "--data", train_file, "--method", "rt", "--out", run,
        "--config", "cpu", "--max-steps", 3, "--save-steps", 1, "--precision", "fp32", "--lr", "1e-3", "--quiet",
    )
    assert code == 0, err
    info = json.loads((run / "rtune_run.json").read_text())
    assert info["status"] == "complete" and info["method"] == "rt" and info["renderer"]["template"] == "tulu"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "tokenizer").is_dir()
    assert len(read_jsonl(run / "log.jsonl")) == 3

    # A second train into the same folder without --resume is refused; nothing is overwritten.
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_path, "--data", train_file, "--out", run, "--quiet")
    assert code == 2 and "--resume" in err
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before

    # generate from the run folder (its template), then from the merged folder: same answers.
    heldout = tmp_path / "data" / "train.heldout.jsonl"
    gens = tmp_path / "gens" / "rt.jsonl"
    code, out, err = run_cli(capsys, "generate", run, "--prompts", heldout, "--out", gens, "--max-new-tokens", 6)
    assert code == 0, err
    rows = read_jsonl(gens)
    assert [r["id"] for r in rows] == [r["id"] for r in read_jsonl(heldout)]
    assert all(r["num_tokens"] <= 6 for r in rows)

    merged = tmp_path / "merged"
    code, out, err = run_cli(capsys, "merge", run, "--out", merged)
    assert code == 0, err
    from rtune.fingerprint import model_fingerprint
    from rtune.infer.load import load_renderer

    # The id rtune serve would report for it: what --gen-fingerprint takes for another server.
    assert f"fingerprint {model_fingerprint(str(merged), load_renderer(str(merged)))['id']}" in out
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged)  # plain transformers loads it
    gens2 = tmp_path / "gens" / "merged.jsonl"
    code, _, err = run_cli(capsys, "generate", merged, "--prompts", heldout, "--out", gens2, "--max-new-tokens", 6)
    assert code == 0, err
    assert [r["output"] for r in read_jsonl(gens2)] == [r["output"] for r in rows]

    # A run folder refuses a conflicting template at inference.
    code, _, err = run_cli(capsys, "generate", run, "--prompts", heldout, "--out", tmp_path / "x.jsonl", "--template", "model")
    assert code == 2 and "tulu" in err and not (tmp_path / "x.jsonl").exists()

    # inspect through the run folder, or the merged folder, uses the run's template.
    for folder in (run, merged):
        code, out, _ = run_cli(capsys, "data", "inspect", train_file, "--model", folder, "--method", "it", "--json")
        assert code == 0 and json.loads(out)["trained_text"] == record["response"] + "<eos>"

    # Plain transformers prompts the merged model exactly as rtune does (the exported chat template).
    from transformers import AutoTokenizer

    from rtune.infer.load import load_renderer

    plain, renderer = AutoTokenizer.from_pretrained(merged), load_renderer(merged)
    for r in read_jsonl(heldout) + read_jsonl(train_file):
        messages = [{"role": "user", "content": r["instruction"]}]
        ids = plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == renderer.render_prompt(r["instruction"])


def test_bad_data_file_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "data", "prepare", "--source", bad, "--out", out)
    assert code == 2
    assert "bad.jsonl:2" in err
    assert out.read_text(encoding="utf-8") == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out.jsonl"]


def test_inspect_real_tokenizers_exact_masks(tmp_path, capsys, gemma_tokenizer, smollm2_tokenizer):
    data = tmp_path / "d.jsonl"
    rec = {"id": "u1", "instruction": "Name a city.", "response": "Tōkyō 東京 🙂", "source": "t"}
    data.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    for model, tok, template, end in [
        ("gemma-3-270m", gemma_tokenizer, "tulu", "<eos>"),
        ("smollm2-135m-instruct", smollm2_tokenizer, "tulu", "<|im_end|>"),
        ("smollm2-135m-instruct", smollm2_tokenizer, "model", "<|im_end|>"),
    ]:
        for method in ("rt", "it", "rt-empty-user"):
            code, out, err = run_cli(capsys, "data", "inspect", data, "--model", model, "--method", method,
                                     "--template", template, "--json")
            assert code == 0, err
            view = json.loads(out)
            trained = [t for t, lab in zip(view["input_ids"], view["labels"]) if lab != IGNORE]
            assert trained == tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(end)]
            assert view["trained_text"] == rec["response"] + end
            first = next(i for i, lab in enumerate(view["labels"]) if lab != IGNORE)
            assert all(lab == IGNORE for lab in view["labels"][:first])


def test_console_script_runs(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "rtune", "train", "--model", "nonexistent-model", "--data",
                             str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("rtune: error:") and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_every_config_field_is_a_train_flag(monkeypatch):
    """rtune train's flags come from TrainConfig: each field is reachable, with its help, and reaches the config."""
    import dataclasses

    import rtune.train.recipe as recipe
    from rtune.train.config import TrainConfig

    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a for a in train_parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags, f"config field {f.name} has no rtune train flag"
        assert f.metadata.get("help") and f.metadata["help"] in flags[f.name].help, f.name

    seen = {}
    monkeypatch.setattr(recipe, "train", lambda model, data, out, config, **kw: seen.setdefault("config", config) or {})
    args = ["train", "--model", "m", "--data", "d", "--out", "o", "--config", "cpu", "--lr", "3e-4",
            "--lora-target", "q_proj,v_proj", "--no-group-by-length", "--packing", "--max-steps", "7", "--epochs", "1.5"]
    assert main(args) == 0
    c = seen["config"]
    assert (c.lr, c.lora_target, c.group_by_length, c.packing, c.max_steps, c.epochs) == (
        3e-4, ["q_proj", "v_proj"], False, True, 7, 1.5)
    assert c.batch_size == 2  # the cpu preset's, not overridden


def test_bad_flag_value_names_the_field(capsys):
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--lr", "fast"]) == 2
    assert "field 'lr'" in capsys.readouterr().err


def test_version(capsys):
    import rtune

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rtune {rtune.__version__}"
