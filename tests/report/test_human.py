"""rtune report on an eval folder with human ratings: win rates (ties 1/2, bootstrap), acceptability
(Wilson), agreement with the LLM pairwise judge and between raters (Cohen's kappa)."""

import pytest
from eval_fixture import write_eval_dir

from rtune.cli import main
from rtune.eval import human
from rtune.eval.metrics.intervals import BOOTSTRAP, WILSON, bootstrap_ci, wilson_ci
from rtune.report.human import acceptability, llm_agreement, rater_agreement, win_rates

BENCH = "alpaca-heldout"
# The LLM judge's preference of rt against it per item (above 1.5: rt wins): rt, it, tie, rt, it, rt.
LLM = [2.0, 1.0, 1.5, 1.8, 1.2, 1.9]
# (rater, item, winner, rt acceptable, it acceptable)
RATINGS = [("ann", 0, "rt", True, False), ("ann", 1, "it", False, True), ("ann", 2, "tie", True, True),
           ("ann", 3, "rt", True, False), ("ann", 4, "rt", True, True), ("ann", 5, "rt", True, False),
           ("bob", 0, "rt", True, False), ("bob", 1, "it", False, False), ("bob", 2, "it", False, True),
           ("bob", 3, "rt", True, True)]


@pytest.fixture
def eval_dir(tmp_path):
    root = write_eval_dir(tmp_path / "eval", n=6, preferences={("rt", "it"): LLM})
    for k, (rater, item, winner, rt_ok, it_ok) in enumerate(RATINGS):
        a, b = ("rt", "it") if k % 2 else ("it", "rt")  # the sides as the page drew them
        human.append_rating(root, {"rater": rater, "bench": BENCH, "id": str(item), "a": a, "b": b, "winner": winner,
                                   "acceptable": {"rt": rt_ok, "it": it_ok}})
    # ann rates item 5 again twice (the last, "rt", counts) and base vs rt on item 0.
    human.append_rating(root, {"rater": "ann", "bench": BENCH, "id": "5", "a": "it", "b": "rt", "winner": "it",
                               "acceptable": {"rt": False, "it": True}})
    human.append_rating(root, {"rater": "ann", "bench": BENCH, "id": "5", "a": "rt", "b": "it", "winner": "rt",
                               "acceptable": {"rt": True, "it": False}})
    human.append_rating(root, {"rater": "ann", "bench": BENCH, "id": "0", "a": "base", "b": "rt", "winner": "base",
                               "acceptable": {"base": True, "rt": True}})  # rt's answer 0 marked again: the last
    return root


def test_human_numbers(eval_dir):
    ratings, skipped = human.read_ratings(eval_dir)
    assert skipped == 0 and len(ratings) == 11  # 10 + base vs rt; item 5's re-ratings count once
    order = ["base", "rt", "it"]
    pairs = {(p["x"], p["y"]): p for p in win_rates(ratings, order)}
    assert list(pairs) == [("base", "rt"), ("rt", "it")]
    p = pairs["rt", "it"]
    per_item = [1.0, 0.0, 0.25, 1.0, 1.0, 1.0]  # each item averaged over its raters, ties 1/2
    assert p["win_rate"]["value"] == pytest.approx(sum(per_item) / 6) and p["win_rate"]["n"] == 6
    assert p["win_rate"]["ci"] == pytest.approx(list(bootstrap_ci(per_item)))
    assert p["win_rate"]["ci_method"] == BOOTSTRAP and p["win_rate"]["kind"] == "rate"
    assert (p["wins"], p["ties"], p["losses"], p["ratings"]) == (6, 1, 3, 10)

    accepted = acceptability(ratings, order)
    # rt: ann's answers 0-5 (answer 0 marked again in base vs rt: still acceptable) and bob's 0-3.
    rt = [True, False, True, True, True, True] + [True, False, False, True]
    it = [False, True, True, False, True, False] + [False, False, True, True]
    assert accepted["rt"]["value"] == pytest.approx(sum(rt) / len(rt)) and accepted["rt"]["n"] == len(rt)
    assert accepted["rt"]["ci"] == pytest.approx(list(wilson_ci(sum(rt), len(rt))))
    assert accepted["it"]["value"] == pytest.approx(sum(it) / len(it)) and accepted["rt"]["ci_method"] == WILSON
    assert accepted["base"]["n"] == 1

    (judged,) = llm_agreement(eval_dir, ratings, order)
    assert (judged["pair"], judged["judge"], judged["reference"], judged["n"]) == ("rt vs it", "judge-llm", "it", 10)
    # Human vs judge: ann agrees on 0, 1, 2, 3, 5 (not 4); bob on 0, 1, 3 (not 2).
    assert judged["share"] == pytest.approx(8 / 10)
    human_labels = ["rt", "it", "tie", "rt", "rt", "rt", "rt", "it", "it", "rt"]
    judge_labels = ["rt", "it", "tie", "rt", "it", "rt", "rt", "it", "tie", "rt"]
    p_e = sum(human_labels.count(k) * judge_labels.count(k) for k in ("rt", "it", "tie")) / 100
    assert judged["kappa"] == pytest.approx((0.8 - p_e) / (1 - p_e))

    (between,) = rater_agreement(ratings)
    assert between["raters"] == "ann and bob"
    # Verdicts on items 0-3: ann rt, it, tie, rt; bob rt, it, it, rt.
    assert between["verdicts"]["n"] == 4 and between["verdicts"]["share"] == pytest.approx(0.75)
    assert between["verdicts"]["kappa"] == pytest.approx((0.75 - 6 / 16) / (1 - 6 / 16))
    # Acceptability of the 8 answers both marked (items 0-3): rt agrees on 0, 1, 3; it on 0, 2.
    assert between["acceptable"]["n"] == 8 and between["acceptable"]["share"] == pytest.approx(5 / 8)


def test_rtune_report_shows_the_human_ratings(eval_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(eval_dir), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "## Human ratings" in md and "<h2>Human ratings</h2>" in html
    assert "| rt vs it | 70.8% [" in md and "| 6 / 1 / 3 | 10 | ann, bob | alpaca-heldout |" in md
    assert "| rt | 70.0% [" in md and "(n=10)" in md
    assert "### Human verdicts against the LLM pairwise judge" in md and "| rt vs it | judge-llm | it | 10 | 80.0% |" in md
    assert "### Agreement between raters" in md and "| ann and bob | 4 | 75.0% | 0.60 | 8 | 62.5% |" in md
    assert BOOTSTRAP in md and WILSON in md


def test_no_human_section_without_ratings(tmp_path):
    eval_dir = write_eval_dir(tmp_path / "eval", n=3)
    (eval_dir / "human").mkdir()
    (eval_dir / "human" / "ann.jsonl").write_text('{"torn": \n')
    assert main(["report", str(eval_dir), "--out", str(tmp_path / "report")]) == 0
    assert "Human ratings" not in (tmp_path / "report" / "report.md").read_text()
