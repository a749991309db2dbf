"""Reference-based quality: how close an output comes to the reference response of its item.

Format heuristics ("answered": ends, does not echo, does not write an instruction) cannot tell a
good answer from a fluent wrong one; where items have references (the held-out file of
`rtune data prepare --holdout`), rtune puts these beside them:

    rouge_l               ROUGE-L F1 of output against reference, from Google's `rouge-score`
                          package (the implementation the field cites), Porter stemming on
    reference_similarity  cosine of the MiniLM embeddings of output and reference
                          (rtune.eval.metrics.relevance; computed in rtune.eval.run)

Both are coarse (a correct answer worded differently scores low), but they move with content,
which is what the heuristics miss.
"""

from __future__ import annotations

_SCORER = None


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]; 0 for an empty output."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, output)["rougeL"].fmeasure)
