"""The append-only cache: records survive a reopen, torn and corrupt lines are dropped and counted."""

import json

import pytest

from rtune.eval.cache import JsonlCache

FIELDS = {"output": str, "num_tokens": int}


def test_records_survive_reopen(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = JsonlCache(path, FIELDS)
    cache.add_many({"a": {"output": "x", "num_tokens": 1}, "b": {"output": "y", "num_tokens": 2}})
    again = JsonlCache(path, FIELDS)
    assert "a" in again and again.get("b")["output"] == "y" and again.corrupt == 0
    assert len(path.read_text().splitlines()) == 2


def test_torn_and_corrupt_lines_are_dropped_counted_and_never_trusted(tmp_path):
    path = tmp_path / "c.jsonl"
    good = json.dumps({"key": "a", "output": "x", "num_tokens": 1})
    wrong_type = json.dumps({"key": "b", "output": "y", "num_tokens": "2"})
    missing = json.dumps({"key": "c", "output": "z"})
    path.write_text("\n".join([good, wrong_type, "not json", missing, '{"key": "d", "outp']))  # torn last line
    cache = JsonlCache(path, FIELDS)
    assert set(cache.records) == {"a"} and cache.corrupt == 4
    # The file was rewritten without them, so appending does not extend a torn line.
    assert path.read_text() == good + "\n"
    cache.add_many({"d": {"output": "w", "num_tokens": 3}})
    assert set(JsonlCache(path, FIELDS).records) == {"a", "d"}


def test_a_record_without_required_fields_is_refused(tmp_path):
    cache = JsonlCache(tmp_path / "c.jsonl", FIELDS)
    with pytest.raises(ValueError, match="required field"):
        cache.add_many({"a": {"output": "x"}})
    assert not (tmp_path / "c.jsonl").exists()
