"""Agreement between two judges' labels on the same items: raw share and Cohen's kappa.

Only items that both judges classified are compared: an item where either label is None or
"unclassified" is left out (n counts the compared items). Labels are any hashable values
("refusal" / "compliance", booleans, ...), compared for equality.

  share = p_o, the share of compared items with equal labels;
  kappa = (p_o - p_e) / (1 - p_e), with p_e = sum over labels k of p_a(k) * p_b(k), each judge's
          marginal share of k over the compared items (Cohen 1960).
share and kappa are None when no item is compared; kappa is None when p_e = 1 (both judges gave one
and the same label to every item: chance agreement is total, kappa is undefined).
No prompt is involved, so there is no TEMPLATE_VERSION here.
"""

from __future__ import annotations

from collections import Counter

UNCLASSIFIED = "unclassified"


def _classified(label) -> bool:
    return label is not None and not (isinstance(label, str) and label == UNCLASSIFIED)


def agreement(labels_a, labels_b) -> dict:
    """{"share", "kappa", "n"} over the items both judges classified."""
    labels_a, labels_b = list(labels_a), list(labels_b)
    if len(labels_a) != len(labels_b):
        raise ValueError(f"{len(labels_a)} labels against {len(labels_b)}")
    pairs = [(a, b) for a, b in zip(labels_a, labels_b) if _classified(a) and _classified(b)]
    n = len(pairs)
    if n == 0:
        return {"share": None, "kappa": None, "n": 0}
    p_o = sum(a == b for a, b in pairs) / n
    count_a = Counter(a for a, _ in pairs)
    count_b = Counter(b for _, b in pairs)
    p_e = sum(count_a[k] * count_b.get(k, 0) for k in count_a) / (n * n)
    kappa = None if abs(1.0 - p_e) < 1e-12 else (p_o - p_e) / (1.0 - p_e)
    return {"share": p_o, "kappa": kappa, "n": n}
