"""The escaping helpers of ``report.md`` (:mod:`pipeline.report.escape`): whatever a string holds, it renders as
exactly itself (line breaks as spaces) in a paragraph, a list item, a code span, a table cell and a fenced block,
under CommonMark with raw HTML on as well as off: the markdown escaping alone keeps it text."""

from __future__ import annotations

import html
import re

import pytest
from markdown_it import MarkdownIt

from pipeline.report.escape import CSP, CSP_META, local_href, md_cell, md_code, md_fence, md_text, one_line

HOSTILE = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="document.title=\'pwned\'">',
    "x` <img src=x onerror=alert(1)>",
    "a | b\n| c | d |",
    "line one\r\n\n# a heading\n```\nfenced",
    "- a list",
    "+ a list",
    "1. ordered",
    "3) ordered",
    "# heading ##",
    "> quote",
    "    indented code",
    "***",
    "---",
    "=",
    "&lt;img src=x&gt; &amp; &#60;b&#62; R&D",
    "back\\slash \\` \\",
    "*em* **strong** _u_ __u__ ~~s~~ a_b_c sparse_probing _x x_",
    "[link](javascript:alert(1)) ![img](x) <http://example.com> <b>bold</b>",
    "`",
    "``a``",
    "` leading and trailing `",
    "a  two  spaces",
    "ünïcødé — ≥ 2B",
    "__init__.py snake__case x_ _y é_é 1_000 a_€_b",
]


def _renderers() -> list[MarkdownIt]:
    return [MarkdownIt("commonmark", {"html": html_on}).enable("table") for html_on in (True, False)]


def _only(out: str, pattern: str) -> str | None:
    """The text of the single element ``pattern`` matches (the whole output), HTML entities decoded."""
    m = re.fullmatch(pattern, out, re.S)
    return html.unescape(m.group(1)) if m else None


@pytest.mark.parametrize("text", HOSTILE)
def test_md_text_renders_as_itself_in_a_paragraph_and_a_list_item(text):
    for md in _renderers():
        assert _only(md.render(md_text(text)), r"<p>(.*)</p>\n") == one_line(text)
        assert _only(md.render("- " + md_text(text)), r"<ul>\n<li>(.*)</li>\n</ul>\n") == one_line(text)
        assert _only(md.render(f"## {md_text(text)}"), r"<h2>(.*)</h2>\n") == one_line(text)


@pytest.mark.parametrize("text", HOSTILE)
def test_md_code_is_one_code_span_holding_the_text(text):
    for md in _renderers():
        assert _only(md.render("- " + md_code(text)), r"<ul>\n<li><code>([^<]*)</code></li>\n</ul>\n") == one_line(text)


@pytest.mark.parametrize("text", HOSTILE)
def test_a_table_row_keeps_its_cells(text):
    """``|`` and line breaks in a cell neither split it nor end the row, inside a code span or not."""
    row = f"| {md_cell(md_code(text))} | {md_cell(md_text(text))} | {md_cell('mean max |cos|')} |"
    for md in _renderers():
        out = md.render("| a | b | c |\n|---|---|---|\n" + row + "\n")
        cells = re.findall(r"<td>(.*?)</td>", out, re.S)
        assert len(cells) == 3 and out.count("<tr>") == 2, out
        assert html.unescape(re.fullmatch(r"<code>([^<]*)</code>", cells[0]).group(1)) == one_line(text)
        assert html.unescape(cells[1]) == one_line(text) and cells[2] == "mean max |cos|"


def test_md_fence_holds_any_text_as_one_block():
    text = 'a: "```"\nb: ````\n~~~\n<script>x</script>\n'
    lines = md_fence(text, "yaml")
    assert lines[0] == "`````yaml" and lines[-1] == "`````"
    for md in _renderers():
        out = md.render("\n".join(lines) + "\n\nafter\n")
        assert out.count("<pre>") == 1 and out.endswith("<p>after</p>\n")
        assert _only(out.split("<p>after")[0], r'<pre><code class="language-yaml">(.*)</code></pre>\n') == text
    assert md_fence("plain")[0] == "```"


def test_plain_text_stays_readable_in_the_markdown():
    assert md_text("no judge API key; metric:autointerp sparse_probing R&D 1 − FVU") == (
        "no judge API key; metric:autointerp sparse_probing R&D 1 − FVU"
    )
    assert md_code("topk_K64_k4") == "`topk_K64_k4`"
    assert md_code("a`b") == "``a`b``" and md_code("`a") == "`` `a ``" and md_code("") == "` `"
    assert md_text("  two\n\n lines  ") == "two lines"


def test_local_href_keeps_a_name_a_relative_link():
    assert local_href("relu.html") == "relu.html"
    assert local_href("../dashboards-ab12/topk_K64.html") == "../dashboards-ab12/topk_K64.html"
    assert local_href("javascript:alert(1)//.html") == "javascript%3Aalert%281%29//.html"
    assert local_href('a b#c?d"<x>.html') == "a%20b%23c%3Fd%22%3Cx%3E.html"


def test_the_csp_forbids_scripts_and_keeps_styles_and_local_images():
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["script-src"] == "'none'" and directives["object-src"] == "'none'"
    assert directives["default-src"] == "'none'" and directives["style-src"] == "'unsafe-inline'"
    assert directives["img-src"] == "'self' data: file:"
    assert str(CSP_META) == f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
