"""Numbers as text, and the report as a list of blocks rendered once to Markdown and once to HTML.

Building both files from the same blocks keeps report.md and report.html from drifting apart
without a Markdown library. A block is a tuple whose first element names its kind:

    ("h", level, text)            a heading
    ("p", text)                   a paragraph of plain text
    ("table", header, rows)       header: list of str, rows: lists of str (plain text)
    ("pairs", [(name, code)])     a list of "name: value" lines, the value shown as code
    ("img", file, caption)        a PNG beside the report (linked in Markdown, embedded in HTML)
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

MISSING = "—"


def _decimals(magnitude: float) -> int:
    # Enough digits to compare models, not more: 123.4, 2.35, 0.812.
    return 1 if magnitude >= 100 else 2 if magnitude >= 1 else 3


def format_metric(m: dict | None) -> str:
    """"value [lo, hi] (n=N)": rates as percentages, means with digits suited to their size."""
    if not m:
        return MISSING
    n = f" (n={m['n']})" if m.get("n") is not None else ""
    value, ci = m.get("value"), m.get("ci")
    if value is None:
        return "n/a" + n
    if m.get("kind") == "rate":
        text = f"{100 * value:.1f}%"
        interval = f" [{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]" if ci else ""
    elif isinstance(value, int) and not isinstance(value, bool) and not ci:  # a count (wins, failures): no decimals
        text, interval = str(value), ""
    else:
        d = _decimals(max(abs(x) for x in [value, *(ci or [])]))
        text = f"{value:.{d}f}"
        interval = f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else ""
    return text + interval + n


def metric_title(name: str, m: dict) -> str:
    """The metric's label (its name when it has none), with ↑ or ↓ saying which way is better."""
    arrow = {True: " ↑", False: " ↓"}.get(m.get("higher_is_better"), "")
    return (m.get("label") or name) + arrow


# -- Markdown -------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_code(text: str) -> str:
    # A value holding a backtick needs a longer fence.
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
        elif kind == "pairs":
            out.extend(f"- **{name}**: {_md_code(code)}" for name, code in block[1])
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        out.append("")
    return "\n".join(out)


# -- HTML -----------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
td:not(:first-child) { text-align: right; white-space: nowrap; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.88em; background: #f6f6f6;
       word-break: break-all; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
"""


def to_html(blocks: list[tuple], image_dir: Path, title: str) -> str:
    """A standalone page: the images are read from image_dir and embedded as data URIs."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{STYLE}</style>", "</head>", "<body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{esc(block[1])}</p>")
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append('<div style="overflow-x: auto"><table>')  # many models: the table scrolls, not the page
            out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
            out.append("</table></div>")
        elif kind == "pairs":
            out.append("<ul>")
            out.extend(f"<li><b>{esc(name)}</b>: <code>{esc(code)}</code></li>" for name, code in block[1])
            out.append("</ul>")
        elif kind == "img":
            data = base64.b64encode((image_dir / block[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block[2])}">'
                       f"<figcaption>{esc(block[2])}</figcaption></figure>")
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
