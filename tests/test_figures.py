"""Every measured figure README.md and BENCHMARKS.md quote is the value its tag names in a committed results JSON
(docs/figures.md, tools/figures.py); a figure that differs, a tag that names nothing and a malformed tag fail."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from tools import figures as F

#: The DB-KSVD-vs-SAE comparison, whose earlier figures had no stored results: every decimal there must carry a
#: tag. Each entry: the line that opens it, and what opens the next part (a heading; in the README, a bullet).
COMPARISON = {
    "BENCHMARKS.md": ("## DB-KSVD vs sae-lens SAEs: equal time, 5× and to a 2²¹-sample cap", r"#{1,3} "),
    "README.md": ("- **DB-KSVD vs SAEs at equal wall time, at 5× and to a 2²¹-sample cap**", r"#{1,3} |- \*\*"),
}


def test_every_quoted_figure_equals_its_source():
    count, problems = F.check()
    assert not problems, "\n".join(problems)
    assert count > 300  # the tags are there at all (394 when this test was written)


@pytest.mark.parametrize("path", F.DOCUMENTS)
def test_each_document_has_tagged_figures(path):
    assert len(F.figures(path)) >= 10


# ------------------------------------------------------------------------------------------------ can fail
def _copy_docs(tmp_path):
    for path in F.DOCUMENTS:
        shutil.copy(REPO / path, tmp_path / path)
    (tmp_path / "benchmarks").symlink_to(REPO / "benchmarks")
    return tmp_path


@pytest.mark.parametrize("path", F.DOCUMENTS)
def test_a_changed_figure_fails(tmp_path, path):
    """Change the last digit of the first inline-tagged figure and of the first table-tagged one: each is named."""
    root = _copy_docs(tmp_path)
    text = (root / path).read_text()
    inline = re.search(r"(\d)(\D{0,4}<!-- src:)", text)
    text = text[: inline.start(1)] + str((int(inline.group(1)) + 1) % 10) + text[inline.end(1) :]
    (root / path).write_text(text)
    count, problems = F.check((path,), root)
    assert len(problems) == 1 and "shows" in problems[0], problems
    table = next((f for f in F.figures(path) if f.line), None)
    if table is None:
        return
    lines = text.split("\n")
    digit = re.search(r"\d(?=\D*$)", table.shown).start()
    changed = table.shown[:digit] + str((int(table.shown[digit]) + 1) % 10) + table.shown[digit + 1 :]
    lines[table.line - 1] = lines[table.line - 1].replace(table.shown, changed, 1)
    (root / path).write_text("\n".join(lines))
    count, problems = F.check((path,), root)
    assert len(problems) == 2 and any(table.where in p for p in problems), problems


# ------------------------------------------------------------------------------------------------ the rules
def _doc(tmp_path, markdown: str, data: object = None) -> tuple[int, list[str]]:
    (tmp_path / "benchmarks").mkdir(exist_ok=True)
    (tmp_path / "benchmarks" / "results_t.json").write_text(
        json.dumps(data if data is not None else {"a": 0.15692, "n": 1434.17, "f": 0.987, "r": [6.94, 8.43]})
    )
    (tmp_path / "doc.md").write_text(markdown)
    return F.check(("doc.md",), tmp_path)


S = "benchmarks/results_t.json"


@pytest.mark.parametrize(
    "markdown",
    [
        f"FVU **0.157**<!-- src: {S}#/a --> held out",
        f"FVU 0.16<!-- src: {S}#/a -->",
        f"rate 1,434<!-- src: {S}#/n -->/s",
        f"rate 1.43 k<!-- src: {S}#/n | x / 1e3 -->",
        f"recovered 98.7%<!-- src: {S}#/f | 100 * x -->",
        f"lost 1.3·10⁻²<!-- src: {S}#/f | 1 - x -->",
        f"ratio 9.1×<!-- src: {S}#/n | x / {{#/a}} / 1e3 -->",
        f"rounds 6.9–8.4×<!-- src: {S}#/r -->",
        f"ends 6.9<!-- src: {S}#/r/0 -->–8.4<!-- src: {S}#/r/1 -->×",
        f"neg −1.6·10⁻¹<!-- src: {S}#/a | -x -->",
        f"shown as code: `x 1.0<!-- src: {S}#/nothing -->`",
    ],
)
def test_a_figure_equal_to_its_source_passes(tmp_path, markdown):
    count, problems = _doc(tmp_path, markdown)
    assert not problems


@pytest.mark.parametrize(
    ("markdown", "says"),
    [
        (f"FVU 0.158<!-- src: {S}#/a -->", "shows '0.158'"),
        (f"FVU 0.1570<!-- src: {S}#/a -->", "shows '0.1570'"),  # more digits than the value rounds to
        (f"rate 1,435<!-- src: {S}#/n -->", "shows"),
        (f"recovered 98.7%<!-- src: {S}#/f -->", "shows"),  # a fraction shown as percent needs `| 100 * x`
        (f"rounds 6.9–8.5×<!-- src: {S}#/r -->", "shows"),
        (f"rounds 6.9×<!-- src: {S}#/r -->", "is not a range"),
        (f"FVU 0.15–0.16<!-- src: {S}#/a -->", "is not one number"),
        (f"FVU 0.157<!-- src: {S}#/missing -->", "has no 'missing'"),
        ("FVU 0.157<!-- src: benchmarks/results_none.json#/a -->", "does not exist"),
        (f"FVU 0.157<!-- src: {S} -->", "no '#/pointer'"),
        (f"FVU 0.157<!-- src: {S}#a -->", "does not start with '/'"),
        ("FVU 0.157<!-- src: notes/x.json#/a -->", "is not benchmarks/results_*.json"),
        (f"FVU 0.157<!-- src: {S}#/a | import os -->", "does not parse"),
        (f"FVU 0.157<!-- src: {S}#/a | x ** 2 -->", "is not arithmetic"),
        (f"FVU 0.157<!-- src: {S}#/r/9 -->", "has no '9'"),
        (f"no figure here<!-- src: {S}#/a -->", "no figure right before"),
        (f"FVU 0.157<!-- source {S}#/a -->", "unknown tag"),
        (f"FVU 0.157<!-- src {S}#/a -->", "unknown tag"),
    ],
)
def test_a_wrong_figure_or_a_bad_tag_fails(tmp_path, markdown, says):
    count, problems = _doc(tmp_path, markdown)
    assert len(problems) == 1 and says in problems[0], problems


TABLE = f"""<!-- src-table: {S}#/runs
row 1: /0
row 2: /1
col 2: /fvu
col 3: /s | x / 60
-->
| run | FVU | minutes |
|---|---|---|
| one | **0.157** | 2.0 min |
| two | 0.289 | — |
"""
RUNS = {"runs": [{"fvu": 0.15692, "s": 121.5}, {"fvu": 0.28926, "s": 126.1}]}


def test_a_table_tag_checks_each_mapped_cell(tmp_path):
    count, problems = _doc(tmp_path, TABLE, RUNS)
    assert not problems and count == 3
    count, problems = _doc(tmp_path, TABLE.replace("0.289", "0.280"), RUNS)
    assert len(problems) == 1 and "doc.md:10 (column 2)" in problems[0], problems


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (("row 2: /1\n", "row 3: /1\n"), "row 3 is not in the table"),
        (("col 3: /s | x / 60\n", "col 4: /s\n"), "the row has 3 columns"),
        (("row 2: /1\n", "row 2: /1\nrow 2: /0\n"), "mapped twice"),
        (("row 2: /1\n", "rows: /1\n"), "is not 'row N: /pointer'"),
        (("| one | **0.157** |", "| one | n/a |"), "does not start with a figure"),
        (("-->\n|", "-->\n\ntext\n|"), "must stand right before a markdown table"),
        (("row 1: /0\nrow 2: /1\n", ""), "maps no rows"),
    ],
)
def test_a_bad_table_tag_fails(tmp_path, change, says):
    count, problems = _doc(tmp_path, TABLE.replace(*change), RUNS)
    assert len(problems) == 1 and says in problems[0], problems


def test_parse_number():
    assert F.parse_number("1,434") == (1434.0, 0.5)
    assert F.parse_number("0.157") == pytest.approx((0.157, 5e-4))
    assert F.parse_number("2.5·10⁻⁴") == pytest.approx((2.5e-4, 5e-6))
    assert F.parse_number("−8·10⁻⁷") == pytest.approx((-8e-7, 5e-8))
    assert F.parse_number("10⁻⁶") == pytest.approx((1e-6, 5e-7))
    assert F.parse_number("+3e-6") == pytest.approx((3e-6, 5e-7))


# ------------------------------------------------------------------------------------------------ the sources
def test_every_results_file_is_json_and_every_one_is_quoted():
    quoted = {f.source.partition("#")[0] for path in F.DOCUMENTS for f in F.figures(path)}
    for file in sorted((REPO / "benchmarks").glob("results_*.json")):
        json.loads(file.read_text())
        assert f"benchmarks/{file.name}" in quoted or "." not in file.stem, f"{file.name} is kept but quoted nowhere"


def test_an_earlier_results_file_is_the_committed_one():
    """``results_<name>.<commit>.json`` is ``results_<name>.json`` as committed at ``<commit>``, byte for byte."""
    earlier = sorted((REPO / "benchmarks").glob("results_*.*.json"))
    assert earlier
    for file in earlier:
        name, commit = file.stem.rsplit(".", 1)
        shown = subprocess.run(
            ["git", "show", f"{commit}:benchmarks/{name}.json"], cwd=REPO, capture_output=True, text=True
        )
        if shown.returncode != 0:
            pytest.skip(f"commit {commit} is not in this clone's history ({shown.stderr.strip()})")
        assert shown.stdout == file.read_text(), f"{file.name} differs from {name}.json at {commit}"


# ----------------------------------------------------------------------------------------------- comparison
@pytest.mark.parametrize("path", sorted(COMPARISON))
def test_every_comparison_figure_carries_a_tag(path):
    """The comparison's figures once stood with no stored results: each decimal in its sections now has a tag."""
    lines = (REPO / path).read_text().split("\n")
    plain = F.without_tagged(path)
    start, next_part = COMPARISON[path]
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    end = next((i for i in range(first + 1, len(lines)) if re.match(next_part, lines[i])), len(lines))
    assert end - first > 5, f"{path}: the comparison at line {first + 1} looks empty"
    stray = [f"{path}:{i + 1}: {lines[i]}" for i in range(first, end) if re.search(r"\d\.\d", plain[i])]
    assert not stray, "untagged figures in the comparison:\n" + "\n".join(stray)
