"""Human ratings in `rtune report`: win rates, acceptability and agreement (EVAL_DIR/human/, rtune.eval.human).

Per pair of models rated against each other:
  win rate      of the first model, ties counted 1/2: each item's score averaged over its raters, then
                the mean over items with a percentile bootstrap over items (intervals.BOOTSTRAP);
  wins / ties / losses over the ratings.
Per model:
  acceptability the share of its answers marked acceptable, each answer counted once per rater (the
                last mark), with a Wilson interval (intervals.WILSON).
Agreement (Cohen's kappa, rtune.eval.judges.agreement):
  with the LLM pairwise judge, where `rtune eval --judge pairwise` judged one model of the pair
                against the other (the item's preference_vs_<other> in items.jsonl: above 1.5 the
                model wins, below the other, 1.5 a tie), each human verdict against the judge's;
  between raters, each two raters on the items of a pair both rated: the verdicts, and the
                acceptability marks of the answers both marked.
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from rtune.eval.human import HUMAN, TIE, read_ratings
from rtune.eval.judges.agreement import agreement
from rtune.eval.metrics.intervals import BOOTSTRAP, WILSON, mean_with_ci, rate_with_ci
from rtune.eval.results import ITEMS, metric, safe_name
from rtune.report.tables import MISSING, format_metric

TIE_TOLERANCE = 1e-9


def _pair(rating: dict) -> tuple[str, str]:
    return tuple(sorted((rating["a"], rating["b"])))


def _rank(order: list[str]):
    """A sort key for models: the report's order, then alphabetical."""
    rank = {m: i for i, m in enumerate(order)}
    return lambda m: (rank.get(m, len(rank)), m)


def _ordered(pair, order: list[str]) -> tuple[str, str]:
    return tuple(sorted(pair, key=_rank(order)))


def win_rates(ratings: list[dict], order: list[str]) -> list[dict]:
    """Per pair, the first model's win rate (ties 1/2) over items, and the counts over ratings."""
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for r in ratings:
        by_pair[_pair(r)].append(r)
    out = []
    for pair, rows in by_pair.items():
        x, y = _ordered(pair, order)
        per_item: dict[tuple, list[float]] = defaultdict(list)
        for r in rows:
            per_item[r["bench"], r["id"]].append(1.0 if r["winner"] == x else 0.5 if r["winner"] == TIE else 0.0)
        value, ci, n = mean_with_ci([sum(s) / len(s) for s in per_item.values()])
        out.append({
            "x": x, "y": y, "win_rate": metric(value, ci, n, "rate", f"{x} wins against {y} (ties 1/2)", True,
                                                "human", BOOTSTRAP),
            "wins": sum(r["winner"] == x for r in rows), "ties": sum(r["winner"] == TIE for r in rows),
            "losses": sum(r["winner"] == y for r in rows), "ratings": len(rows),
            "raters": sorted({r["rater"] for r in rows}), "benches": sorted({r["bench"] for r in rows}),
        })
    key = _rank(order)
    return sorted(out, key=lambda p: (key(p["x"]), key(p["y"])))


def _answer_marks(ratings: list[dict]) -> dict[tuple, bool]:
    """{(rater, bench, id, model): acceptable}: each answer once per rater, the last mark kept."""
    marks = {}
    for r in ratings:
        for model, ok in r["acceptable"].items():
            marks[r["rater"], r["bench"], r["id"], model] = ok
    return marks


def acceptability(ratings: list[dict], order: list[str]) -> dict[str, dict]:
    per_model: dict[str, list[bool]] = defaultdict(list)
    for (_, _, _, model), ok in _answer_marks(ratings).items():
        per_model[model].append(ok)
    out = {}
    for model in sorted(per_model, key=_rank(order)):
        value, ci, n = rate_with_ci(per_model[model])
        out[model] = metric(value, ci, n, "rate", "answers acceptable (human)", True, "human", WILSON)
    return out


def _llm_preferences(eval_dir: Path, model: str, other: str) -> dict[str, dict[tuple, float]]:
    """{judge: {(bench, id): preference of `model` against `other`}} from model's items.jsonl files."""
    key = "preference_vs_" + safe_name(other)
    out: dict[str, dict] = defaultdict(dict)
    folder = Path(eval_dir) / "results" / safe_name(model)  # rtune.eval.results' layout
    for path in sorted(folder.glob(f"*/{ITEMS}")):
        summary_path = path.parent / "summary.json"
        bench = path.parent.name
        try:
            bench = json.loads(summary_path.read_text(encoding="utf-8"))["benchmark"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            for judge, said in (row.get("judgments") or {}).items():
                if isinstance(said, dict) and isinstance(said.get(key), (int, float)):
                    out[judge][bench, str(row.get("id"))] = float(said[key])
    return out


def _verdict(preference: float, model: str, other: str) -> str:
    if abs(preference - 1.5) <= TIE_TOLERANCE:
        return TIE
    return model if preference > 1.5 else other


def llm_agreement(eval_dir: Path, ratings: list[dict], order: list[str] = ()) -> list[dict]:
    """Per pair and LLM judge: the human verdicts against the judge's on the same items."""
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for r in ratings:
        by_pair[_ordered(_pair(r), order)].append(r)
    out = []
    key = _rank(order)
    for (x, y), rows in sorted(by_pair.items(), key=lambda kv: (key(kv[0][0]), key(kv[0][1]))):
        for model, other in ((x, y), (y, x)):
            for judge, prefs in _llm_preferences(eval_dir, model, other).items():
                matched = [(r["winner"], _verdict(prefs[r["bench"], r["id"]], model, other))
                           for r in rows if (r["bench"], r["id"]) in prefs]
                if matched:
                    a = agreement([h for h, _ in matched], [j for _, j in matched])
                    out.append({"pair": f"{x} vs {y}", "judge": judge, "reference": other, **a})
    return out


def rater_agreement(ratings: list[dict]) -> list[dict]:
    """Per two raters: verdicts on the items of a pair both rated, and the answers both marked."""
    verdicts: dict[str, dict[tuple, str]] = defaultdict(dict)
    for r in ratings:
        verdicts[r["rater"]][(*_pair(r), r["bench"], r["id"])] = r["winner"]
    marks: dict[str, dict[tuple, bool]] = defaultdict(dict)
    for (rater, bench, item, model), ok in _answer_marks(ratings).items():
        marks[rater][bench, item, model] = ok
    out = []
    for first, second in combinations(sorted(verdicts), 2):
        shared = sorted(set(verdicts[first]) & set(verdicts[second]))
        both = sorted(set(marks[first]) & set(marks[second]))
        if not shared and not both:
            continue
        out.append({"raters": f"{first} and {second}",
                    "verdicts": agreement([verdicts[first][k] for k in shared], [verdicts[second][k] for k in shared]),
                    "acceptable": agreement([marks[first][k] for k in both], [marks[second][k] for k in both])})
    return out


def _share(a: dict) -> str:
    return MISSING if a["share"] is None else f"{100 * a['share']:.1f}%"


def _kappa(a: dict) -> str:
    return MISSING if a["kappa"] is None else f"{a['kappa']:.2f}"


def human_blocks(eval_dirs: list, order: list[str]) -> list[tuple]:
    """The report's "Human ratings" section: nothing when no EVAL_DIR holds ratings."""
    dirs = list(dict.fromkeys(Path(d).resolve() for d in eval_dirs))
    blocks = []
    for d in dirs:
        ratings, skipped = read_ratings(d)
        if not ratings:
            continue
        where = f" ({d.name})" if len(dirs) > 1 else ""
        raters = sorted({r["rater"] for r in ratings})
        about = (f"{len(ratings)} blind pairwise ratings by {len(raters)} rater(s) ({', '.join(raters)}) in "
                 f"{d / HUMAN}: two models' answers to the same item as A and B, sides drawn at random and names "
                 "hidden (rtune serve --rate / rtune rate); an item rated again by the same rater counts once "
                 f"(the last rating). Win rate: ties count 1/2, each item's score averaged over its raters, "
                 f"{BOOTSTRAP}. Acceptability: each answer once per rater, {WILSON}.")
        if skipped:
            about += f" {skipped} line(s) that are not valid ratings were left out."
        blocks += [("h", 2, "Human ratings" + where), ("p", about)]
        rows = [[f"{p['x']} vs {p['y']}", format_metric(p["win_rate"]), f"{p['wins']} / {p['ties']} / {p['losses']}",
                 str(p["ratings"]), ", ".join(p["raters"]), ", ".join(p["benches"])] for p in win_rates(ratings, order)]
        blocks.append(("table", ["pair (first vs second)", "first model's win rate ↑", "wins / ties / losses",
                                 "ratings", "raters", "benchmarks"], rows))
        accepted = acceptability(ratings, order)
        blocks.append(("table", ["model", "acceptable answers ↑ (human)"],
                       [[m, format_metric(x)] for m, x in accepted.items()]))
        judged = llm_agreement(d, ratings, order)
        if judged:
            blocks += [("h", 3, "Human verdicts against the LLM pairwise judge" + where),
                       ("p", "Each human verdict (first model, second model or tie) against the judge's on the same "
                             "item (preference above 1.5: the judged model wins, below: its reference, 1.5: a tie). "
                             "Cohen's kappa: 0 is chance agreement, 1 is complete."),
                       ("table", ["pair", "judge", "judged against", "ratings compared", "agreement", "Cohen's kappa"],
                        [[j["pair"], j["judge"], j["reference"], str(j["n"]), _share(j), _kappa(j)] for j in judged])]
        between = rater_agreement(ratings)
        if between:
            blocks += [("h", 3, "Agreement between raters" + where),
                       ("table", ["raters", "verdicts compared", "verdicts agree", "verdicts kappa",
                                  "acceptability compared", "acceptability agrees", "acceptability kappa"],
                        [[b["raters"], str(b["verdicts"]["n"]), _share(b["verdicts"]), _kappa(b["verdicts"]),
                          str(b["acceptable"]["n"]), _share(b["acceptable"]), _kappa(b["acceptable"])]
                         for b in between])]
    return blocks
