"""The pages in a real browser: Debian's headless chromium, driven by playwright, against rtune serve with
two tiny models. Chat: one prompt streams into both panes, and a reply holding <script> or an <img
onerror> is shown as text and never runs. Rating: three items rated blind (keys and clicks), the JSONL
holds exactly those ratings with the models behind A and B, and a reload resumes where the rater
stopped. The API key is asked once and sent as a Bearer header, never in a URL.

No skip: without chromium (apt-get install -y chromium) or playwright the test fails, as CI must."""

import json
import os
import shutil

import pytest
import torch

import tiny
from eval_fixture import write_eval_dir
from rtune.serve.app import create_app
from rtune.serve.server import ServerThread
from rtune.serve.specs import load_engines, parse_model_spec

KEY = "page-key-42"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
REPLIES = {  # each model writes exactly this (tiny.ScriptedReply)
    "one": "<script>window.__pwned = 1</script>Hello from one, <b>in bold</b>?",
    "two": '<img src="x" onerror="window.__pwned = 2">Hello from two & friends.',
}
BENCH = "alpaca-heldout"


def chromium_path() -> str:
    path = os.environ.get("RTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the page tests need Debian's chromium: apt-get install -y chromium (.ci/run installs it)"
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # the dev extra; its own browser download is not used

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    specs = [parse_model_spec(f"{name}={tiny.tiny_model_dir(root / name, seed=seed)}")
             for seed, name in enumerate(REPLIES)]
    engines = load_engines(specs, dtype=torch.float32)
    eval_dir = write_eval_dir(root / "eval", n=5)
    app = create_app(engines, api_key=KEY, rate_dir=eval_dir, max_tokens=128)
    with ServerThread(app) as server:
        scripts = [tiny.ScriptedReply(e.model, e.tokenizer(REPLIES[e.name], add_special_tokens=False)["input_ids"],
                                      e.tokenizer.eos_token_id) for e in engines]
        for s in scripts:
            s.__enter__()
        try:
            yield server, eval_dir
        finally:
            for s in scripts:
                s.__exit__(None, None, None)


def test_chat_streams_into_both_panes_and_rating_is_blind(browser, server):
    url, eval_dir = server[0].url, server[1]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # The key is asked once, in the page.
    page.goto(url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-dialog input", KEY)
    page.click("#key-dialog button[type=submit]")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".pane").count() == 2
    assert page.eval_on_selector_all(".pane select.model", "els => els.map(e => e.value)") == ["one", "two"]
    assert page.locator("nav a[data-page='rate']").is_visible()

    # Count the updates of each pane's log while the replies arrive: a stream shows many.
    page.evaluate("""() => {
        window.__updates = [0, 0];
        document.querySelectorAll('.pane .log').forEach((log, i) => new MutationObserver(
            (records) => { window.__updates[i] += records.length; }).observe(log, {subtree: true, childList: true,
                                                                                    characterData: true}));
    }""")
    page.fill("#prompt", "Say hello.")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2 && "
                           "!document.querySelector('.msg.streaming') && !document.body.classList.contains('busy')")
    assert page.locator(".msg.assistant .text").all_text_contents() == [REPLIES["one"], REPLIES["two"]]
    assert page.locator(".msg.user .text").all_text_contents() == ["Say hello."] * 2
    assert all(n >= 5 for n in page.evaluate("window.__updates")), page.evaluate("window.__updates")
    assert page.evaluate("window.__pwned") is None  # neither the <script> nor the onerror ran
    assert page.locator(".log script, .log img, .log b").count() == 0  # shown as text, not parsed

    # A second turn: each pane sends its own conversation (user, its reply, user).
    page.fill("#prompt", "Again?")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 4 && "
                           "!document.querySelector('.msg.streaming') && !document.body.classList.contains('busy')")
    assert page.evaluate("window.__pwned") is None
    page.click("#reset")
    assert page.locator(".msg").count() == 0

    # Rating: the same tab keeps the key.
    page.click("nav a[data-page='rate']")
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#model-x") == "rt" and page.input_value("#model-y") == "it"  # RT vs IT by default
    page.fill("#rater", "ann")
    page.click("#start")
    expected = []
    for n, (accept_a, accept_b, verdict, by_key) in enumerate([("1", "4", "a", True), ("2", "3", "b", False),
                                                                ("1", "3", "t", True)]):
        page.wait_for_function(f"() => document.getElementById('where').textContent.startsWith('Item {n + 1} of 5')")
        left = page.text_content(".answer[data-side='0'] .text")
        right = page.text_content(".answer[data-side='1'] .text")
        a, b = left.split(" ")[0], right.split(" ")[0]  # eval_fixture: "<model> answers <bench> item <i>"
        assert {a, b} == {"rt", "it"} and f"item {n}" in left
        assert "rt" not in page.text_content("#item .item-head") + page.text_content(".answers .label")
        if verdict == "b":  # a verdict before both marks is not taken
            page.keyboard.press("b")
            assert "First mark" in page.text_content("#hint")
        page.keyboard.press(accept_a)
        if by_key:
            page.keyboard.press(accept_b)
            page.keyboard.press(verdict)
        else:
            page.click(".answer[data-side='1'] button[data-ok='%s']" % ("1" if accept_b == "3" else "0"))
            page.click(f".verdict button[data-choice='{'tie' if verdict == 't' else verdict}']")
        expected.append({"bench": BENCH, "id": str(n), "a": a, "b": b,
                         "winner": {"a": a, "b": b, "t": "tie"}[verdict],
                         "acceptable": {a: accept_a == "1", b: accept_b == "3"}})
    page.wait_for_function("() => document.getElementById('where').textContent.startsWith('Item 4 of 5')")
    assert page.text_content("#progress-text") == "3 / 5 rated"
    lines = (eval_dir / "human" / "ann.jsonl").read_text().splitlines()
    got = [{k: v for k, v in json.loads(line).items() if k not in ("rater", "time")} for line in lines]
    assert got == expected
    assert sorted(p.name for p in (eval_dir / "human").iterdir()) == ["ann.jsonl"]

    # A reload resumes at the first item this rater has not rated.
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#rater") == "ann"
    page.click("#start")
    page.wait_for_function("() => document.getElementById('where').textContent.startsWith('Item 4 of 5')")
    assert page.text_content("#progress-text") == "3 / 5 rated"

    # The key went as a header on every API call after it was given, never in a URL.
    api = [(u, h) for u, h in sent if "/v1/" in u or "/api/" in u]
    assert api and all(KEY not in u for u, _ in sent)
    first_keyed = next(i for i, (_, h) in enumerate(api) if h)
    assert all(h == f"Bearer {KEY}" for _, h in api[first_keyed:])
    assert errors == []
    page.close()
