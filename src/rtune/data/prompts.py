"""Prompt files -> prompts `{"id", "instruction"}`: what generation and evaluation answer.

JSONL (one object per line), a JSON list, or .txt (one prompt per line). An object gives its text
as "instruction" (or "prompt") and may give an "id"; records without one get their position.
Errors name `path:line` and the field at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

from rtune.errors import DataError, RtuneError


def _prompt_record(obj, where: str, index: int) -> dict:
    if isinstance(obj, str):
        obj = {"instruction": obj}
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with 'instruction' (or 'prompt'), got {type(obj).__name__}")
    text = obj.get("instruction", obj.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: missing or empty 'instruction' (or 'prompt')")
    rid = obj.get("id", index)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {rid!r}")
    return {"id": str(rid), "instruction": text}


def read_prompts(path: str) -> list[dict]:
    """Prompts as [{"id", "instruction"}] from JSONL, a JSON list, or .txt (one prompt per line).

    Records without an id get their position (0, 1, ...) as id. Errors name `path:line`.
    """
    p = Path(path)
    if not p.is_file():
        raise RtuneError(f"{path}: prompt file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})")
    prompts: list[dict] = []
    lines: list[int] = []  # source line of each prompt, for the duplicate-id error
    if p.suffix == ".txt":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                prompts.append({"id": str(len(prompts)), "instruction": line})
                lines.append(n)
    elif p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of prompt records")
        for i, obj in enumerate(data):
            prompts.append(_prompt_record(obj, f"{path}: item {i}", i))
            lines.append(i)
    else:  # JSONL (.jsonl, or any other name)
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})")
            prompts.append(_prompt_record(obj, f"{path}:{n}", len(prompts)))
            lines.append(n)
    if not prompts:
        raise DataError(f"{path}: no prompts found")
    seen: dict[str, int] = {}
    for rec, n in zip(prompts, lines):
        if rec["id"] in seen:
            raise DataError(f"{path}:{n}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
        seen[rec["id"]] = n
    return prompts
