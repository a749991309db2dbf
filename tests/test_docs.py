"""README.md and docs/*.md stay honest: what they show must exist and run.

- Every relative link and image resolves, and a `#anchor` names a heading of its target (GitHub's
  heading ids).
- Every `rtune ...` command shown (in code blocks and in inline code, also after `time`,
  `accelerate launch ... -m rtune` and environment assignments) names a real subcommand and only
  flags that subcommand has, read from `rtune.cli.build_parser()`: names only, so placeholders
  (N, URL, MODEL_OR_RUN, [--limit N]) are fine and a renamed or made-up flag fails. Inline code
  made of flags alone (`--gen-url URL`) must name flags some rtune command has.
- `python perf/X.py` / `python scripts/X.py` commands name scripts that exist and flags they define;
  paths shown in inline code (`src/...`, `tests/...`, `configs/...`) exist; dotted names
  (`rtune.infer.score.score_responses`) resolve.
- Every ```python block is runnable for its imports: it parses, and each import in it succeeds
  (the rest of the block is not run). Blocks that are not Python to import use another fence label
  (```text, ```bash, ```json, ```yaml).
- Every grid in examples/ passes `rtune experiment GRID --dry-run`, with the network blocked.
- README's command list names every subcommand of `rtune --help`.

The checks are plain functions returning problems, so the last tests show that they catch a broken
link, a bad anchor, a made-up flag, an unknown subcommand and a bad import.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
import socket
from pathlib import Path

import pytest

from rtune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT_DIRS = ("perf", "scripts")
REPO_DIRS = ("src", "tests", "perf", "scripts", "configs", "examples", "docs", ".ci")
# Flags of other tools that the docs show in inline code without their command.
EXTERNAL_FLAGS = {
    "--multi_gpu", "--num_processes", "--config_file",                       # accelerate launch
    "--model_outputs", "--apply_chat_template", "--include_path", "--tasks",  # alpaca_eval, lm_eval
    "--no-deps",                                                              # pip download
}


# -- reading markdown ---------------------------------------------------------------------------
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")


def split_markdown(text: str) -> tuple[list[tuple[str, str, int]], str]:
    """([(fence label, block text, first line number)], prose with the blocks blanked out)."""
    blocks, prose, lines = [], [], text.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, label, start, body = m.group(1), m.group(2).lower(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].lstrip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((label, "\n".join(body), start + 1))
        prose.extend([""] * (len(body) + 2))
        i += 1
    return blocks, "\n".join(prose)


INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


def inline_code(prose: str) -> list[str]:
    return [m.group(2).strip() for m in INLINE.finditer(prose)]


def headings(text: str) -> set[str]:
    """GitHub's ids of a page's headings."""
    _, prose = split_markdown(text)
    seen: dict[str, int] = {}
    ids = set()
    for line in prose.split("\n"):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text stays
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


# -- links and images ---------------------------------------------------------------------------
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"""<(?:img|a)\s[^>]*?(?:src|href)=["']([^"']+)["']""", re.I)
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def link_problems(page: Path, text: str) -> list[str]:
    _, prose = split_markdown(text)
    prose = INLINE.sub("", prose)  # `[x](y)` in inline code is not a link
    targets = LINK.findall(prose) + HTML_REF.findall(prose) + REF_DEF.findall(prose)
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{page.name}: link to {target}: {path_part} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in headings(dest.read_text(encoding="utf-8")):
            problems.append(f"{page.name}: link to {target}: no heading #{anchor} in {dest.name}")
    return problems


# -- commands -----------------------------------------------------------------------------------
SEPARATORS = {"|", "||", "&&", ";", "&"}
FLAG = re.compile(r"^\[?(--?[A-Za-z][\w-]*)")


def _tokens(line: str) -> list[str]:
    line = line.replace("\\|", "/")  # a table cell's escaped pipes separate alternatives
    try:
        tokens = shlex.split(line, comments=False)
    except ValueError:  # an unbalanced quote in a fragment: words are enough for names
        tokens = line.split()
    out = []
    for tok in tokens:
        if tok.startswith("#"):
            break  # a shell comment
        out.append(tok)
    return out


def _segments(tokens: list[str]) -> list[list[str]]:
    segments, current = [], []
    for tok in tokens:
        if tok in SEPARATORS:
            segments.append(current)
            current = []
        elif tok[-1:] in (";", "&") and tok not in SEPARATORS and not tok.startswith("-"):
            current.append(tok[:-1])
            segments.append(current)
            current = []
        else:
            current.append(tok)
    return [s for s in segments + [current] if s]


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(program, arguments) of every command in a shell line: ("rtune", args) or ("perf/x.py", args)."""
    found = []
    for seg in _segments(_tokens(line)):
        for i, tok in enumerate(seg):
            if tok == "rtune" or tok.endswith("/rtune"):
                found.append(("rtune", seg[i + 1:]))
                break
            if tok == "-m" and i + 1 < len(seg) and seg[i + 1] == "rtune":
                found.append(("rtune", seg[i + 2:]))
                break
            if tok in ("python", "python3", "bash", "sh") and i + 1 < len(seg) and \
                    seg[i + 1].split("/")[0] in SCRIPT_DIRS:
                found.append((seg[i + 1], seg[i + 2:]))
                break
    return found


def shell_lines(block: str) -> list[str]:
    """A code block's logical lines (backslash continuations joined)."""
    return block.replace("\\\n", " ").split("\n")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def rtune_problems(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with `rtune ARGS`: an unknown subcommand or a flag the command does not have."""
    problems, command, i = [], parser, 0
    words = ["rtune"]
    while True:
        while i < len(args) and FLAG.match(args[i]):  # options before a subcommand
            flag = FLAG.match(args[i]).group(1)
            if flag not in command._option_string_actions:
                problems.append(f"`{' '.join(words)}` has no option {flag}")
            i += 1
        subs = _subparsers(command)
        if not subs or i >= len(args) or args[i] in ("...", "…"):  # `rtune --trust-remote-code ...`
            break
        if args[i] not in subs:
            problems.append(f"`{' '.join(words)}` has no subcommand {args[i]!r} (it has {', '.join(subs)})")
            return problems
        command = subs[args[i]]
        words.append(args[i])
        i += 1
    for tok in args[i:]:
        m = FLAG.match(tok)
        if m and m.group(1) not in command._option_string_actions:
            problems.append(f"`{' '.join(words)}` has no option {m.group(1)}")
    return problems


def script_flags(path: Path) -> set[str]:
    return set(re.findall(r"""add_argument\(\s*["'](--?[\w-]+)["']""", path.read_text(encoding="utf-8")))


def all_rtune_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set(parser._option_string_actions)
    for sub in _subparsers(parser).values():
        flags |= all_rtune_flags(sub)
    return flags


def _script_problems(script: str, args: list[str]) -> list[str]:
    path = ROOT / script
    if not path.is_file():
        return [f"{script} does not exist"]
    if path.suffix != ".py":
        return []
    known = script_flags(path)
    return [f"{script} has no option {m.group(1)}" for tok in args
            if (m := FLAG.match(tok)) and m.group(1) not in known and m.group(1) not in ("-h", "--help")]


def command_problems(page: Path, text: str, parser: argparse.ArgumentParser) -> list[str]:
    blocks, prose = split_markdown(text)
    lines = [line for label, body, _ in blocks if label in ("", "bash", "sh", "shell", "console")
             for line in shell_lines(body)]
    lines += inline_code(prose)
    problems = []
    for line in lines:
        for program, args in invocations(line):
            found = rtune_problems(args, parser) if program == "rtune" else _script_problems(program, args)
            problems += [f"{page.name}: {p} (in: {line.strip()[:120]})" for p in found]
    known = all_rtune_flags(parser) | EXTERNAL_FLAGS
    for d in SCRIPT_DIRS:
        for script in (ROOT / d).glob("*.py"):
            known |= script_flags(script)
    for span in inline_code(prose):  # flags named alone in the prose
        tokens = _tokens(span)
        if tokens and FLAG.match(tokens[0]) and tokens[0].startswith("-"):
            for tok in tokens:
                m = FLAG.match(tok)
                if m and tok[m.end():m.end() + 1] == "*":  # a family of flags: `--gen-*`
                    continue
                if m and m.group(1).startswith("--") and m.group(1) not in known:
                    problems.append(f"{page.name}: no rtune command has {m.group(1)} (in: `{span[:80]}`)")
    return problems


# -- paths, names and snippets ------------------------------------------------------------------
def reference_problems(page: Path, text: str) -> list[str]:
    """Repository paths and dotted rtune names shown in inline code exist."""
    _, prose = split_markdown(text)
    problems = []
    for span in inline_code(prose):
        first = span.split()[0] if span.split() else ""
        if first.split("/")[0] in REPO_DIRS and "/" in first and not re.search(r"[<>*{}]|\.\.\.", first):
            if not (ROOT / first).exists():
                problems.append(f"{page.name}: path {first} does not exist")
        m = re.match(r"^(rtune(?:\.\w+)+)(?:\(|$)", span)
        if m:
            try:
                _resolve(m.group(1))
            except (ImportError, AttributeError) as e:
                problems.append(f"{page.name}: {m.group(1)} does not resolve ({e})")
    return problems


def _resolve(dotted: str):
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            if n == 1:
                raise
            continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return obj


def snippet_problems(page: Path, text: str) -> list[str]:
    """Each ```python block parses and its imports succeed."""
    blocks, _ = split_markdown(text)
    problems = []
    for label, body, line in blocks:
        if label not in ("python", "py"):
            continue
        where = f"{page.name}:{line}"
        try:
            tree = ast.parse(body)
        except SyntaxError as e:
            problems.append(f"{where}: python block does not parse: {e}")
            continue
        for node in ast.walk(tree):
            try:
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        if not hasattr(module, alias.name):
                            importlib.import_module(f"{node.module}.{alias.name}")
            except ImportError as e:
                problems.append(f"{where}: {ast.unparse(node)} fails: {e}")
    return problems


# -- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parser():
    return build_parser()


def _pages_ids():
    return [p.relative_to(ROOT).as_posix() for p in PAGES]


def test_the_docs_exist():
    names = {p.name for p in PAGES}
    assert "README.md" in names and len(PAGES) >= 10, PAGES


@pytest.mark.parametrize("page", PAGES, ids=_pages_ids())
def test_links_and_images_resolve(page):
    assert link_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=_pages_ids())
def test_commands_name_real_subcommands_and_flags(page, parser):
    assert command_problems(page, page.read_text(encoding="utf-8"), parser) == []


@pytest.mark.parametrize("page", PAGES, ids=_pages_ids())
def test_paths_and_python_names_exist(page):
    assert reference_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=_pages_ids())
def test_python_snippets_import(page):
    assert snippet_problems(page, page.read_text(encoding="utf-8")) == []


def _leaf_commands(parser, words=()) -> list[tuple[str, ...]]:
    subs = _subparsers(parser)
    if not subs:
        return [words]
    return [leaf for name, sub in subs.items() for leaf in _leaf_commands(sub, (*words, name))]


def test_readme_lists_every_subcommand(parser):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    _, prose = split_markdown(text)
    shown = {tuple(args[:2]) for span in inline_code(prose) for prog, args in invocations(span) if prog == "rtune"}
    shown |= {(a[0],) for a in shown}
    missing = [" ".join(leaf) for leaf in _leaf_commands(parser) if leaf not in shown]
    assert missing == [], f"README's command list lacks: {missing}"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a docs dry run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("grid", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_grids_pass_a_dry_run_offline(grid, tmp_path, capsys, no_network):
    out = tmp_path / "experiment"
    code = main(["experiment", str(grid), "--dry-run", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.out.strip().split("\n")
    assert re.match(r"^\d+ cells, \d+ evaluations", lines[0]), lines[0]
    assert lines[-1].startswith("ESTIMATE:"), lines[-1]
    assert not out.exists(), "a dry run writes nothing"


# -- the checks catch what they should (a test of the test) -------------------------------------
BROKEN = """# A page

## Real heading

See [the guide](missing-page.md), [a heading](#no-such-heading), [this one](#real-heading)
and ![a picture](img/none.png), [the web](https://example.org/x.md).

```bash
rtune train --model M --data FILE --learning-rate 1e-4 --out RUN
rtune evaluate runs/rt --out EVAL_DIR
python perf/train_throughput.py --steps 6 --made-up 3
```

Inline: `rtune eval runs/rt --bench advbench --judge-urls URL --out E` and `--gen-urls URL`.
Paths: `src/rtune/no_such_module.py`, `rtune.infer.score.no_such_function`.

```python
from rtune.data import prepare, no_such_name
```
"""


def test_the_checks_catch_broken_links_made_up_flags_and_bad_imports(tmp_path, parser):
    page = tmp_path / "page.md"
    page.write_text(BROKEN, encoding="utf-8")
    links = link_problems(page, BROKEN)
    assert any("missing-page.md does not exist" in p for p in links)
    assert any("no heading #no-such-heading" in p for p in links)
    assert any("img/none.png does not exist" in p for p in links)
    assert not any("real-heading" in p or "example.org" in p for p in links)
    commands = command_problems(page, BROKEN, parser)
    assert any("`rtune train` has no option --learning-rate" in p for p in commands)
    assert any("has no subcommand 'evaluate'" in p for p in commands)
    assert any("perf/train_throughput.py has no option --made-up" in p for p in commands)
    assert any("`rtune eval` has no option --judge-urls" in p for p in commands)
    assert any("no rtune command has --gen-urls" in p for p in commands)
    assert not any(f"option {flag} " in p for p in commands for flag in ("--model", "--steps", "--bench"))
    references = reference_problems(page, BROKEN)
    assert any("src/rtune/no_such_module.py does not exist" in p for p in references)
    assert any("no_such_function does not resolve" in p for p in references)
    assert any("no_such_name" in p for p in snippet_problems(page, BROKEN))


def test_the_checks_pass_good_text(tmp_path, parser):
    good = ("# T\n\n## Models (`--model`)\n\n[x](#models---model)\n\n"
            "`rtune --trust-remote-code train --model M --data D --out R --lr 2e-3 [--resume]`\n\n"
            "```bash\naccelerate launch --num_processes 2 -m rtune train \\\n    --model M --data D --out R\n"
            "RTUNE_API_KEY=K rtune serve a=b --port 0 &   # a comment with --no-such-flag\n```\n")
    page = tmp_path / "good.md"
    page.write_text(good, encoding="utf-8")
    assert link_problems(page, good) == []
    assert command_problems(page, good, parser) == []
