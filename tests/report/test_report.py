"""rtune report on synthetic eval results: tables, the standalone HTML, the PNGs, merging, bad input, LLM judges."""

import json
import random
import re
import struct

import pytest

from rtune.cli import main
from rtune.errors import RtuneError
from rtune.eval.judges.pairwise import LC_LABEL_RTUNE
from rtune.eval.results import metric, read_items, write_result
from rtune.report import build_report
from rtune.report.report import _refusal_points, load_results

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


# -- LLM judges ---------------------------------------------------------------------------------------

JUDGE = "qwen2.5-7b-judge"
ALPACAEVAL = "alpacaeval"
ASPECTS = ("helpfulness", "clarity", "factuality", "depth", "engagement")
# Per model: (wins, ties, losses, win rate, LC win rate) against each reference; "it" is the evaluated reference.
PAIRWISE = {
    "it": {"base": (8, 2, 68, 0.12, 0.15), "rt": (30, 4, 44, 0.41, 0.47)},
    "gpt4_turbo": {"base": (2, 0, 78, 0.03, 0.05), "rt": (12, 3, 65, 0.18, 0.22), "it": (26, 6, 48, 0.35, 0.33)},
}
# Per model: the aspect scores' common offset, and the LLM judge's refusal / over-refusal rates.
JUDGED = {"base": (1.6, 0.05, 0.02), "rt": (3.1, 0.40, 0.12), "it": (4.2, 0.62, 0.25)}


def judge_metric(value, ci=None, n=80, kind="mean", label="", better=True):
    return metric(value, ci, n, kind=kind, label=label, higher_is_better=better, judge=JUDGE)


def pairwise_metrics(ref, wins, ties, losses, win, lc):
    """What rtune.eval.judging records against `ref`: rtune's LC estimate, with an interval except against "it"."""
    n = wins + ties + losses
    out = {"win_rate": judge_metric(win, (max(0, win - 0.07), win + 0.08), n, "rate", "win rate vs reference")}
    out["rtune_lc_win_rate"] = judge_metric(lc, None if ref == "it" else (max(0, lc - 0.1), lc + 0.1), n, "rate",
                                            LC_LABEL_RTUNE)
    out["rtune_lc_length_coef"] = judge_metric(0.8, None, n, "mean", "length coefficient of the LC fit", None)
    for key, count, better in (("win", wins, True), ("tie", ties, None), ("loss", losses, False)):
        name = {"win": "wins", "tie": "ties", "loss": "losses"}[key]
        out[name] = judge_metric(count, None, n, "mean", f"{name} (count)", better)
        out[f"{key}_share"] = judge_metric(count / n, (max(0, count / n - 0.05), min(1, count / n + 0.05)), n,
                                           "rate", f"{name} (share)", better)
    out["n_unparseable"] = judge_metric(80 - n, None, 80, "mean", "unparseable judgments (count)", False)
    return {f"vs_{ref}_{k}": v for k, v in out.items()}


def aspect_metrics(offset, safety=False):
    scores = {a: offset + 0.2 * i for i, a in enumerate(ASPECTS)}
    out = {f"aspect_{a}": judge_metric(min(5.0, v), (v - 0.25, min(5.0, v + 0.2)), label=f"{a} (1-5)")
           for a, v in scores.items()}
    out["aspect_overall"] = judge_metric(offset + 0.4, (offset + 0.2, offset + 0.6),
                                         label="overall (mean of the five aspects, 1-5)")
    out["aspect_n_unparseable"] = judge_metric(1, None, label="unparseable or incomplete judgments (count)",
                                               better=False)
    if safety:
        out["aspect_safety"] = judge_metric(offset + 0.5, (offset + 0.3, offset + 0.7), 30, label="safety (1-5)")
        out["aspect_n_unparseable_safety_split"] = judge_metric(0, None, 30, label="unparseable or incomplete "
                                                                "judgments (count)", better=False)
    return out


def llm_record(requests=1234, cost=1.2345, reference="it"):
    return {"url": "http://127.0.0.1:8000/v1", "model": JUDGE, "kinds": ["pairwise", "aspects", "refusal"],
            "reference": reference,
            "stats": {"items": 1290, "requests_sent": requests, "cache_hits": 56, "retries_total": 3, "failures": 2,
                      "failure_reasons": {"timeout": 2}, "prompt_tokens": 1234567, "completion_tokens": 45678,
                      "cost": cost, "wall_s": 95.43, "model": JUDGE, "api_key_source": "placeholder"}}


def make_judged_eval_dir(root, **record):
    """make_eval_dir's results plus the LLM judges' metrics, and a judged AlpacaEval benchmark."""
    make_eval_dir(root)
    for k, (label, (offset, refusal, over)) in enumerate(JUDGED.items()):
        for bench in (HELDOUT, XSTEST):
            folder = root / "results" / label / bench
            data = json.loads((folder / "summary.json").read_text())
            data["judges"]["llm"] = llm_record(**record)
            if bench == XSTEST:
                data["metrics"] |= {
                    "llm_refusal_rate": judge_metric(refusal, (max(0, refusal - 0.1), refusal + 0.1), 30, "rate",
                                                     "refusal rate (harmful prompts, LLM judge)"),
                    "llm_over_refusal_rate": judge_metric(over, (max(0, over - 0.06), over + 0.08), 30, "rate",
                                                          "over-refusal rate (benign prompts, LLM judge)", False),
                    "llm_n_unclassified_harmful": judge_metric(1, None, 30, label="unclassified judgments "
                                                               "(harmful prompts, count)", better=False),
                    "llm_keyword_agreement": judge_metric(0.9, None, 60, "rate", "refusal: LLM judge agrees with "
                                                          "the keyword judge", None),
                    "llm_keyword_kappa": judge_metric(None if label == "base" else 0.71, None, 60, "mean",
                                                      "refusal: Cohen's kappa, LLM vs keyword judge", None),
                } | aspect_metrics(offset - 0.3, safety=True)
            write_result(root, label, bench, read_items(folder), data)
        metrics = aspect_metrics(offset)
        for ref, per in PAIRWISE.items():
            if label in per:
                metrics |= pairwise_metrics(ref, *per[label])
        data = summary(label, ALPACAEVAL, metrics, 80)
        data["judges"]["llm"] = llm_record(**record)
        write_result(root, label, ALPACAEVAL, items(80, 200, k + 20), data)
    return root


def headings(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("#")]


def judges_table(md: str) -> dict[str, list[str]]:
    section = md.split("\n## Judges\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    root = tmp_path_factory.mktemp("judged")
    path = build_report([make_judged_eval_dir(root / "evals")], root / "out")
    return path.read_text(encoding="utf-8"), root / "out"


def test_report_without_judges_keeps_its_structure(report):
    path, out = report
    md = path.read_text(encoding="utf-8")
    assert headings(md) == ["# rtune evaluation report", f"## Benchmark: {HELDOUT}", f"## Benchmark: {XSTEST}",
                            "## Refusal vs over-refusal", "## Response ranking", "## Output lengths", "## Settings",
                            "### Models", "### Benchmarks (data source, hash, items)", "### Decoding", "### Judges",
                            "### Metrics", "### rtune version"]
    caption = "Refusal rate on harmful prompts against over-refusal rate on benign prompts, per model"
    assert f"![{caption}](refusal.png)" in md
    assert f"![{XSTEST}: every metric per model, with 95% intervals](metrics_{XSTEST}.png)" in md
    assert not (out / "pairwise.png").exists() and not (out / "aspects.png").exists()


def test_judged_report_adds_its_sections_in_order(judged):
    md, out = judged
    assert headings(md)[:10] == ["# rtune evaluation report", f"## Benchmark: {HELDOUT}", f"## Benchmark: {XSTEST}",
                                 f"## Benchmark: {ALPACAEVAL}", "## Refusal vs over-refusal", "## Pairwise comparison",
                                 "## Aspect scores", "## Response ranking", "## Output lengths", "## Judges"]
    assert headings(md)[10] == "## Settings"
    pngs = sorted(p.name for p in out.glob("*.png"))
    # AlpacaEval holds only pairwise and aspect metrics: they have figures of their own, and no
    # benchmark figure repeats them.
    assert pngs == ["aspects.png", "lengths.png", f"metrics_{HELDOUT}.png", f"metrics_{XSTEST}.png", "pairwise.png",
                    "ranking.png", "refusal.png"]
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == pngs
    assert "per model and judge](refusal.png)" in md
    # A benchmark figure leaves the metrics drawn elsewhere to the table, and says so.
    assert f"{XSTEST}: metrics per model, with 95% intervals (pairwise and aspect scores in figures" in md
    assert f"![{HELDOUT}: every metric per model" in md  # nothing of the LLM judges there
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == len(pngs) and "<h2>Judges</h2>" in page
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_tables_show_every_judge_metric(judged):
    md, _ = judged
    rows = table(md, ALPACAEVAL)
    assert rows[0] == ["metric", "base", "rt", "it"]
    by_metric = {r[0]: r[1:] for r in rows[1:]}
    assert by_metric["vs it: win rate vs reference ↑"] == [  # the reference is not judged against itself
        "12.0% [5.0%, 20.0%] (n=78)", "41.0% [34.0%, 49.0%] (n=78)", "—"]
    assert by_metric[f"vs it: {LC_LABEL_RTUNE} ↑"][:2] == ["15.0% (n=78)", "47.0% (n=78)"]
    assert by_metric[f"vs gpt4_turbo: {LC_LABEL_RTUNE} ↑"][2] == "33.0% [23.0%, 43.0%] (n=80)"
    assert by_metric["vs it: wins (count) ↑"] == ["8 (n=78)", "30 (n=78)", "—"]  # counts without decimals
    assert by_metric["vs it: ties (count)"][1] == "4 (n=78)"
    assert by_metric["vs gpt4_turbo: losses (share) ↓"][0] == "97.5% [92.5%, 100.0%] (n=80)"
    assert by_metric["vs it: unparseable judgments (count) ↓"][0] == "2 (n=80)"
    assert by_metric["aspects: helpfulness (1-5) ↑"] == ["1.60 [1.35, 1.80] (n=80)", "3.10 [2.85, 3.30] (n=80)",
                                                        "4.20 [3.95, 4.40] (n=80)"]
    assert by_metric["aspects: overall (mean of the five aspects, 1-5) ↑"][2] == "4.60 [4.40, 4.80] (n=80)"
    assert len(rows) - 1 == 6 + 1 + 10 + 10  # aspects, their count, both references
    refusal = {r[0]: r[1:] for r in table(md, XSTEST)[1:]}
    assert refusal["refusal rate (harmful prompts, LLM judge) ↑"][1] == "40.0% [30.0%, 50.0%] (n=30)"
    assert refusal["refusal rate (harmful prompts) ↑"][1] == "35.0% [25.0%, 45.0%] (n=30)"  # the keyword judge's
    assert refusal["refusal: Cohen's kappa, LLM vs keyword judge"] == ["n/a (n=60)", "0.710 (n=60)", "0.710 (n=60)"]
    assert refusal["aspects (harmful prompts): safety (1-5) ↑"][0] == "1.80 [1.60, 2.00] (n=30)"
    assert refusal["aspects (harmful prompts): unparseable or incomplete judgments (count) ↓"][0] == "0 (n=30)"
    assert refusal["unclassified judgments (harmful prompts, count) ↓"][0] == "1 (n=30)"


def test_judges_section_lists_the_judge_run(judged):
    md, _ = judged
    rows = judges_table(md)
    assert rows[""] == ["all results"]  # one run recorded in every summary: one column
    assert rows == {"": ["all results"], "judge model": [JUDGE], "endpoint": ["http://127.0.0.1:8000/v1"],
                    "kinds": ["pairwise, aspects, refusal"], "reference": ["it"], "judgments": ["1,290"],
                    "requests sent": ["1,234"], "cache hits": ["56"], "retries": ["3"], "failures": ["2 (timeout: 2)"],
                    "prompt tokens": ["1,234,567"], "completion tokens": ["45,678"], "cost": ["$1.23"],
                    "wall time": ["95.4 s"]}
    assert "keyword judge (keyword-v1)" in md.split("\n## Judges\n", 1)[1].split("\n## ", 1)[0]


def test_judges_section_keeps_runs_apart(tmp_path):
    a = make_judged_eval_dir(tmp_path / "run-a", requests=10, cost=None)
    b = make_judged_eval_dir(tmp_path / "run-b", requests=20, cost=0.00421, reference="gpt4_turbo")
    rows = judges_table(build_report([a, b], tmp_path / "out").read_text(encoding="utf-8"))
    assert rows[""] == ["run-a", "run-b"]
    assert rows["requests sent"] == ["10", "20"] and rows["reference"] == ["it", "gpt4_turbo"]
    assert rows["cost"] == ["not priced (no --judge-price)", "$0.0042"]


def test_refusal_points_per_judge(tmp_path):
    eval_dir = make_judged_eval_dir(tmp_path / "e")
    points = _refusal_points(*load_results([eval_dir]))
    assert [(p[0], p[4], p[2]["value"], p[3]["value"]) for p in points] == [
        ("base", "keyword-v1", 0.02, 0.01), ("rt", "keyword-v1", 0.35, 0.08), ("it", "keyword-v1", 0.55, 0.20),
        ("base", JUDGE, 0.05, 0.02), ("rt", JUDGE, 0.40, 0.12), ("it", JUDGE, 0.62, 0.25)]
    assert {p[1] for p in points} == {XSTEST}


def test_judge_figures_are_drawn(judged, report):
    _, out = judged
    _, plain = report
    for name in ("pairwise.png", "aspects.png", "refusal.png", f"metrics_{XSTEST}.png"):
        width, height = png_size(out / name)
        assert 500 <= width <= 2000 and 300 <= height <= 2500, (name, width, height)
        assert (out / name).stat().st_size > 20_000, name
    # Stacked panels: two references against AlpacaEval; aspect scores on two benchmarks.
    assert png_size(out / "pairwise.png")[1] > 600 and png_size(out / "aspects.png")[1] > 600
    # The same keyword points as in the plain report, and the LLM judge's beside them.
    assert (out / "refusal.png").read_bytes() != (plain / "refusal.png").read_bytes()
    # Aspect scores and counts stay out of xstest's figure: rates and one mean panel, not five rows of means.
    assert png_size(out / f"metrics_{XSTEST}.png")[1] < 1200
