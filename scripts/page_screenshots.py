"""Screenshots of rtune serve's pages with real small models: docs/chat-page.png and docs/rating-page.png.

    python scripts/page_screenshots.py [--work /tmp/rtune-pages] [--eval-dir rtune-demo/eval] [--out docs]

1. Without --eval-dir, evaluates two built-in models on a few instructions (rtune eval's API, cached in
   WORK/eval): gemma-3-270m prompted with URIAL-R and smollm2-135m-instruct in its own chat template.
   With --eval-dir (e.g. the demo's rtune-demo/eval), that folder is rated (RT vs IT by default).
2. Starts `rtune serve base=gemma-3-270m urial=gemma-3-270m+urial-r smollm2=smollm2-135m-instruct+model
   --rate EVAL_DIR --api-key ...` on a free port, as a user would.
3. Drives Debian's chromium (playwright): one prompt answered in three panes; the rating page with two
   items rated (as rater "screenshots", in EVAL_DIR/human/) and the third one marked.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "What is the capital of Australia?",
    "Suggest a name for a bakery that sells only bread.",
    "How do I make a cup of tea?",
]
CHAT_PROMPT = "Give three tips for staying healthy."
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
KEY = "screenshot-key"


def evaluate(work: Path) -> Path:
    from rtune.eval.generation import EvalDecoding
    from rtune.eval.run import EvalConfig, run_eval

    prompts = work / "instructions.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"id": str(i), "instruction": t}) + "\n" for i, t in enumerate(INSTRUCTIONS)))
    config = EvalConfig(benches=[str(prompts)], shift=False, relevance=False,
                        decoding=EvalDecoding(max_new_tokens=160, batch_size=6))
    run_eval(["gemma-3-270m", "smollm2-135m-instruct"], config, work / "eval", labels=["gemma-3-270m+urial-r", "smollm2-135m-instruct"],
             templates=["urial-r", "model"])
    return work / "eval"


def start_server(eval_dir: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "rtune", "serve", "base=gemma-3-270m", "urial=gemma-3-270m+urial-r",
           "smollm2=smollm2-135m-instruct+model", "--rate", str(eval_dir), "--port", "0", "--api-key", KEY]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("rtune serve exited")
        print(line, end="", file=sys.stderr)
        m = re.search(r"listening on (http://\S+)/v1", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("rtune serve did not start")


def shoot(url: str, out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.add_init_script(f"sessionStorage.setItem('rtune-api-key', '{KEY}')")
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.click("#add-pane")
        for i, name in enumerate(["base", "urial", "smollm2"]):
            page.locator(".pane select.model").nth(i).select_option(name)
        page.fill("#max-tokens", "160")
        page.fill("#prompt", CHAT_PROMPT)
        page.press("#prompt", "Enter")
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 3 && "
                               "!document.body.classList.contains('busy')", timeout=600_000)
        page.screenshot(path=str(out / "chat-page.png"))

        page.goto(url + "/rate")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#rater", "screenshots")
        page.click("#start")
        page.wait_for_selector("#item:not([hidden])")
        for keys in (["1", "4", "a"], ["1", "3", "t"]):  # two verdicts, each moving on to the next item
            shown = page.text_content("#where")
            for key in keys:
                page.keyboard.press(key)
            page.wait_for_function("(w) => document.getElementById('where').textContent !== w", arg=shown)
        page.keyboard.press("1")
        page.screenshot(path=str(out / "rating-page.png"))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/rtune-pages")
    parser.add_argument("--eval-dir", default=None, help="an rtune eval folder to rate (default: made in WORK)")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--chromium", default=os.environ.get("RTUNE_CHROMIUM", "/usr/bin/chromium"))
    a = parser.parse_args()
    eval_dir = Path(a.eval_dir) if a.eval_dir else evaluate(Path(a.work))
    proc, url = start_server(eval_dir)
    try:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        shoot(url, Path(a.out), a.chromium)
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"wrote {a.out}/chat-page.png and {a.out}/rating-page.png")


if __name__ == "__main__":
    main()
