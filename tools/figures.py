"""Measured figures quoted in ``README.md`` and ``BENCHMARKS.md``, each tied to the results JSON that holds it.
Standard library only. The syntax is ``docs/figures.md``; in short:

- an inline tag, right after a figure:
  ``**19.9×**<!-- src: benchmarks/results_coder_cpu.json#/omp_speedup_vs_sklearn -->``; the figure is the
  number (or ``a–b`` range) that ends the text before the tag, after markup and a unit;
- a table tag, on the lines before a markdown table: ``<!-- src-table: FILE#/BASE`` then ``row N: /POINTER`` and
  ``col N: /POINTER`` lines, then ``-->``; cell (N, M) shows the value at ``BASE + row N + col M``;
- after the pointer, ``| EXPR`` turns the stored value ``x`` into the shown one (``100 * x``, ``x / 1e3``,
  ``1 - x``, ``x / {#/other/pointer}``); nothing is scaled unless the tag says so.

A shown figure agrees with its value when it is the value rounded to the digits shown (``0.157`` for 0.15692,
``1,434`` for 1434.17, ``2.5·10⁻⁴`` for 2.504e-4). A JSON list of two numbers is a range, shown as ``a–b``.

``python -m tools.figures check [FILE ...]`` names every figure that disagrees with its source and every malformed
tag (exit status 1 if any); ``python -m tools.figures untagged FILE`` lists the lines with numbers but no tag, for a
maintainer to read (configuration such as ``K = 2048`` is not a measurement and stays untagged).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The documents whose figures carry tags.
DOCUMENTS = ("README.md", "BENCHMARKS.md")
#: Where a source may be: a results file written beside the benchmark or run that measured it.
SOURCE_PATH = re.compile(r"benchmarks/results_[\w.-]+\.json")

_SUP = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SIGN = r"[−+-]?"
_MANTISSA = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_EXP = r"(?:·10[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+|[eE][-+]?\d+)"
_POW = r"10[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+"
NUMBER = rf"{_SIGN}(?:{_MANTISSA}{_EXP}?|{_POW})"
#: A figure: a number or an en-dash range of two.
FIGURE = rf"(?P<lo>{NUMBER})(?:\s?–\s?(?P<hi>{NUMBER}))?"
#: What may stand between a figure and its tag: a unit, then closing emphasis or code marks.
_UNIT = r"(?:\s?(?:×|%|s|k|M|GB|MB|min|ms|µs))?"
_TAIL = re.compile(rf"(?<![\w.,·⁰¹²³⁴⁵⁶⁷⁸⁹]){FIGURE}{_UNIT}[*_`]*\s*$")
_LEAD = re.compile(rf"^[*_`~\s]*{FIGURE}")

_COMMENT = re.compile(r"<!--(.*?)-->", re.S)
_TAG_WORD = re.compile(r"^\s*(src|source)\b", re.I)
_INLINE = re.compile(r"^\s*src:\s*(?P<src>[^|]+?)\s*(?:\|\s*(?P<expr>.+?))?\s*$", re.S)
_TABLE_HEAD = re.compile(r"^\s*src-table:\s*(?P<src>\S[^\n]*?)\s*$")
_TABLE_LINE = re.compile(r"^(?P<kind>row|col)\s+(?P<n>\d+):\s*(?P<ptr>[^|]*?)\s*(?:\|\s*(?P<expr>.+?))?\s*$")
_REF = re.compile(r"\{(?P<ref>[^{}]+)\}")


class FigureError(ValueError):
    """A tag that cannot be read or resolved."""


@dataclass(frozen=True)
class Figure:
    """One quoted figure: where it is, what it shows, and the value(s) its tag says it shows."""

    where: str
    shown: str
    source: str
    value: float | tuple[float, float]
    #: The line of a table cell's figure (0 for an inline tag's, which ``untagged`` finds by its tag).
    line: int = 0

    def problem(self) -> str | None:
        """Why the shown figure is not its value rounded to the digits shown; None when it is."""
        m = re.fullmatch(FIGURE, self.shown)
        shown = [m.group("lo")] + ([m.group("hi")] if m.group("hi") else [])
        values = list(self.value) if isinstance(self.value, tuple) else [self.value]
        if len(shown) != len(values):
            kind = "a range" if len(values) == 2 else "one number"
            return f"{self.where}: {self.shown!r} is not {kind}, as {self.source} is: {self.value}"
        for text, value in zip(shown, values):
            number, half_unit = parse_number(text)
            if not abs(number - value) <= half_unit * (1 + 1e-9) + 1e-12 * abs(value):
                return f"{self.where}: shows {self.shown!r} but {self.source} is {value!r}"
        return None


def parse_number(text: str) -> tuple[float, float]:
    """A shown number and half a unit of its last digit: ``"1,434"`` → (1434, 0.5), ``"2.5·10⁻⁴"`` →
    (2.5e-4, 5e-6), ``"−8·10⁻⁷"`` → (-8e-7, 5e-8), ``"10⁻⁶"`` → (1e-6, 5e-7)."""
    text = text.replace("−", "-").replace(",", "")
    exponent = 0
    if "·10" in text:
        text, power = text.split("·10")
        exponent = int(power.translate(_SUP))
    elif re.fullmatch(r"[-+]?10[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+", text):
        sign = -1 if text.startswith("-") else 1
        exponent = int(text.lstrip("+-")[2:].translate(_SUP))
        return sign * 10.0**exponent, 0.5 * 10.0**exponent
    elif "e" in text.lower():
        text, power = re.split("[eE]", text)
        exponent = int(power)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text) * 10.0**exponent, 0.5 * 10.0 ** (exponent - decimals)


# ------------------------------------------------------------------------------------------------ sources
def _pointer(doc: object, pointer: str, where: str) -> object:
    """RFC 6901: ``/a/b~1c/0`` is ``doc["a"]["b/c"][0]``."""
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        raise FigureError(f"{where}: JSON pointer {pointer!r} does not start with '/'")
    node = doc
    for raw in pointer[1:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise FigureError(f"{where}: {pointer!r} has no {key!r}")
    return node


def _load(path: str, where: str, root: Path) -> object:
    if not SOURCE_PATH.fullmatch(path):
        raise FigureError(f"{where}: source {path!r} is not benchmarks/results_*.json")
    file = root / path
    if not file.is_file():
        raise FigureError(f"{where}: {path} does not exist")
    return json.loads(file.read_text())


def resolve(source: str, where: str, root: Path = REPO, base_path: str | None = None) -> object:
    """The value at ``PATH#/POINTER`` (or ``#/POINTER`` in ``base_path``)."""
    path, hash_, pointer = source.partition("#")
    if not hash_:
        raise FigureError(f"{where}: source {source!r} has no '#/pointer'")
    path = path.strip() or (base_path or "")
    if not path:
        raise FigureError(f"{where}: {source!r} names no file")
    return _pointer(_load(path, where, root), pointer.strip(), where)


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def evaluate(expr: str | None, x: object, where: str, root: Path = REPO, base_path: str | None = None) -> object:
    """``expr`` (``+ - * /``, numbers, ``x``, ``{PATH#/pointer}`` or ``{#/pointer}``) applied to ``x``; on a
    two-number list (a range), to each end."""
    if isinstance(x, list):
        if len(x) != 2:
            raise FigureError(f"{where}: a list source must be a range of two numbers, not {len(x)} values")
        return tuple(evaluate(expr, v, where, root, base_path) for v in x)
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise FigureError(f"{where}: the source is {type(x).__name__}, not a number")
    if expr is None:
        return float(x)
    refs: dict[str, float] = {}

    def ref(m: re.Match) -> str:
        value = resolve(m.group("ref"), where, root, base_path)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FigureError(f"{where}: {m.group('ref')!r} is not a number")
        refs[f"_r{len(refs)}"] = float(value)
        return f"_r{len(refs) - 1}"

    text = _REF.sub(ref, expr)
    names = {"x": float(x), **refs}

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return ev(node.left) / ev(node.right)
        raise FigureError(f"{where}: {expr!r} is not arithmetic on x and {{pointers}}")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise FigureError(f"{where}: {expr!r} does not parse ({e.msg})") from None
    value = ev(tree)
    if not math.isfinite(value):
        raise FigureError(f"{where}: {expr!r} is not finite")
    return value


# ------------------------------------------------------------------------------------------------ documents
def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _cells(row: str) -> list[str]:
    """A markdown table row's cells (``\\|`` is a bar inside a cell)."""
    inner = row.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip() for c in re.split(r"(?<!\\)\|", inner)]


def _table_after(text: str, offset: int, where: str) -> tuple[int, list[str]]:
    """The first markdown table after ``offset``: its first body line's number and its body rows."""
    lines = text[offset:].split("\n")
    first = _line_of(text, offset)
    i = 1  # the rest of the comment's own line
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i + 1 >= len(lines) or not lines[i].lstrip().startswith("|") or not re.match(r"^\s*\|[\s|:-]+$", lines[i + 1]):
        raise FigureError(f"{where}: a src-table tag must stand right before a markdown table")
    body = []
    for line in lines[i + 2 :]:
        if not line.lstrip().startswith("|"):
            break
        body.append(line)
    return first + i + 2, body


def _inline(text: str, m: re.Match, path: str, root: Path) -> Figure:
    where = f"{path}:{_line_of(text, m.start())}"
    tag = _INLINE.match(m.group(1))
    if not tag:
        raise FigureError(f"{where}: malformed tag <!--{m.group(1)}-->")
    line_start = text.rfind("\n", 0, m.start()) + 1
    before = _COMMENT.sub(lambda c: "\0" * len(c.group(0)), text[line_start : m.start()])
    before = before.rsplit("\0", 1)[-1]
    fig = _TAIL.search(before)
    if not fig:
        raise FigureError(f"{where}: no figure right before <!--{m.group(1)}-->")
    source = tag.group("src")
    value = evaluate(tag.group("expr"), resolve(source, where, root), where, root, source.partition("#")[0])
    shown = before[fig.start("lo") : fig.end("hi") if fig.group("hi") else fig.end("lo")]
    return Figure(where, shown, source, value)


def _table(text: str, m: re.Match, path: str, root: Path) -> list[Figure]:
    where = f"{path}:{_line_of(text, m.start())}"
    head, *lines = [ln.strip() for ln in m.group(1).strip().split("\n")]
    h = _TABLE_HEAD.match(head)
    if not h:
        raise FigureError(f"{where}: malformed src-table tag: {head!r}")
    file, hash_, base = h.group("src").partition("#")
    if not hash_:
        raise FigureError(f"{where}: src-table source {h.group('src')!r} has no '#/pointer'")
    rows: dict[int, str] = {}
    cols: dict[int, tuple[str, str | None]] = {}
    for line in filter(None, lines):
        t = _TABLE_LINE.match(line)
        if not t:
            raise FigureError(f"{where}: src-table line {line!r} is not 'row N: /pointer' or 'col N: /pointer'")
        n = int(t.group("n"))
        target = rows if t.group("kind") == "row" else cols
        if n in target:
            raise FigureError(f"{where}: {t.group('kind')} {n} mapped twice")
        if t.group("kind") == "row":
            if t.group("expr"):
                raise FigureError(f"{where}: a row takes a pointer only; put '| expr' on the column")
            rows[n] = t.group("ptr")
        else:
            cols[n] = (t.group("ptr"), t.group("expr"))
    if not rows or not cols:
        raise FigureError(f"{where}: src-table maps no {'rows' if not rows else 'columns'}")
    first_line, body = _table_after(text, m.end(), where)
    figures = []
    for r, row_ptr in sorted(rows.items()):
        if r < 1 or r > len(body):
            raise FigureError(f"{where}: row {r} is not in the table's {len(body)} body rows")
        cells = _cells(body[r - 1])
        for c, (col_ptr, expr) in sorted(cols.items()):
            cell_where = f"{path}:{first_line + r - 1} (column {c})"
            if c < 1 or c > len(cells):
                raise FigureError(f"{cell_where}: the row has {len(cells)} columns")
            cell = cells[c - 1]
            if "<!--" in cell or cell in ("—", "-", ""):
                continue  # an inline tag speaks for this cell; or it shows no figure
            fig = _LEAD.match(cell)
            if not fig:
                raise FigureError(f"{cell_where}: {cell!r} does not start with a figure")
            source = f"{file}#{base}{row_ptr}{col_ptr}"
            value = evaluate(expr, resolve(source, cell_where, root), cell_where, root, file)
            shown = fig.group(0).lstrip("*_`~ \t")
            figures.append(Figure(cell_where, shown, source, value, first_line + r - 1))
    return figures


def _blank(m: re.Match) -> str:
    return re.sub(r"[^\n]", " ", m.group(0))


def _without_code(text: str) -> str:
    """``text`` with fenced blocks and inline code blanked out (same offsets): a tag shown as code is no tag."""
    text = re.sub(r"^```.*?^```", _blank, text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", _blank, text)


def figures(path: str, root: Path = REPO) -> list[Figure]:
    """Every tagged figure of the markdown file ``path`` (relative to ``root``); FigureError on a bad tag."""
    text = _without_code((root / path).read_text())
    out: list[Figure] = []
    for m in _COMMENT.finditer(text):
        body = m.group(1)
        if not _TAG_WORD.match(body):
            continue
        if body.strip().lower().startswith("src-table:"):
            out += _table(text, m, path, root)
        elif body.strip().lower().startswith("src:"):
            out.append(_inline(text, m, path, root))
        else:
            raise FigureError(f"{path}:{_line_of(text, m.start())}: unknown tag <!--{body}-->; use src: or src-table:")
    return out


def check(paths: tuple[str, ...] = DOCUMENTS, root: Path = REPO) -> tuple[int, list[str]]:
    """The number of tagged figures in ``paths`` and every problem found (empty: every figure is its source)."""
    count, problems = 0, []
    for path in paths:
        try:
            found = figures(path, root)
        except FigureError as e:
            problems.append(str(e))
            continue
        count += len(found)
        problems += [p for p in (f.problem() for f in found) if p]
    return count, problems


def without_tagged(path: str, root: Path = REPO) -> list[str]:
    """The lines of ``path`` with code, tags and every tagged figure blanked out: what is left of a number there
    has no source."""
    text = _without_code((root / path).read_text())
    lines = text.split("\n")
    for m in _COMMENT.finditer(text):
        n = _line_of(text, m.start()) - 1
        if _INLINE.match(m.group(1)):
            start = m.start() - (text.rfind("\n", 0, m.start()) + 1)
            before = lines[n][:start].replace("-->", "\0").rsplit("\0", 1)[-1]
            fig = _TAIL.search(before)
            if fig:
                cut = start - len(before) + fig.start()
                lines[n] = lines[n][:cut] + " " * (start - cut) + lines[n][start:]
    for fig in figures(path, root):
        if fig.line:
            lines[fig.line - 1] = lines[fig.line - 1].replace(fig.shown, " " * len(fig.shown), 1)
    return _COMMENT.sub(_blank, "\n".join(lines)).split("\n")


def untagged(path: str, root: Path = REPO) -> list[str]:
    """Lines of ``path`` outside code that still hold a decimal or multi-digit number once every tagged figure is
    taken out: a reading aid (it cannot tell a measurement from a setting such as ``K = 2048``)."""
    original = (root / path).read_text().split("\n")
    return [
        f"{path}:{n}: {original[n - 1].strip()}"
        for n, line in enumerate(without_tagged(path, root), 1)
        if re.search(r"\d[.,]\d|\d\d|·10|10[⁻⁺]", line)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m tools.figures")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("check").add_argument("files", nargs="*", default=list(DOCUMENTS))
    sub.add_parser("untagged").add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.command == "check":
        count, problems = check(tuple(args.files))
        print("\n".join(problems) or f"{count} tagged figures, each equal to its source")
        return 1 if problems else 0
    for path in args.files:
        print("\n".join(untagged(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
