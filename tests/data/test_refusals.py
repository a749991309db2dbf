"""rtune.data.refusals: the paper's filter, seeded sampling, sources, errors, the shipped set, the CLI."""

import hashlib
import io
import json
import re
import time
import urllib.error
from collections import Counter

import pytest

from rtune.cli import main
from rtune.data import refusals
from rtune.data.refusals import (
    builtin_refusal_rows,
    load_refusals,
    mix_refusals,
    mix_refusals_file,
    passes_paper_filter,
)
from rtune.data.sources import read_records
from rtune.errors import DataError, RtuneError

TRAINING = [{"id": f"train-{i}", "instruction": f"Question {i}?", "response": f"Answer {i}.", "source": "alpaca-demo"}
            for i in range(5)]

# Hand-made refusals: which pass the paper's filter is decided by whole words "ai" / "sorry" only.
REFUSAL_ROWS = [
    {"instruction": "Do harm 1.", "response": "I'm sorry, I can't help with that."},  # pass
    {"instruction": "Do harm 2.", "response": "As an AI model, I won't do this."},  # pass
    {"instruction": "Do harm 3.", "response": "SORRY! That is not something I do."},  # pass: any case
    {"instruction": "Do harm 4.", "response": "AI-generated plans like this hurt people."},  # pass: hyphen is a boundary
    {"instruction": "Do harm 5.", "response": "I said no; please maintain respect."},  # fail: 'ai' inside words
    {"instruction": "Do harm 6.", "response": "I won't help. Sorrys are cheap."},  # fail: 'sorrys' is another word
    {"instruction": "Do harm 7.", "response": "No. I cannot assist with this request."},  # fail
    {"instruction": "Do harm 8.", "response": "That would be unkind; I decline."},  # fail
]
PASSING = 4


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def refusal_file(tmp_path):
    return write_jsonl(tmp_path / "my_refusals.jsonl", REFUSAL_ROWS)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty rtune home (nothing cached), and any download attempt fails at once."""
    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))
    calls = []

    def fail(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(refusals.urllib.request, "urlopen", fail)
    return calls


# ---------------------------------------------------------------------------------------------
# The filter, sampling, sources


def test_paper_filter_is_whole_word_and_case_insensitive():
    assert [passes_paper_filter(r["response"]) for r in REFUSAL_ROWS] == [True] * PASSING + [False] * 4


def test_filter_counts_on_a_hand_made_file(refusal_file):
    mixed, counts = mix_refusals(TRAINING, refusal_file, 3, filter="paper")
    assert (counts["read"], counts["kept"], counts["after_filter"], counts["sampled"]) == (8, 8, PASSING, 3)
    assert counts["training"] == 5 and counts["total"] == 8 and len(mixed) == 8
    assert all(passes_paper_filter(r["response"]) for r in mixed[5:])

    # A file's default filter is none: all eight are in the pool.
    _, counts = mix_refusals(TRAINING, refusal_file, 8)
    assert counts["filter"] == "none" and counts["after_filter"] == 8 and counts["sampled"] == 8


def test_seed_reproduces_the_sample_and_another_seed_changes_it():
    first, _ = mix_refusals(TRAINING, "builtin", 20, seed=0)
    again, _ = mix_refusals(TRAINING, "builtin", 20, seed=0)
    other, _ = mix_refusals(TRAINING, "builtin", 20, seed=1)
    ids = [r["id"] for r in first[5:]]
    assert ids == [r["id"] for r in again[5:]]
    assert ids != [r["id"] for r in other[5:]]
    assert len(set(ids)) == 20  # drawn without replacement


def test_training_records_come_first_unchanged_and_every_record_keeps_its_source(refusal_file):
    mixed, _ = mix_refusals(TRAINING, refusal_file, 4)
    assert mixed[:5] == TRAINING
    assert {r["source"] for r in mixed[5:]} == {"refusals:my_refusals.jsonl"}
    builtin, _ = mix_refusals(TRAINING, "builtin", 3)
    assert {r["source"] for r in builtin[5:]} == {"refusals:builtin"}
    assert all(r["id"].startswith("refusal-builtin-") for r in builtin[5:])


def test_n_larger_than_the_filtered_pool_names_both_numbers(refusal_file):
    with pytest.raises(RtuneError) as e:
        mix_refusals(TRAINING, refusal_file, 5, filter="paper")
    assert "--n 5" in str(e.value) and f"the {PASSING} refusals left after --filter paper" in str(e.value)
    assert "8 before filtering" in str(e.value)


def test_n_zero_returns_the_records_without_reading_the_source(tmp_path):
    mixed, counts = mix_refusals(TRAINING, tmp_path / "absent.jsonl", 0)
    assert mixed == TRAINING and counts["sampled"] == 0 and counts["after_filter"] is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_n_must_be_a_whole_number(bad):
    with pytest.raises(RtuneError, match="--n must be a whole number"):
        mix_refusals(TRAINING, "builtin", bad)


def test_unknown_filter_and_method_are_errors():
    with pytest.raises(RtuneError, match="unknown --filter 'strict'"):
        mix_refusals(TRAINING, "builtin", 1, filter="strict")
    with pytest.raises(RtuneError, match="unknown method 'sft'"):
        mix_refusals(TRAINING, "builtin", 1, method="sft")


def test_a_responses_only_file_mixes_for_rt_but_is_an_error_for_it(tmp_path):
    path = write_jsonl(tmp_path / "responses.jsonl", [{"response": r["response"]} for r in REFUSAL_ROWS])
    mixed, _ = mix_refusals(TRAINING, path, 2, method="rt")
    assert [r["instruction"] for r in mixed[5:]] == ["", ""]
    with pytest.raises(RtuneError) as e:
        mix_refusals(TRAINING, path, 2, method="it")
    assert str(path) in str(e.value) and "responses only" in str(e.value) and "--method it" in str(e.value)


def test_an_empty_instruction_is_an_error_for_it_naming_file_line_and_field(tmp_path):
    rows = [dict(r) for r in REFUSAL_ROWS]
    rows[2]["instruction"] = "  "
    path = write_jsonl(tmp_path / "gap.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path}:3: field 'instruction' is empty")):
        mix_refusals(TRAINING, path, 2, method="it")
    mixed, _ = mix_refusals(TRAINING, path, 8, method="rt")  # RT trains on responses alone
    assert len(mixed) == 13


def test_csv_and_json_list_refusal_files(tmp_path):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("prompt,output\nDo harm.,\"I'm sorry, no.\"\nDo more harm.,I cannot.\n", encoding="utf-8")
    mixed, counts = mix_refusals(TRAINING, csv_path, 2, method="it")
    assert [r["instruction"] for r in mixed[5:]] == ["Do harm.", "Do more harm."] and counts["kept"] == 2
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps(REFUSAL_ROWS[:3], indent=2), encoding="utf-8")
    mixed, _ = mix_refusals(TRAINING, json_path, 3, filter="paper")
    assert [r["response"] for r in mixed[5:]] == [r["response"] for r in REFUSAL_ROWS[:3]]


def test_a_bad_refusal_file_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "response": "I\'m sorry."}\n{"instruction": "y", "response": 3}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'response' must be a string")):
        mix_refusals(TRAINING, path, 1)


def test_an_id_shared_by_a_refusal_and_a_training_record_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": "train-3", "instruction": "x", "response": "I'm sorry."}])
    with pytest.raises(DataError, match="duplicate id 'train-3'"):
        mix_refusals(TRAINING, path, 1)


# ---------------------------------------------------------------------------------------------
# safety-tuned-llamas: offline it fails fast and clearly; online the download is pinned and cached


def test_safety_tuned_llamas_with_hf_hub_offline_fails_before_any_download(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RtuneError) as e:
        mix_refusals(TRAINING, "safety-tuned-llamas", 100)
    assert time.monotonic() - start < 5 and no_network == []
    message = str(e.value)
    assert "HF_HUB_OFFLINE" in message and "--refusals builtin" in message and refusals.STL_URL in message


def test_safety_tuned_llamas_without_network_is_a_clear_error_with_a_timeout(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(RtuneError) as e:
        mix_refusals(TRAINING, "safety-tuned-llamas", 100)
    assert "could not download" in str(e.value) and "Name or service not known" in str(e.value)
    assert "--refusals builtin" in str(e.value)
    assert no_network == [(refusals.STL_URL, refusals.DOWNLOAD_TIMEOUT_S)]  # a blocked network cannot hang it


def test_safety_tuned_llamas_download_is_verified_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("RTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    # The authors' format: a JSON list of {instruction, input, output}.
    rows = [{"instruction": f"Bad {i}.", "input": "", "output": "I'm sorry, no." if i % 2 else "No."} for i in range(6)]
    payload = json.dumps(rows).encode()
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(refusals.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(refusals, "STL_SHA256", "0" * 64)
    with pytest.raises(RtuneError, match="has SHA-256"):
        mix_refusals(TRAINING, "safety-tuned-llamas", 1)
    assert not (tmp_path / "home" / "data" / refusals.STL_CACHE_NAME).exists()

    monkeypatch.setattr(refusals, "STL_SHA256", hashlib.sha256(payload).hexdigest())
    mixed, counts = mix_refusals(TRAINING, "safety-tuned-llamas", 3, method="it")
    assert counts["filter"] == "paper" and (counts["read"], counts["after_filter"]) == (6, 3)
    assert {r["source"] for r in mixed[5:]} == {"refusals:safety-tuned-llamas"}
    mix_refusals(TRAINING, "safety-tuned-llamas", 3)
    assert len(calls) == 2  # the failed try and the good one; the third call read the cache


# ---------------------------------------------------------------------------------------------
# The shipped set


def test_builtin_set_size_filter_pass_and_categories():
    records, stats = load_refusals("builtin", method="it")
    assert stats["read"] == len(records) >= 150
    assert sum(passes_paper_filter(r["response"]) for r in records) >= 100
    rows = [row for _, row in builtin_refusal_rows()]
    categories = Counter(row["category"] for row in rows)
    assert len(categories) >= 12 and min(categories.values()) >= 3
    for needed in ("violence", "weapons", "cybercrime", "fraud", "drugs", "self-harm", "harassment", "privacy",
                   "hate", "sexual-minors"):
        assert categories[needed] >= 5, needed
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({row["instruction"].lower() for row in rows}) == len(rows)
    assert len({row["response"] for row in rows}) == len(rows)


def test_builtin_refusals_read_as_refusals_and_vary_in_form():
    from rtune.eval.metrics.refusal import is_refusal

    rows = [row for _, row in builtin_refusal_rows()]
    assert [row["id"] for row in rows if not is_refusal(row["response"])] == []
    # Not one template: many different openings and a spread of lengths.
    openings = Counter(" ".join(row["response"].split()[:3]) for row in rows)
    assert len(openings) >= 20 and openings.most_common(1)[0][1] <= len(rows) // 3
    lengths = sorted(len(row["response"]) for row in rows)
    assert lengths[-1] >= 2 * lengths[0]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("\u2019", "").replace("'", ""))


def _grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture(scope="module")
def harmful_prompts(rtune_cache_home):
    from rtune.eval.benchmarks import load_benchmark

    return {name: [item.prompt for item in load_benchmark(name).items] for name in ("advbench", "harmbench", "strongreject")}


def test_builtin_refusals_do_not_copy_the_harmful_benchmarks(harmful_prompts):
    rows = [row for _, row in builtin_refusal_rows()]
    for name, prompts in harmful_prompts.items():
        assert len(prompts) > 200, name
        exact = {" ".join(_words(p)) for p in prompts}
        grams = set().union(*(_grams(p) for p in prompts))
        for row in rows:
            for field in ("instruction", "response"):
                assert " ".join(_words(row[field])) not in exact, (name, row["id"], field)
                shared = _grams(row[field]) & grams
                assert not shared, (name, row["id"], field, shared)


def test_the_overlap_check_would_catch_a_copy(harmful_prompts):
    prompt = harmful_prompts["advbench"][0]
    assert " ".join(_words(prompt.upper() + "!")) in {" ".join(_words(p)) for p in harmful_prompts["advbench"]}
    near_copy = "Please, " + prompt + " today"
    assert _grams(near_copy) & _grams(prompt)


# ---------------------------------------------------------------------------------------------
# The file API and the CLI


def test_mix_refusals_file_writes_atomically_and_reads_back(tmp_path, refusal_file):
    data = write_jsonl(tmp_path / "train.jsonl", TRAINING)
    out = tmp_path / "out" / "mixed.jsonl"
    summary = mix_refusals_file(data, out, refusal_file, 3, seed=0)
    assert summary["sampled"] == 3 and len(read_records(out)) == 8
    before = out.read_bytes()
    with pytest.raises(RtuneError):
        mix_refusals_file(data, out, refusal_file, 99)
    assert out.read_bytes() == before  # a failed run leaves the earlier output as it was
    assert [p.name for p in out.parent.iterdir()] == ["mixed.jsonl"]  # and no temporary file


def test_cli_end_to_end(tmp_path, capsys, refusal_file):
    data = write_jsonl(tmp_path / "train.jsonl", TRAINING)
    out = tmp_path / "mixed.jsonl"
    code = main(["data", "mix-refusals", str(data), "--refusals", str(refusal_file), "--n", "3", "--seed", "7",
                 "--filter", "paper", "--method", "it", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "8 refusals, 4 after --filter paper, 3 sampled (seed 7) and appended to 5 training records" in captured.err
    summary = json.loads(captured.out)
    assert (summary["read"], summary["after_filter"], summary["sampled"], summary["total"]) == (8, 4, 3, 8)
    records = read_records(out)
    assert [r["source"] for r in records] == ["alpaca-demo"] * 5 + ["refusals:my_refusals.jsonl"] * 3
    again = tmp_path / "again.jsonl"
    main(["data", "mix-refusals", str(data), "--refusals", str(refusal_file), "--n", "3", "--seed", "7",
          "--filter", "paper", "--method", "it", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()

    # Errors: one line, exit status 2, nothing written.
    code = main(["data", "mix-refusals", str(data), "--refusals", str(refusal_file), "--n", "5", "--filter", "paper",
                 "--out", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "--n 5 is more than the 4 refusals left" in err and not (tmp_path / "none.jsonl").exists()


def test_cli_builtin_default_filter_is_paper(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", TRAINING)
    code = main(["data", "mix-refusals", str(data), "--refusals", "builtin", "--n", "100",
                 "--out", str(tmp_path / "m.jsonl")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["filter"] == "paper" and summary["after_filter"] < summary["kept"]
