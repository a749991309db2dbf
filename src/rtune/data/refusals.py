"""Refusal mixtures: append N refusal examples to training records (the paper's safety experiment).

The paper mixes N refusals (N = 0/100/200/500) into 1,000 training records. Its refusals come from
the safety-only data of Bianchi et al. (safety-tuned-llamas), kept only when the response contains
the whole word "ai" or "sorry" (PAPER_FILTER), and N are sampled with seed 0. RT trains on their
responses alone, IT on the instruction-response pairs.

Refusal sources (`refusals`):
    safety-tuned-llamas   the authors' file on GitHub, pinned to a commit and SHA-256, cached under
                          rtune_home()/data; needs internet (offline: an RtuneError saying what to do)
    builtin               rtune's own set, shipped with the package (builtin_refusals.yaml): written
                          for this project, not taken from any dataset
    a local file          .jsonl/.json/.csv(/.parquet) with a response field, and an instruction
                          field for IT (read by rtune.data.sources, so errors name path:line and field)

`--filter paper` is the default for the two named sources, `--filter none` for a file. Every mixed
record keeps its origin in `source` ("refusals:<src>"); training records keep theirs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from rtune.data.sources import (
    _build_records,
    _check_unique_id,
    _is_int,
    _read_file_rows,
    _resolve_fields,
    _string_field,
    read_records,
)
from rtune.errors import DataError, RtuneError
from rtune.io import atomic_path, sha256_file, write_jsonl_atomic
from rtune.paths import rtune_home
from rtune.render.renderer import METHODS

logger = logging.getLogger("rtune")

SAFETY_TUNED_LLAMAS = "safety-tuned-llamas"
BUILTIN = "builtin"
NAMED_SOURCES = (SAFETY_TUNED_LLAMAS, BUILTIN)  # these names win over a local file of the same name
FILTERS = ("paper", "none")

# The authors' rule (generate_safety_mixture.py in their repository), case-insensitive.
PAPER_FILTER = re.compile(r"\b(ai|sorry)\b", re.IGNORECASE)

# Bianchi et al. 2024, "Safety-Tuned LLaMAs": 2,483 records (instruction, input, output), 1,829 pass
# the paper's filter. Data license CC BY-NC 4.0, so rtune downloads it instead of shipping it.
STL_COMMIT = "3ce5779d564ec1f3d87b0bef87261328c8abbd25"
STL_URL = (f"https://raw.githubusercontent.com/vinid/safety-tuned-llamas/{STL_COMMIT}/"
           "data/training/safety_only_data_Instructions.json")
STL_SHA256 = "7dde08acf87f10cf74fd1b76f56538eae8e413ae8e6b09e3f7bcd97769058dbe"
STL_CACHE_NAME = "safety_only_data_Instructions.json"
STL_FIELDS = {"instruction": "instruction", "input": "input", "input_required": False, "response": "output", "id": None}
DOWNLOAD_TIMEOUT_S = 30  # a blocked network must fail, not hang

BUILTIN_FILE = Path(__file__).with_name("builtin_refusals.yaml")
BUILTIN_FIELDS = ("id", "category", "instruction", "response")
_OFFLINE_VALUES = {"1", "on", "yes", "true"}  # as huggingface_hub reads HF_HUB_OFFLINE


# ---------------------------------------------------------------------------------------------
# Public API


def passes_paper_filter(response: str) -> bool:
    """The paper's filter: the response contains the whole word "ai" or "sorry", in any case."""
    return PAPER_FILTER.search(response) is not None


def load_refusals(refusals: str | os.PathLike, method: str = "rt") -> tuple[list[dict], dict]:
    """Refusal records `{"id", "instruction", "response", "source"}` from a named source or a file.

    Returns `(records, stats)` with `read` (rows in the source) and `kept` (rows with a response).
    For `method="it"` every refusal needs an instruction: a responses-only file is an error.
    """
    _check_method(method)
    name = os.fspath(refusals)
    source = f"refusals:{name}" if name in NAMED_SOURCES else f"refusals:{Path(name).name}"
    if name == BUILTIN:
        # Prefixed so that a refusal's id cannot clash with a training record's.
        rows = [(where, {**row, "id": f"refusal-builtin-{row['id']}"}) for where, row in builtin_refusal_rows()]
        fields = {"instruction": "instruction", "input": "input", "input_required": False,
                  "response": "response", "id": "id"}
        label = str(BUILTIN_FILE)
    elif name == SAFETY_TUNED_LLAMAS:
        path = safety_tuned_llamas_path()
        rows, fields, label = _read_file_rows(path), STL_FIELDS, str(path)
    else:
        path = Path(name)
        rows = _read_file_rows(path)
        fields = _resolve_fields(rows[0], {"instruction": None, "input": None, "response": None, "id": None})
        label = str(path)
        if fields["instruction"] is None and method == "it":
            raise RtuneError(
                f"{label}: responses only (no 'instruction' or 'prompt' field), so it cannot be mixed for "
                f"--method it, which trains on instruction-response pairs: use --method rt, or a file with "
                f"an instruction for every refusal"
            )
    if method == "it":
        _check_instructions(rows, fields)
    records, stats = _build_records(rows, fields, id_prefix=_id_prefix(name), source_name=source, strict=False)
    if not records:
        raise DataError(f"{label}: no refusal has a non-empty response")
    return records, {"read": stats["read"], "kept": stats["kept"]}


def mix_refusals(
    records: list[dict],
    refusals: str | os.PathLike,
    n: int,
    seed: int = 0,
    filter: str | None = None,
    method: str = "rt",
) -> tuple[list[dict], dict]:
    """Append `n` refusals, drawn with `random.Random(seed)` after `filter`, to `records`.

    `filter` None means the source's default: "paper" for safety-tuned-llamas and builtin, "none"
    for a file. The sample keeps the source's order. `n = 0` returns the records unchanged and does
    not read the source (so the N = 0 cell of a grid needs no network). Returns `(records, counts)`.
    """
    if not _is_int(n) or n < 0:
        raise RtuneError(f"--n must be a whole number >= 0, got {n!r}")
    if not _is_int(seed):
        raise RtuneError(f"--seed must be a whole number, got {seed!r}")
    _check_method(method)
    name = os.fspath(refusals)
    if filter is None:
        filter = "paper" if name in NAMED_SOURCES else "none"
    if filter not in FILTERS:
        raise RtuneError(f"unknown --filter {filter!r}: choose one of {', '.join(FILTERS)}")

    counts = {"refusals": name, "filter": filter, "method": method, "seed": seed, "n": n,
              "training": len(records), "read": None, "kept": None, "after_filter": None, "sampled": 0}
    if n == 0:
        counts["total"] = len(records)
        return list(records), counts

    pool, stats = load_refusals(name, method)
    if filter == "paper":
        pool = [r for r in pool if passes_paper_filter(r["response"])]
    counts.update(read=stats["read"], kept=stats["kept"], after_filter=len(pool))
    if n > len(pool):
        raise RtuneError(
            f"{name}: --n {n} is more than the {len(pool)} refusals left after --filter {filter} "
            f"({stats['kept']} before filtering)"
        )
    chosen = sorted(random.Random(seed).sample(range(len(pool)), n))
    sampled = [pool[i] for i in chosen]

    seen = {}
    for index, record in enumerate(records):
        _check_unique_id(record["id"], f"training record {index + 1}", seen)
    for record in sampled:
        # An id shared with a training record would make the output unreadable by read_records.
        _check_unique_id(record["id"], f"refusal from {name}", seen)

    counts.update(sampled=n, total=len(records) + n)
    return [*records, *sampled], counts


def mix_refusals_file(
    data: str | os.PathLike,
    out: str | os.PathLike,
    refusals: str | os.PathLike,
    n: int,
    *,
    seed: int = 0,
    filter: str | None = None,
    method: str = "rt",
) -> dict:
    """`rtune data mix-refusals`: read prepared records, mix, write `out` atomically; returns a summary."""
    records = read_records(data)
    mixed, counts = mix_refusals(records, refusals, n, seed=seed, filter=filter, method=method)
    write_jsonl_atomic(out, mixed)
    return {"data": os.fspath(data), "out": os.fspath(out), **counts, "sha256": sha256_file(out)}


def builtin_refusal_rows() -> list[tuple[str, dict]]:
    """rtune's own refusals as (location, row) pairs, each row checked for its four string fields."""
    try:
        data = yaml.safe_load(BUILTIN_FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{BUILTIN_FILE}: cannot read the built-in refusals: {e}") from e
    entries = data.get("refusals") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{BUILTIN_FILE}: no 'refusals' list")
    rows = []
    for number, entry in enumerate(entries, start=1):
        where = f"{BUILTIN_FILE}: refusal {number}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: not a mapping")
        for field in BUILTIN_FIELDS:
            if not _string_field(entry, field, where).strip():
                raise DataError(f"{where}: field '{field}' is empty")
        rows.append((where, entry))
    return rows


def safety_tuned_llamas_path() -> Path:
    """The cached, verified safety-tuned-llamas refusal file; downloaded from GitHub on first use."""
    cached = rtune_home() / "data" / STL_CACHE_NAME
    if cached.is_file() and sha256_file(cached) == STL_SHA256:
        return cached
    what_to_do = (
        "Without internet, use --refusals builtin (rtune's own refusals), or download "
        f"{STL_URL} elsewhere and pass the file as --refusals FILE --filter paper"
    )
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(v, "").strip().lower() in _OFFLINE_VALUES]
    if offline:
        raise RtuneError(f"{SAFETY_TUNED_LLAMAS}: not cached, and {offline[0]} is set, so it is not downloaded. "
                         + what_to_do)
    logger.info("downloading the safety-tuned-llamas refusals from %s", STL_URL)
    try:
        with urllib.request.urlopen(STL_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:  # no network, DNS, timeout, HTTP error
        reason = getattr(e, "reason", None) or e
        raise RtuneError(f"{SAFETY_TUNED_LLAMAS}: could not download {STL_URL} ({type(e).__name__}: {reason}). "
                         + what_to_do) from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != STL_SHA256:
        raise RtuneError(f"{SAFETY_TUNED_LLAMAS}: the download from {STL_URL} has SHA-256 {digest}, "
                         f"expected {STL_SHA256}")
    with atomic_path(cached) as tmp:
        tmp.write_bytes(data)
    return cached


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise RtuneError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def _check_instructions(rows: list[tuple[str, object]], fields: dict) -> None:
    """IT trains on pairs: a refusal with a response but no instruction cannot be used."""
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: record is not a JSON object")
        response = _string_field(row, fields["response"], where)
        instruction = _string_field(row, fields["instruction"], where)
        if response.strip() and not instruction.strip():
            raise DataError(f"{where}: field '{fields['instruction']}' is empty, and --method it needs an "
                            f"instruction for every refusal (use --method rt to train on responses alone)")


def _id_prefix(name: str) -> str:
    return f"refusal-{name}" if name in NAMED_SOURCES else f"refusal-{Path(name).stem}"
