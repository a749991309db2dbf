"""The package layout: no import circles (module- or function-level), each format constant spelled once."""

import ast
import re
from pathlib import Path

import rtune

PACKAGE = Path(rtune.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """rtune modules a file imports anywhere in it (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from rtune.x import y`: y may be a submodule (rtune.x.y) or a name in rtune.x.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert "rtune.run_folder" in graph["rtune.infer.merge"]  # the graph really holds function-level imports
    assert cycles(graph) == []


def test_inference_does_not_import_training():
    graph = import_graph()
    for name in ("rtune.infer.load", "rtune.infer.generate", "rtune.infer.score", "rtune.infer.chat", "rtune.run_folder"):
        assert not any(m.startswith("rtune.train") for m in graph[name]), name


def test_format_names_spelled_once():
    for pattern in (r'"rtune_run\.json"', r'"rtune_template\.json"', r"(?m)^\w+ = -100\b",
                    r'(?m)^\w+ = \("rt", "it", "rt-empty-user"\)'):
        holders = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if re.search(pattern, p.read_text())]
        assert len(holders) == 1, (pattern, holders)


def test_every_subpackage_says_what_it_holds():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, init


def test_test_files_have_unique_basenames():
    # tests/ has no __init__.py files: pytest imports each test file by its basename, so two files
    # with one name in different folders stop the whole collection.
    tests = Path(__file__).parent
    seen: dict[str, Path] = {}
    for path in sorted(tests.rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a basename"
        seen[path.name] = path
