"""Find a value in Python source by its place in the code rather than by a `NAME = value` line.

Speedrun trainers keep their hyperparameters as fields of a `Hyperparameters` class and as keyword
arguments of optimizer calls (`Muon(params, lr=0.05, momentum=0.95)`), where a bare name such as
`lr` occurs many times. The Python parser tells those places apart; the span it gives is rewritten
in the text, so comments and formatting around the value stay as they were.
"""

from __future__ import annotations

import ast
import re

CLASS_FIELD = re.compile(r"^(?P<cls>\w+)\.(?P<field>\w+)$")
CALL_KEYWORD = re.compile(r"^(?P<call>[\w.]+)\((?P<inside>[^()]*)\)$")


def structured(key: str) -> bool:
    """Whether a knob key names a class field (`Class.field`) or a keyword (`call(kw)`)."""
    return bool(CLASS_FIELD.match(key) or CALL_KEYWORD.match(key))


def locate(text: str, key: str) -> tuple[int, int] | None:
    """The (start, end) character span of the value `key` names in `text`; None when the text
    does not parse or holds no such place."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    node = _class_field(tree, key) or _call_keyword(tree, text, key)
    if node is None:
        return None
    lines = _line_offsets(text)
    return _char(text, lines, node.lineno, node.col_offset), _char(text, lines, node.end_lineno, node.end_col_offset)


def _class_field(tree: ast.AST, key: str) -> ast.expr | None:
    m = CLASS_FIELD.match(key)
    if not m:
        return None
    for cls in sorted((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == m["cls"]),
                      key=lambda n: n.lineno):
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                    and stmt.target.id == m["field"] and stmt.value is not None:
                return _unwrap_field(stmt.value)
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 \
                    and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id == m["field"]:
                return stmt.value
    return None


def _unwrap_field(value: ast.expr) -> ast.expr:
    """`field(default=0.02)` holds its value in `default`."""
    if isinstance(value, ast.Call) and _dotted(value.func) in ("field", "dataclasses.field"):
        for kw in value.keywords:
            if kw.arg == "default":
                return kw.value
    return value


def _call_keyword(tree: ast.AST, text: str, key: str) -> ast.expr | None:
    m = CALL_KEYWORD.match(key)
    if not m:
        return None
    *context, keyword = [part.strip() for part in m["inside"].split(",")]
    context = ["".join(c.split()) for c in context if c]
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name != m["call"] and not name.endswith("." + m["call"]):
            continue
        value = next((kw.value for kw in node.keywords if kw.arg == keyword), None)
        if value is None:
            continue
        # the call's text and what precedes it on its line (`adam_defaults = dict(...)`)
        line = text.split("\n")[node.lineno - 1].encode()[:node.col_offset].decode(errors="replace")
        source = "".join((line + (ast.get_source_segment(text, node) or "")).split())
        if all(c in source for c in context):
            calls.append(((node.lineno, node.col_offset), value))
    return min(calls, key=lambda c: c[0])[1] if calls else None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _line_offsets(text: str) -> list[int]:
    offsets, at = [0], 0
    for line in text.split("\n")[:-1]:
        at += len(line) + 1
        offsets.append(at)
    return offsets


def _char(text: str, offsets: list[int], lineno: int, col_bytes: int) -> int:
    """The parser's (line, UTF-8 byte column) as an index into `text`."""
    start = offsets[lineno - 1]
    end = offsets[lineno] if lineno < len(offsets) else len(text)
    return start + len(text[start:end].encode()[:col_bytes].decode(errors="replace"))
