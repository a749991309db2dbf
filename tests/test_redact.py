"""No credential in a URL rtune writes or logs."""

import json

from rtune.redact import REDACTED, redact_text, redact_url


def test_user_info_and_secret_query_values_are_removed():
    assert redact_url("https://user:sk-secret@host.example/v1") == "https://host.example/v1"
    url = redact_url("https://h.example/openai?api-version=2024-02-01&api-key=sk-123&token=abc")
    assert "sk-123" not in url and "abc" not in url and "api-version=2024-02-01" in url and REDACTED in url
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert "sk-1" not in redact_text("error at https://u:sk-1@h/v1: refused", "https://u:sk-1@h/v1")


def test_eval_json_and_summaries_never_hold_the_judge_credentials(tmp_path, tiny_model_path, capsys):
    from rtune.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "Say hello."}) + "\n")
    out = tmp_path / "eval"
    # An endpoint nobody listens on: every judgment fails, and everything is still written.
    url = "http://judge-user:sk-TOPSECRET@127.0.0.1:9/v1?api-key=sk-ALSOSECRET"
    args = ["eval", str(tiny_model_path), "--bench", str(prompts), "--out", str(out), "--max-new-tokens", "3",
            "--dtype", "fp32", "--no-relevance", "--judge-url", url, "--judge-model", "m", "--judge", "refusal",
            "--judge-timeout", "1"]
    main(args)
    captured = capsys.readouterr()
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    for text in (written, captured.out, captured.err):
        assert "TOPSECRET" not in text and "ALSOSECRET" not in text
    assert "127.0.0.1:9/v1" in json.loads((out / "eval.json").read_text())["judge"]["url"]
