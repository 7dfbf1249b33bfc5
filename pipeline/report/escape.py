"""What a generated page may show: text the project does not control (skip reasons, notes, failure messages,
labelled titles, SAE and model names, token strings, a judge's explanations) only ever as text.

* ``report.md``: every interpolated string goes through one of :func:`md_text` (inline text), :func:`md_code` (a
  code span), :func:`md_fence` (a fenced block) and, in a table row, :func:`md_cell` over the whole cell, so it
  can neither close a code span, split a table row, start a block, nor carry HTML. ``report.html`` is rendered
  with raw HTML off as well (:mod:`pipeline.report.index_page`).
* The HTML pages (Jinja2, autoescaped): :data:`CSP_META` in every page's head forbids scripts, plugins, forms and
  remote loads; :func:`local_href` keeps a link built from a name a relative path.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from markupsafe import Markup

#: Line breaks (any run, with the spaces around it): a break would end a table row or a list item's paragraph.
_BREAKS = re.compile(r"[ \t]*(?:\r\n|[\r\n\v\f\x1c-\x1e\x85\u2028\u2029])+[ \t]*")
#: Characters that start inline markdown anywhere: escape, code, emphasis, links and images, autolinks and HTML,
#: strikethrough (GFM), headings' closing sequence, and runs of ``_`` (:func:`_escape`). ``|`` is
#: :func:`md_cell`'s (it only matters in a table row).
_INLINE = re.compile(r"[\\`*\[\]<>~#]|_+")
#: An entity or numeric character reference (``&lt;``, ``&#60;``), which markdown would decode.
_ENTITY = re.compile(r"&(?=#?[0-9A-Za-z]+;)")
#: What starts a block when it opens a line (or a list item): a list marker, a thematic break, a setext line.
_BLOCK_START = re.compile(r"^(?:([-+=])|(\d{1,9})([.)]))")


def one_line(text: str) -> str:
    """``text`` with every run of line breaks turned into one space, and stripped."""
    return _BREAKS.sub(" ", text).strip()


def _escape(m: re.Match[str]) -> str:
    """One :data:`_INLINE` match backslash-escaped; a run of ``_`` between two letters or digits is left as it is
    (``sparse_probing``: there it can neither open nor close emphasis)."""
    run, text = m.group(0), m.string
    if run[0] == "_" and 0 < m.start() and m.end() < len(text):
        if text[m.start() - 1].isalnum() and text[m.end()].isalnum():
            return run
    return "".join("\\" + c for c in run)


def md_text(text: object) -> str:
    """``text`` as literal inline markdown: on one line, every markdown character backslash-escaped, so it renders
    as exactly itself in a paragraph, a list item or (through :func:`md_cell`) a table cell."""
    out = _ENTITY.sub(r"\\&", _INLINE.sub(_escape, one_line(str(text))))
    return _BLOCK_START.sub(lambda m: "\\" + m.group(1) if m.group(1) else m.group(2) + "\\" + m.group(3), out)


def md_code(text: object) -> str:
    """``text`` as a markdown code span: on one line, fenced by more backticks than its longest run of them, padded
    with a space where it starts or ends with a backtick (markdown strips one from each side)."""
    body = one_line(str(text))
    if not body:
        return "` `"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", body)), default=0) + 1)
    pad = " " if body[0] == "`" or body[-1] == "`" else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def md_fence(text: str, info: str = "") -> list[str]:
    """``text`` as the lines of a fenced code block (``info``: the language, a project constant), its fence longer
    than any run of backticks in ``text`` so no line of it closes the block."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return [fence + info, *text.rstrip("\n").splitlines(), fence]


def md_cell(text: str) -> str:
    """A markdown table cell from inline markdown (the project's own, or built with :func:`md_text` /
    :func:`md_code`): every ``|`` escaped, inside code spans too (a table row is split on unescaped pipes before
    its cells are parsed), so ``mean max |cos|`` stays one cell."""
    return one_line(text).replace("|", "\\|")


#: The pages' Content-Security-Policy: no script of any kind (inline, ``javascript:`` links, event handlers),
#: no plugin, form or frame, nothing loaded over the network; the pages' own inline CSS, and images from the run
#: folder (``file:`` when opened from disk, ``'self'`` when served) or inline ``data:``.
CSP = (
    "default-src 'none'; script-src 'none'; object-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data: file:; base-uri 'none'; form-action 'none'; frame-src 'none'"
)
#: :data:`CSP` as the ``<meta>`` every generated page carries first in its head (trusted: a project constant).
CSP_META = Markup(f'<meta http-equiv="Content-Security-Policy" content="{CSP}">')


def local_href(path: str) -> str:
    """A link to the local file ``path`` (relative, ``/``-separated): percent-encoded, so a name holding ``:``,
    ``#``, ``?`` or a space stays a relative path to that file (``javascript:x.html`` is not a script URL)."""
    return quote(path, safe="/")


__all__ = ["CSP", "CSP_META", "local_href", "md_cell", "md_code", "md_fence", "md_text", "one_line"]
