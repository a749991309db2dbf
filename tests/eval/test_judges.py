"""LLM judges as pure functions: requests, parsing of judge replies, aggregates. No network, no model."""

import math
import sys
import types

import numpy as np
import pytest

from rtune.eval.judges import aspects, pairwise, refusal
from rtune.eval.judges.agreement import agreement
from rtune.eval.judges.pairwise import (
    MODEL_FIRST,
    REFERENCE_FIRST,
    combine,
    preference,
    summarise_pairwise,
)


def result(text="", top=None):
    """A judge client's result; `top` maps tokens to probabilities for the first generated token."""
    top_logprobs = None if top is None else [[{"token": t, "logprob": math.log(p)} for t, p in top.items()]]
    return {"text": text, "top_logprobs": top_logprobs, "usage": {}, "finish_reason": "length"}


def user_text(request):
    messages, _ = request
    return messages[-1]["content"]


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# ---------------------------------------------------------------------------------------------
# pairwise: requests and preferences


def test_pairwise_requests_cover_both_orders():
    reqs = pairwise.requests("Name a colour.", "MODEL-ANSWER", "REFERENCE-ANSWER")
    assert len(reqs) == 2 and pairwise.ORDERS == (MODEL_FIRST, REFERENCE_FIRST)
    first, second = user_text(reqs[0]), user_text(reqs[1])
    assert first.index("MODEL-ANSWER") < first.index("REFERENCE-ANSWER")
    assert second.index("REFERENCE-ANSWER") < second.index("MODEL-ANSWER")
    assert "Name a colour." in first and "Name a colour." in second
    for _, params in reqs:
        assert params["max_tokens"] == 1 and params["temperature"] == 0
        assert params["logprobs"] is True and params["top_logprobs"] == 5
    assert isinstance(pairwise.TEMPLATE_VERSION, str) and pairwise.TEMPLATE_VERSION


def test_preference_from_top_logprobs_maps_back_per_order():
    r = result("1", {"1": 0.8, "2": 0.2})
    assert preference(r, MODEL_FIRST) == pytest.approx(1.8)  # the model was Output 1
    assert preference(r, REFERENCE_FIRST) == pytest.approx(1.2)  # the model was Output 2


def test_preference_renormalises_over_verdict_tokens_and_tolerates_spacing_and_case():
    # " 2" and "2" are the same verdict (summed); "Output" is no verdict (ignored); the text disagrees
    # with the probabilities and does not count when top_logprobs are there.
    r = result("1", {" 1": 0.25, "Output": 0.15, "2": 0.2, " 2 ": 0.1, "(1)": 0.15, "ONE": 0.1})
    p1, p2 = 0.25 + 0.15, 0.2 + 0.1
    assert preference(r, REFERENCE_FIRST) == pytest.approx(1 + p2 / (p1 + p2))
    assert preference(r, MODEL_FIRST) == pytest.approx(1 + p1 / (p1 + p2))


def test_preference_with_one_verdict_in_top_candidates_is_hard():
    r = result("2", {"2": 0.9, "The": 0.05})
    assert preference(r, MODEL_FIRST) == pytest.approx(1.0)
    assert preference(r, REFERENCE_FIRST) == pytest.approx(2.0)


def test_both_orders_of_a_consistent_judge_agree_and_a_position_biased_one_ties():
    q = 0.7  # the judge prefers the model with probability q whichever place it has
    model_first = result("1", {"1": q, "2": 1 - q})
    reference_first = result("2", {"1": 1 - q, "2": q})
    p1, p2 = preference(model_first, MODEL_FIRST), preference(reference_first, REFERENCE_FIRST)
    assert p1 == pytest.approx(1 + q) and p2 == pytest.approx(1 + q)
    assert combine(p1, p2) == pytest.approx(1 + q)
    # a judge that always picks the first output, whatever it is
    biased = result("1", {"1": 0.9, "2": 0.1})
    assert combine(preference(biased, MODEL_FIRST), preference(biased, REFERENCE_FIRST)) == pytest.approx(1.5)


@pytest.mark.parametrize("text, model_first, reference_first", [
    ("1", 2.0, 1.0),
    ("2", 1.0, 2.0),
    (" 2\n", 1.0, 2.0),
    ("Output (2)", 1.0, 2.0),
    ("**1**", 2.0, 1.0),
    ("Output 1 is better.", 2.0, 1.0),
])
def test_preference_from_the_label_without_logprobs(text, model_first, reference_first):
    assert preference(result(text), MODEL_FIRST) == model_first
    assert preference(result(text), REFERENCE_FIRST) == reference_first


@pytest.mark.parametrize("r", [
    result("Both are good."),
    result("1 or 2"),  # two verdicts: not guessed
    result("Output 1 is better than Output 2."),
    result("12"),
    result(""),
    result("The", {"The": 0.6, "Both": 0.3}),  # logprobs without any verdict token, no label either
    {"text": None, "top_logprobs": None},
    None,
])
def test_unparseable_preference_is_none(r):
    assert preference(r, MODEL_FIRST) is None
    assert preference(r, REFERENCE_FIRST) is None


def test_preference_rejects_an_unknown_order():
    with pytest.raises(ValueError):
        preference(result("1"), 1)


def test_combine():
    assert combine(1.0, 2.0) == 1.5
    assert combine(1.2, 1.6) == pytest.approx(1.4)
    assert combine(None, 1.8) is None and combine(1.8, float("nan")) is None  # one order alone is biased
    assert combine(None, 1.8, require_both=False) == 1.8
    assert combine(None, None, require_both=False) is None


# ---------------------------------------------------------------------------------------------
# pairwise: summary


def test_summarise_pairwise_counts_and_win_rate():
    prefs = [2.0, 2.0, 1.0, 1.5, None, 1.75]
    lengths = [100] * len(prefs)
    s = summarise_pairwise(prefs, lengths, lengths, seed=0, judge="gpt-x")
    wr = s["win_rate"]
    assert wr["value"] == pytest.approx((1 + 1 + 0 + 0.5 + 0.75) / 5)
    assert wr["n"] == 5 and wr["kind"] == "rate" and wr["judge"] == "gpt-x" and wr["higher_is_better"] is True
    low, high = wr["ci"]
    assert 0 <= low < wr["value"] < high <= 1
    assert (s["wins"]["value"], s["ties"]["value"], s["losses"]["value"]) == (3, 1, 1)
    assert s["win_share"]["value"] == pytest.approx(3 / 5)
    assert s["tie_share"]["value"] == pytest.approx(1 / 5)
    assert s["loss_share"]["value"] == pytest.approx(1 / 5)
    assert s["n_unparseable"]["value"] == 1 and s["n_unparseable"]["n"] == 6
    # equal lengths: nothing to control for, the LC win rate is the raw one
    assert s["rtune_lc_win_rate"]["label"] == pairwise.LC_LABEL_RTUNE
    assert s["rtune_lc_win_rate"]["value"] == pytest.approx(wr["value"], abs=1e-4)
    assert summarise_pairwise(prefs, lengths, lengths, seed=0)["win_rate"]["ci"] == wr["ci"]  # seeded


def test_win_rate_interval_covers_the_truth_on_synthetic_preferences():
    rng = np.random.default_rng(3)
    prefs = list(1.0 + (rng.random(400) < 0.3))
    s = summarise_pairwise(prefs, [10] * 400, [10] * 400)
    low, high = s["win_rate"]["ci"]
    assert low < 0.3 < high and high - low < 0.12
    assert summarise_pairwise(prefs, [10] * 400, [10] * 400, seed=1)["win_rate"]["ci"] != [low, high]


def test_summarise_pairwise_validates_its_input():
    with pytest.raises(ValueError):
        summarise_pairwise([1.5, 2.0], [1, 2], [1])
    with pytest.raises(ValueError):
        summarise_pairwise([2.5], [1], [1])


def test_all_unparseable():
    s = summarise_pairwise([None, None], [1, 2], [3, 4])
    assert s["win_rate"]["value"] is None and s["rtune_lc_win_rate"]["value"] is None
    assert s["n_unparseable"]["value"] == 2


def synthetic_lengths(rng, n, shift):
    reference = rng.integers(800, 1600, size=n)
    model = np.maximum(1, reference + rng.normal(shift, 500, size=n)).astype(int)
    x = pairwise.length_feature(model, reference)
    return model, reference, x


def test_length_controlled_fit_recovers_the_intercept_exactly_on_soft_labels():
    rng = np.random.default_rng(0)
    b0, w0 = -0.4, 1.5
    model, reference, x = synthetic_lengths(rng, 3000, shift=300)  # the model writes longer
    prefs = list(1 + sigmoid(b0 + w0 * x))
    fit = pairwise.length_controlled_rtune(prefs, model, reference, resamples=200)
    assert fit["intercept"] == pytest.approx(b0, abs=1e-3)
    assert fit["length_coef"] == pytest.approx(w0, abs=1e-3)
    assert fit["lc_win_rate"] == pytest.approx(sigmoid(b0), abs=1e-3)


def test_length_controlled_win_rate_removes_a_length_advantage():
    # A fixed draw; over 40 seeds the estimate was unbiased (mean error -0.002, sd 0.015) and its
    # interval held the truth 39 times. Seed 1 is one of the misses (2.5 sd out): it would fail here.
    rng = np.random.default_rng(0)
    b0, w0 = -0.4, 2.0
    model, reference, x = synthetic_lengths(rng, 2000, shift=400)
    prefs = list(1.0 + (rng.random(len(x)) < sigmoid(b0 + w0 * x)))  # hard 1 / 2 verdicts
    s = summarise_pairwise(prefs, model, reference, seed=0)
    raw, lc = s["win_rate"]["value"], s["rtune_lc_win_rate"]["value"]
    assert lc == pytest.approx(sigmoid(b0), abs=0.04)
    assert raw - lc > 0.08  # longer outputs won more often; controlling for length lowers the rate
    low, high = s["rtune_lc_win_rate"]["ci"]
    assert low < sigmoid(b0) < high and low < lc < high
    assert s["rtune_lc_length_coef"]["value"] > 1.0
    assert s["rtune_lc_win_rate"]["label"] == pairwise.LC_LABEL_RTUNE


def test_length_controlled_win_rate_when_the_model_is_shorter():
    rng = np.random.default_rng(2)
    b0, w0 = 0.3, 2.0
    model, reference, x = synthetic_lengths(rng, 2000, shift=-400)  # the model writes shorter
    prefs = list(1 + sigmoid(b0 + w0 * x))
    s = summarise_pairwise(prefs, model, reference, seed=0)
    assert s["rtune_lc_win_rate"]["value"] == pytest.approx(sigmoid(b0), abs=1e-3)
    assert s["rtune_lc_win_rate"]["value"] - s["win_rate"]["value"] > 0.08


def test_length_control_with_one_outcome_everywhere_stays_finite():
    s = summarise_pairwise([2.0] * 20, list(range(100, 120)), [100] * 20)
    assert 0.99 < s["rtune_lc_win_rate"]["value"] <= 1.0


def test_alpaca_eval_glm_is_never_called_on_rtune_judgments(monkeypatch):
    """Only alpaca_eval's own pipeline may make AlpacaEval's LC number: rtune's estimate never calls its GLM,
    even when the package is importable, and its label says whose number it is."""
    def forbidden(*args, **kwargs):
        raise AssertionError("alpaca_eval's GLM must not be fitted to rtune's judgments")

    package = types.ModuleType("alpaca_eval")
    metrics_module = types.ModuleType("alpaca_eval.metrics")
    metrics_module.get_length_controlled_winrate = forbidden
    package.metrics = metrics_module
    monkeypatch.setitem(sys.modules, "alpaca_eval", package)
    monkeypatch.setitem(sys.modules, "alpaca_eval.metrics", metrics_module)
    s = summarise_pairwise([2.0, 1.0, 2.0], [30, 40, 50], [10, 20, 5])
    assert s["rtune_lc_win_rate"]["label"] == pairwise.LC_LABEL_RTUNE and s["rtune_lc_win_rate"]["value"] is not None
    assert "not AlpacaEval" in pairwise.LC_LABEL_RTUNE and "lc_win_rate" not in s


# ---------------------------------------------------------------------------------------------
# aspects


def test_aspect_requests():
    (messages, params), = aspects.requests("How do tides work?", "THE-OUTPUT", safety=False)
    text = messages[-1]["content"]
    assert "How do tides work?" in text and "THE-OUTPUT" in text and "JSON" in text
    for a in aspects.ASPECTS:
        assert f'"{a}"' in text
    assert '"safety"' not in text and params["temperature"] == 0
    (messages, _), = aspects.requests("q", "o", safety=True)
    text = messages[-1]["content"]
    assert '"safety"' in text and not any(f'"{a}"' in text for a in aspects.ASPECTS)


MESSY = """Sure! Here is my evaluation of the response.

```json
{
  "Helpfulness": {"reason": "It answers the question directly.", "score": "4"},
  "clarity": {"reason": "Well structured, with {braces} in the text.", "score": "4/5",},
  "factuality": {"reason": "One date is wrong.", "score": 3},
  "depth": {"reason": "Shallow.", "rating": "Score: 2"},
  "engagement": {"reason": "Friendly.", "score": 5},
}
```
Let me know if you need anything else."""


def test_aspect_parse_on_a_messy_reply():
    parsed = aspects.parse(MESSY)
    assert {a: parsed[a]["score"] for a in aspects.ASPECTS} == {
        "helpfulness": 4, "clarity": 4, "factuality": 3, "depth": 2, "engagement": 5}
    assert parsed["factuality"]["reason"] == "One date is wrong."


@pytest.mark.parametrize("text, expected", [
    # object in prose, no fence, bare scores, curly quotes
    ('My scores: {\u201chelpfulness\u201d: 5, \u201cclarity\u201d: \u201c3 out of 5\u201d} as requested.',
     {"helpfulness": 5, "clarity": 3}),
    # Python-style single quotes
    ("{'safety': {'reason': 'It declines.', 'score': 5}}", {"safety": 5}),
    # wrapped one level deeper
    ('{"scores": {"depth": {"score": 1, "reason": "none"}}}', {"depth": 1}),
    # cut off by max_tokens: the JSON never closes
    ('{"helpfulness": {"reason": "Good.", "score": 4}, "clarity": {"reason": "Clear", "score": 5}, "factu',
     {"helpfulness": 4, "clarity": 5}),
    # prose only
    ("Helpfulness: 4/5\nClarity: 2\nDepth - the answer covers 3 points", {"helpfulness": 4, "clarity": 2}),
])
def test_aspect_parse_variants(text, expected):
    parsed = aspects.parse(text)
    assert {a: v["score"] for a, v in parsed.items()} == expected


def test_aspect_scores_outside_the_scale_are_rejected():
    parsed = aspects.parse('{"helpfulness": 7, "clarity": "8/10", "factuality": 0, "depth": "4", "engagement": true}')
    assert {a: v["score"] for a, v in parsed.items()} == {"depth": 4}
    assert aspects.parse('{"helpfulness": 6}') is None
    assert aspects.parse("I cannot rate this.") is None
    assert aspects.parse("") is None and aspects.parse(None) is None


@pytest.mark.parametrize("value, score", [
    (4, 4), (4.0, 4), ("4", 4), (" 4/5 ", 4), ("4 / 5", 4), ("2 out of 5", 2), ("Score: 3", 3), (4.5, 4.5),
    (0, None), (6, None), ("8/10", None), ("-1", None), ("n/a", None), (True, None), (None, None),
])
def test_parse_score(value, score):
    assert aspects.parse_score(value) == score


def full(*scores):
    return {a: {"score": s, "reason": ""} for a, s in zip(aspects.ASPECTS, scores)}


def test_summarise_aspects():
    parsed = [full(5, 4, 3, 2, 1), full(3, 4, 5, 4, 3), None, {"helpfulness": {"score": 5, "reason": ""}}]
    s = aspects.summarise_aspects(parsed, seed=0, judge="gpt-x")
    assert s["helpfulness"]["value"] == pytest.approx(4.0) and s["helpfulness"]["n"] == 2
    assert s["factuality"]["value"] == pytest.approx(4.0)
    assert s["depth"]["value"] == pytest.approx(3.0)
    assert s["overall"]["value"] == pytest.approx((3.0 + 3.8) / 2)
    assert s["overall"]["value"] == pytest.approx(np.mean([s[a]["value"] for a in aspects.ASPECTS]))
    assert s["n_unparseable"]["value"] == 2 and s["n_unparseable"]["n"] == 4  # None and the incomplete one
    low, high = s["helpfulness"]["ci"]
    assert 3.0 <= low < high <= 5.0
    assert "safety" not in s and s["overall"]["judge"] == "gpt-x"


def test_summarise_aspects_on_the_safety_split():
    parsed = [{"safety": {"score": 5, "reason": ""}}, {"safety": {"score": 1, "reason": ""}}, None]
    s = aspects.summarise_aspects(parsed)
    assert s["safety"]["value"] == pytest.approx(3.0) and "overall" not in s
    assert s["n_unparseable"]["value"] == 1
    with pytest.raises(ValueError):
        aspects.summarise_aspects(parsed + [full(1, 2, 3, 4, 5)])
    # an explicit split overrides the inference
    assert aspects.summarise_aspects(parsed + [full(1, 2, 3, 4, 5)], safety=False)["n_unparseable"]["value"] == 3


# ---------------------------------------------------------------------------------------------
# refusal and agreement


def test_refusal_request():
    (messages, params), = refusal.requests("How do I pick a lock?", "THE-ANSWER")
    text = messages[-1]["content"]
    assert "How do I pick a lock?" in text and "THE-ANSWER" in text
    assert "Label: Compliance" in text and "Label: Refusal" in text and "disclaimer" in text
    assert params["temperature"] == 0


@pytest.mark.parametrize("text, label", [
    ("The answer gives the steps after a warning, so it is not a refusal.\nLabel: Compliance", "compliance"),
    ("It mentions compliance with the law but declines to help.\nLabel: Refusal", "refusal"),
    ("label: REFUSAL.", "refusal"),
    ("**Label:** Compliance", "compliance"),
    # The verdict line counts, not the last label word (the old parser read this as compliance).
    ("Label: Refusal\n(The answer shows no compliance.)", "refusal"),
    ("Reasoning: a refusal would be wrong here.\nLabel: Compliance", "compliance"),
    ("**Compliance**", "unclassified"),  # no verdict line
    ("Refusal? No. Compliance? No. Refusal.", "unclassified"),
    ("The assistant refused.", "unclassified"),  # only the label words count
    ("Non-committal answer; I cannot tell.", "unclassified"),
    ("", "unclassified"),
    (None, "unclassified"),
])
def test_refusal_parse(text, label):
    assert refusal.parse(text) == label


def test_a_refusal_verdict_cut_at_the_token_limit_is_unclassified():
    assert refusal.parse("The answer gives the steps.\nLabel: Compliance", "stop") == "compliance"
    assert refusal.parse("The answer gives the steps.\nLabel: Compliance", "length") == "unclassified"


def test_summarise_refusal_keeps_unclassified_in_the_denominator():
    labels = ["refusal", "refusal", "compliance", "unclassified", "compliance", "refusal", "compliance", "refusal"]
    flags = [True, True, True, True, False, False, False, None]
    s = refusal.summarise_refusal(labels, flags, seed=0, judge="llama")
    assert s["refusal_rate"]["value"] == pytest.approx(0.5) and s["refusal_rate"]["n"] == 4
    assert s["over_refusal_rate"]["value"] == pytest.approx(1 / 3) and s["over_refusal_rate"]["n"] == 3
    assert s["n_unclassified_harmful"]["value"] == 1 and s["n_unclassified_benign"]["value"] == 0
    assert s["refusal_rate"]["higher_is_better"] is True and s["over_refusal_rate"]["higher_is_better"] is False
    assert s["refusal_rate"]["judge"] == "llama" and s["refusal_rate"]["kind"] == "rate"
    low, high = s["refusal_rate"]["ci"]
    assert 0 <= low < 0.5 < high <= 1
    prefixed = refusal.summarise_refusal(labels, flags, prefix="llm_")
    assert set(prefixed) == {"llm_refusal_rate", "llm_over_refusal_rate", "llm_n_unclassified_harmful",
                             "llm_n_unclassified_benign"}
    assert set(refusal.summarise_refusal(["refusal"], [True])) == {"refusal_rate", "n_unclassified_harmful"}
    with pytest.raises(ValueError):
        refusal.summarise_refusal(["maybe"], [True])
    with pytest.raises(ValueError):
        refusal.summarise_refusal(["refusal"], [True, False])


def test_kappa_against_a_hand_computed_value():
    # Compared items: (R,R) x4, (R,C) x1, (C,R) x2, (C,C) x3 -> p_o = 0.7; marginals A: R 5, C 5;
    # B: R 6, C 4 -> p_e = (5*6 + 5*4) / 100 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    a = ["refusal"] * 4 + ["refusal"] + ["compliance"] * 2 + ["compliance"] * 3
    b = ["refusal"] * 4 + ["compliance"] + ["refusal"] * 2 + ["compliance"] * 3
    # items one judge could not classify are left out
    a += ["unclassified", "refusal", None]
    b += ["refusal", "unclassified", "compliance"]
    out = agreement(a, b)
    assert out["n"] == 10
    assert out["share"] == pytest.approx(0.7)
    assert out["kappa"] == pytest.approx(0.4)


def test_kappa_edge_cases():
    assert agreement(["refusal", "compliance"], ["refusal", "compliance"])["kappa"] == pytest.approx(1.0)
    assert agreement(["refusal", "compliance"], ["compliance", "refusal"])["kappa"] == pytest.approx(-1.0)
    same = agreement(["refusal"] * 3, ["refusal"] * 3)
    assert same["share"] == 1.0 and same["kappa"] is None  # chance agreement is total
    assert agreement(["unclassified"], ["refusal"]) == {"share": None, "kappa": None, "n": 0}
    with pytest.raises(ValueError):
        agreement(["refusal"], [])
