"""Human ratings of an evaluation folder: blind pairwise verdicts and acceptability.

    EVAL_DIR/human/<rater>.jsonl    one line per rating, appended (fsync'ed) as it is given

A rating compares two models' answers to one item of the evaluation (EVAL_DIR/results/<model>/
<bench>/items.jsonl), shown as A (left) and B (right) in an order the rater did not choose:

    {"rater": "ann", "bench": "alpacaeval", "id": "12", "a": "rt", "b": "it",
     "winner": "rt" | "it" | "tie", "acceptable": {"rt": true, "it": false}, "time": "..."}

"a" and "b" name the models behind A and B (the rater saw neither name). A rater who rates the same
item of the same pair again adds a line; readers keep the last (`read_ratings`). A line that is not a
valid rating (one torn by a crash mid-write, a hand edit) is skipped and counted, never trusted.
Rater names are `RATER_NAME` ([A-Za-z0-9_-]{1,64}), so a rater's file can only be a plain file in
EVAL_DIR/human/.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from rtune.errors import RtuneError

HUMAN = "human"
RATER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TIE = "tie"


def check_rater(name) -> str:
    if not isinstance(name, str) or not RATER_NAME.fullmatch(name):
        raise RtuneError("a rater name is 1 to 64 letters, digits, '_' or '-'")
    return name


def rater_file(eval_dir: str | Path, rater: str) -> Path:
    return Path(eval_dir) / HUMAN / f"{check_rater(rater)}.jsonl"


def pair_key(rating: dict) -> tuple:
    """What a later rating of the same item replaces: (rater, bench, id, the two models unordered)."""
    return rating["rater"], rating["bench"], rating["id"], *sorted((rating["a"], rating["b"]))


def _valid(row) -> bool:
    if not isinstance(row, dict):
        return False
    if not all(isinstance(row.get(k), str) for k in ("rater", "bench", "id", "a", "b", "winner")):
        return False
    acceptable = row.get("acceptable")
    return (row["a"] != row["b"] and row["winner"] in (row["a"], row["b"], TIE) and isinstance(acceptable, dict)
            and set(acceptable) == {row["a"], row["b"]} and all(isinstance(v, bool) for v in acceptable.values()))


def append_rating(eval_dir: str | Path, rating: dict) -> Path:
    """Append one rating to its rater's file and fsync it before returning."""
    if not _valid(rating):
        raise RtuneError(f"not a valid rating: {rating!r}")
    path = rater_file(eval_dir, rating["rater"])
    folder = path.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_dir(folder.parent)
    line = json.dumps({**rating, "time": rating.get("time") or time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                      ensure_ascii=False) + "\n"
    new = not path.exists()
    # O_APPEND: one write() per line, so a line is never interleaved with another.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        _fsync_dir(folder)  # the new file's name is durable too
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder
    finally:
        os.close(fd)


def read_rater(path: str | Path) -> tuple[list[dict], int]:
    """(ratings in file order, the last per item kept; lines skipped as invalid) of one rater's file."""
    kept: dict[tuple, dict] = {}
    skipped = 0
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not _valid(row):
            skipped += 1
            continue
        key = pair_key(row)
        kept.pop(key, None)  # a re-rating moves to the end: the order is the order of the last word
        kept[key] = row
    return list(kept.values()), skipped


def read_ratings(eval_dir: str | Path) -> tuple[list[dict], int]:
    """(every rater's ratings, the last per item kept; invalid lines skipped) of EVAL_DIR/human/."""
    folder = Path(eval_dir) / HUMAN
    out, skipped = [], 0
    if not folder.is_dir():
        return out, 0
    for path in sorted(folder.glob("*.jsonl")):
        if not RATER_NAME.fullmatch(path.stem):
            continue
        rows, bad = read_rater(path)
        # The file names the rater: a line claiming another rater is not trusted.
        good = [r for r in rows if r["rater"] == path.stem]
        out += good
        skipped += bad + len(rows) - len(good)
    return out, skipped
