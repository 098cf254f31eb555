"""A side-by-side diff of two candidate trees, syntax-highlighted by Pygments, as HTML rows.

Each file's whole text is highlighted once, then split into lines, so a line inside a docstring or a
multi-line string is coloured as it is in the file (highlighting lines one by one would not know).
difflib pairs the lines; only changed blocks and a few lines of context around them are shown.
"""

from __future__ import annotations

import difflib
import html

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_for_filename
from pygments.util import ClassNotFound

CONTEXT = 3  # unchanged lines shown around each change
CSS_SCOPE = ".hl"


def css() -> str:
    """The Pygments colours, scoped to the diff's cells."""
    return HtmlFormatter(style="default").get_style_defs(CSS_SCOPE)


def _lines(path: str, text: str) -> list[str]:
    """`text` highlighted, one HTML string per line (each line's spans closed on that line)."""
    if not text:
        return []
    try:
        lexer = get_lexer_for_filename(path, stripnl=False, ensurenl=False)
    except ClassNotFound:
        lexer = TextLexer(stripnl=False, ensurenl=False)
    out = highlight(text, lexer, HtmlFormatter(nowrap=True)).split("\n")
    n = len(text.split("\n"))
    return (out + [""] * n)[:n]


def file_rows(path: str, old: str, new: str) -> list[dict]:
    """Rows of one file: {"kind": equal|delete|insert|replace|skip, "a": [no, html], "b": [no, html]}."""
    a_txt, b_txt = old.split("\n"), new.split("\n")
    a_html, b_html = _lines(path, old), _lines(path, new)
    rows: list[dict] = []
    matcher = difflib.SequenceMatcher(None, a_txt, b_txt, autojunk=False)
    for group in matcher.get_grouped_opcodes(CONTEXT):
        if rows or group[0][1] > 0:
            rows.append({"kind": "skip"})
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                rows += [{"kind": "equal", "a": [i + 1, a_html[i]], "b": [j + 1, b_html[j]]}
                         for i, j in zip(range(i1, i2), range(j1, j2), strict=True)]
                continue
            for k in range(max(i2 - i1, j2 - j1)):
                i, j = i1 + k, j1 + k
                rows.append({"kind": tag,
                             "a": [i + 1, a_html[i]] if i < i2 else None,
                             "b": [j + 1, b_html[j]] if j < j2 else None})
    return rows


def tree_diff(old: dict[str, str], new: dict[str, str]) -> list[dict]:
    """Every changed text file between two trees (path -> text): {"path", "status", "rows", "added", "removed"}."""
    out = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        status = "added" if a is None else "deleted" if b is None else "modified"
        rows = file_rows(path, a or "", b or "")
        added = sum(1 for r in rows if r.get("b") and r["kind"] in ("insert", "replace"))
        removed = sum(1 for r in rows if r.get("a") and r["kind"] in ("delete", "replace"))
        out.append({"path": path, "status": status, "rows": rows, "added": added, "removed": removed})
    return out


def to_html(files: list[dict]) -> str:
    """The diff as one HTML fragment: a table per file, old on the left, new on the right."""
    if not files:
        return '<p class="muted">no change</p>'
    parts = []
    for f in files:
        parts.append(f'<div class="file"><div class="fname">{html.escape(f["path"])} '
                     f'<span class="muted">({f["status"]}, +{f["added"]} -{f["removed"]})</span></div>'
                     '<table class="sbs hl"><colgroup><col class="no"><col><col class="no"><col></colgroup>')
        for r in f["rows"]:
            if r["kind"] == "skip":
                parts.append('<tr class="skip"><td colspan="4">&#8942;</td></tr>')
                continue
            parts.append(f'<tr class="{r["kind"]}">{_cell(r.get("a"), "a")}{_cell(r.get("b"), "b")}</tr>')
        parts.append("</table></div>")
    return "".join(parts)


def _cell(side: list | None, which: str) -> str:
    if side is None:
        return f'<td class="no"></td><td class="code {which} empty"></td>'
    no, code = side
    return f'<td class="no">{no}</td><td class="code {which}"><pre>{code or " "}</pre></td>'
