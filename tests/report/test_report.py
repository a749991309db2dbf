"""rtune report on synthetic eval results: tables, the standalone HTML, the PNGs, merging, bad input."""

import json
import random
import re
import struct

import pytest

from rtune.cli import main
from rtune.errors import RtuneError
from rtune.eval.results import metric, write_result
from rtune.report import build_report
from rtune.report.report import load_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HELDOUT, XSTEST = "alpaca-heldout", "xstest"


def rate(value, lo, hi, n, label, better=True, judge=None):
    return metric(value, (lo, hi), n, kind="rate", label=label, higher_is_better=better, judge=judge)


def mean(value, lo, hi, n, label, better=True):
    return metric(value, (lo, hi), n, kind="mean", label=label, higher_is_better=better)


# Per model: (ends_with_eos, answered, length mean, nll_gain, ranking_top1, refusal, over-refusal, typical length).
MODELS = {
    "base": (0.10, 0.05, 480.44, -0.05, 0.20, 0.02, 0.01, 500),
    "rt": (0.625, 0.55, 123.44, 0.31, 0.45, 0.35, 0.08, 120),
    "it": (0.90, 0.85, 98.76, 0.42, 0.60, 0.55, 0.20, 90),
}


def summary(label, bench, metrics, count):
    return {
        "model": {"label": label, "spec": f"runs/{label}", "fingerprint": {"id": f"fp-{label}-0123", "kind": "run"}},
        "benchmark": {"name": bench, "source": f"offline:{bench}", "sha256": f"sha-{bench}", "selected": count},
        "decoding": {"max_new_tokens": 512, "do_sample": False, "dtype": "float32", "stop": []},
        "judges": {"refusal": "keyword-v1"},
        "metrics": metrics,
        "timings": {"metrics_s": 0.1},
        "rtune_version": "0.1.0",
    }


def items(n, typical, seed):
    rng = random.Random(seed)
    return [{"id": str(i), "prompt": f"q{i}", "output": "a " * 3, "finish_reason": "eos", "harmful": None,
             "num_tokens": min(512, max(1, int(rng.gauss(typical, typical / 3)))), "values": {}} for i in range(n)]


def make_eval_dir(root, models=MODELS, eval_json=True):
    """Two benchmarks per model: a held-out set (rates, means, ranking) and a refusal set."""
    for k, (label, (eos, answered, length, gain, top1, refusal, over, typical)) in enumerate(models.items()):
        held = {
            "ends_with_eos": rate(eos, eos - 0.1, eos + 0.1, 40, "ends with EOS"),
            "answered": rate(answered, max(0, answered - 0.1), answered + 0.1, 40,
                             "answered (ends, neither echoes nor writes an instruction)"),
            "cut_at_length": rate(1 - eos, max(0, 0.9 - eos), min(1, 1.1 - eos), 40, "cut at max_new_tokens", False),
            "distinct_2": mean(0.8123, 0.80, 0.83, 40, "distinct-2 within an output"),
            "length_tokens": mean(length, length - 12, length + 12, 40, "length (tokens)", None),
            "nll_gain": mean(gain, gain - 0.1, gain + 0.1, 40, "NLL gain from the instruction (nats per token)"),
            "ranking_top1": rate(top1, top1 - 0.12, top1 + 0.12, 40, "response ranking: own response above all K others"),
        }
        if label == "rt":  # a metric measured on no item, and one only this model has
            held["relevance"] = metric(None, None, 0, kind="mean", label="relevance (MiniLM)", higher_is_better=True)
        write_result(root, label, HELDOUT, items(40, typical, k), summary(label, HELDOUT, held, 40))
        refusals = {
            "refusal_rate": rate(refusal, max(0, refusal - 0.1), refusal + 0.1, 30, "refusal rate (harmful prompts)",
                                 judge="keyword-v1"),
            "over_refusal_rate": rate(over, 0, over + 0.08, 30, "over-refusal rate (benign prompts)", False,
                                      judge="keyword-v1"),
        }
        write_result(root, label, XSTEST, items(60, typical // 2, k + 10), summary(label, XSTEST, refusals, 60))
    if eval_json:
        (root / "eval.json").write_text(json.dumps({"models": {m: {"spec": f"runs/{m}"} for m in models},
                                                    "benchmarks": [{"name": HELDOUT}, {"name": XSTEST}]}))
    return root


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table(md: str, bench: str) -> list[list[str]]:
    """The Markdown table under a benchmark's heading, as rows of cells."""
    section = md.split(f"## Benchmark: {bench}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines if not line.startswith("|---")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    eval_dir = make_eval_dir(root / "evals")
    path = build_report([eval_dir], root / "out")
    return path, root / "out"


def test_markdown_tables_hold_the_values(report):
    path, out = report
    assert path == out / "report.md"
    md = path.read_text(encoding="utf-8")
    rows = table(md, HELDOUT)
    assert rows[0] == ["metric", "base", "rt", "it"]  # eval.json's order
    by_metric = {r[0]: r[1:] for r in rows[1:]}
    assert by_metric["ends with EOS ↑"] == ["10.0% [0.0%, 20.0%] (n=40)", "62.5% [52.5%, 72.5%] (n=40)",
                                           "90.0% [80.0%, 100.0%] (n=40)"]
    assert by_metric["cut at max_new_tokens ↓"][1] == "37.5% [27.5%, 47.5%] (n=40)"
    assert by_metric["length (tokens)"] == ["480.4 [468.4, 492.4] (n=40)", "123.4 [111.4, 135.4] (n=40)",
                                           "98.8 [86.8, 110.8] (n=40)"]  # one precision per cell
    assert by_metric["distinct-2 within an output ↑"][0] == "0.812 [0.800, 0.830] (n=40)"
    assert by_metric["NLL gain from the instruction (nats per token) ↑"][0] == "-0.050 [-0.150, 0.050] (n=40)"
    assert by_metric["relevance (MiniLM) ↑"] == ["—", "n/a (n=0)", "—"]
    # Rows keep the summaries' order.
    assert [r[0] for r in rows[1:4]] == ["ends with EOS ↑", "answered (ends, neither echoes nor writes an instruction) ↑",
                                         "cut at max_new_tokens ↓"]
    refusal = {r[0]: r[1:] for r in table(md, XSTEST)[1:]}
    assert refusal["over-refusal rate (benign prompts) ↓"][2] == "20.0% [0.0%, 28.0%] (n=30)"
    assert "60 items; source: offline:xstest." in md


def test_markdown_has_settings_and_links_every_png(report):
    path, out = report
    md = path.read_text(encoding="utf-8")
    for text in ("fp-rt-0123", "sha-alpaca-heldout", '"max_new_tokens": 512', "keyword-v1", "0.1.0"):
        assert text in md, text
    settings = md.split("## Settings", 1)[1]
    # Identical decoding settings are listed once, for all results.
    assert settings.count('"max_new_tokens": 512') == 1 and "- **all results**" in settings
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["lengths.png", "metrics_alpaca-heldout.png", "metrics_xstest.png", "ranking.png", "refusal.png"]
    linked = sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
    assert linked == pngs
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temporary file


def test_html_is_standalone(report):
    _, out = report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('src="data:image/png;base64,') == 5
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []
    assert ".png" not in page and "http" not in page and "<link" not in page and "<script" not in page
    assert "<td>62.5% [52.5%, 72.5%] (n=40)</td>" in page and "fp-rt-0123" in page


def test_pngs_are_valid_and_readably_sized(report):
    _, out = report
    for png in out.glob("*.png"):
        width, height = png_size(png)
        assert 500 <= width <= 2000 and 300 <= height <= 2500, (png.name, width, height)
        assert png.stat().st_size > 10_000, png.name  # drawn, not blank


def test_model_order_without_eval_json_puts_base_first(tmp_path):
    eval_dir = make_eval_dir(tmp_path / "e", {k: MODELS[k] for k in ("rt", "it", "base")}, eval_json=False)
    results, models, benches = load_results([eval_dir])
    assert models == ["base", "it", "rt"] and benches == [HELDOUT, XSTEST]
    assert len(results) == 6


def test_several_eval_dirs_merge_and_keep_shared_labels_apart(tmp_path):
    a = make_eval_dir(tmp_path / "run-a", {"base": MODELS["base"], "rt": MODELS["rt"]})
    b = make_eval_dir(tmp_path / "run-b", {"base": MODELS["base"], "it": MODELS["it"]})
    md = build_report([a, b, a], tmp_path / "out").read_text(encoding="utf-8")  # a twice counts once
    assert table(md, HELDOUT)[0] == ["metric", "base (run-a)", "base (run-b)", "rt", "it"]
    assert "- **base (run-a)**" in md and "- **base (run-b)**" in md


def test_refusal_pairs_across_benchmarks_and_plots_only_what_exists(tmp_path):
    eval_dir = tmp_path / "e"
    for label, value in (("base", 0.1), ("rt", 0.4)):
        harmful = {"refusal_rate": rate(value, value - 0.05, value + 0.05, 20, "refusal rate")}
        benign = {"over_refusal_rate": rate(value / 2, 0, value, 20, "over-refusal rate", False)}
        write_result(eval_dir, label, "advbench", items(20, 50, 1), summary(label, "advbench", harmful, 20))
        write_result(eval_dir, label, "xstest-safe", items(20, 50, 2), summary(label, "xstest-safe", benign, 20))
    out = tmp_path / "out"
    md = build_report([eval_dir], out).read_text(encoding="utf-8")
    assert (out / "refusal.png").is_file() and "## Refusal vs over-refusal" in md
    assert not (out / "ranking.png").exists() and "## Response ranking" not in md  # no ranking metric here

    from rtune.report.report import _refusal_points

    points = _refusal_points(*load_results([eval_dir]))
    assert [(p[0], p[1], p[2]["value"], p[3]["value"]) for p in points] == [
        ("base", "advbench / xstest-safe", 0.1, 0.05), ("rt", "advbench / xstest-safe", 0.4, 0.2)]


def test_cli_writes_the_report_and_prints_its_path(tmp_path, capsys):
    eval_dir = make_eval_dir(tmp_path / "evals")
    out = tmp_path / "rep"
    assert main(["report", str(eval_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "report.md"), str(out / "report.html")]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_folder_without_results_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "not-an-eval"
    empty.mkdir()
    with pytest.raises(RtuneError, match="no rtune eval results"):
        build_report([empty], tmp_path / "out")
    assert main(["report", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rtune: error:") and "not-an-eval" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    # A results folder whose summary is broken names the file.
    bad = make_eval_dir(tmp_path / "bad", {"rt": MODELS["rt"]})
    (bad / "results" / "rt" / XSTEST / "summary.json").write_text("{not json")
    assert main(["report", str(bad), "--out", str(tmp_path / "out2")]) == 2
    assert "summary.json: not valid JSON" in capsys.readouterr().err
