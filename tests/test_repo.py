"""The repository stands alone: no tracked file cites a file outside it (facts the code relies on are restated in
``docs/``), and every ``docs/`` page a file cites exists."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

#: Citations of files outside the repository: the workspace's shared folder and the notes its facts were first
#: gathered in. (Relative paths such as Hydra's ``config_path="../conf"`` stay inside and are not citations.)
OUTSIDE = re.compile(r"\.\./shared\b|\bshared/[\w./-]+|\bnotes/[\w.-]+\.md\b|\b(?:design|peers)\.md\b")
DOCS_PAGE = re.compile(r"\bdocs/[\w.-]+\.md\b")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt"}


def _tracked_text_files() -> list:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    paths = [REPO / n for n in names.split()]
    return [p for p in paths if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.parent.name == ".ci")]


def test_no_file_cites_a_path_outside_the_repo():
    hits = []
    for path in _tracked_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(REPO)}:{n}: {m.group(0)}" for m in OUTSIDE.finditer(line)]
    assert not hits, "cite docs/ instead:\n" + "\n".join(hits)


def test_every_cited_docs_page_exists():
    missing = []
    for path in _tracked_text_files():
        for m in DOCS_PAGE.finditer(path.read_text(errors="replace")):
            if not (REPO / m.group(0)).is_file():
                missing.append(f"{path.relative_to(REPO)}: {m.group(0)}")
    assert not missing, missing


def test_the_check_sees_a_citation_outside():
    up, notes = "../" + "shared", "notes" + "/sae-lens-baselines.md"
    assert OUTSIDE.search(f"see {up}/x.md") and OUTSIDE.search(f"({notes})")
    assert not OUTSIDE.search("docs/sae-lens-baselines.md") and not OUTSIDE.search('config_path="../conf"')


#: A module longer than this says in its docstring why it is one module ("... (~480 lines) because ...").
MAX_LINES = 450


def test_a_long_module_says_why_it_is_one():
    import ast

    unexplained = []
    for path in _tracked_text_files():
        if path.suffix != ".py":
            continue
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if not re.search(r"~\d+ lines", doc):
                unexplained.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert not unexplained, f"over {MAX_LINES} lines with no reason in the docstring: {unexplained}"


def test_every_library_name_a_benchmark_imports_exists():
    """The benchmarks run rarely (the GPU one only when a GPU is lent): a name they import from the library that
    a refactor removed would otherwise surface only then."""
    import ast
    import importlib

    missing = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
                module = importlib.import_module(node.module)
                package = module.__spec__.submodule_search_locations is not None
                for alias in node.names:
                    found = hasattr(module, alias.name) or (
                        package and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                    )
                    if not found:
                        missing.append(f"{path.name}: from {node.module} import {alias.name}")
    assert not missing, missing
