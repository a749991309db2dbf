"""An append-only JSONL cache of per-item results: nothing lost, nothing repeated.

Long evaluation jobs (generation, likelihood scores) write each finished item as one line, flushed
and fsync'ed as it arrives, so a run killed at any moment (kill -9 included) keeps every item it
finished, and the next run asks for the missing ones only. On opening, every line is checked: one
that is not a JSON object with the expected fields (a line torn by a kill, a hand edit) is never
trusted: it is counted, dropped from the file (rewritten atomically), and its item is redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rtune.io import write_jsonl_atomic


class JsonlCache:
    """key -> record, stored as lines {"key": ..., **record} in one file."""

    def __init__(self, path: str | os.PathLike, required: dict[str, type | tuple]):
        self.path = Path(path)
        self.required = required  # field -> accepted type(s): a line without them is corrupt
        self.records: dict[str, dict] = {}
        self.corrupt = 0  # lines dropped when the file was opened
        self.added = 0  # records appended by this process
        self._load()

    def _valid(self, row) -> bool:
        return (isinstance(row, dict) and isinstance(row.get("key"), str)
                and all(isinstance(row.get(f), t) for f, t in self.required.items()))

    def _load(self) -> None:
        if not self.path.is_file():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if self._valid(row):
                self.records[row["key"]] = row
            elif line.strip():
                self.corrupt += 1
        if self.corrupt or (text and not text.endswith("\n")):
            # Rewrite without the bad lines, so that appending never extends a torn one.
            write_jsonl_atomic(self.path, self.records.values())

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add_many(self, rows: dict[str, dict]) -> None:
        """Append records (key -> record) and make them durable before returning."""
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for key, record in rows.items():
            row = {"key": key, **record}
            if not self._valid(row):
                raise ValueError(f"record for {key!r} lacks a required field: {sorted(self.required)}")
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            self.records[key] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        self.added += len(rows)
