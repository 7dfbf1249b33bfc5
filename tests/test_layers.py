"""The layers stay layered: every import in ``pipeline/`` and ``stages/`` (lazy ones inside functions included)
points down, the library never imports a stage, and no stage imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

#: Rank of each layer: a module may import its own rank or lower. ``evals`` sits above ``data`` (it reads
#: stores and loads models); ``data`` must not import ``evals``.
RANKS = {
    "pipeline.utils": 0,
    "pipeline.core": 1,
    "pipeline.data": 2,
    "pipeline.evals": 3,
    "pipeline.runs": 4,
    "stages": 5,
    "stages.orchestrator": 6,
}
#: Entry points that sit above everything: the command line (imports the orchestrator) and the public-API
#: facade (re-exports the lower layers).
TOP = {"pipeline.__main__", "pipeline"}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (the longest matching prefix of :data:`RANKS`)."""
    best = None
    for layer in RANKS:
        if (module == layer or module.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def imports_of(source: str, module: str) -> list[str]:
    """Absolute names of every project module imported anywhere in ``source`` (the text of ``module``)."""
    out = []
    package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append(name)
            out += [f"{name}.{a.name}" for a in node.names]  # `from pipeline import evals` names a sub-package
    return [n for n in out if n.split(".")[0] in ("pipeline", "stages")]


def violations(module: str, imported: list[str]) -> list[str]:
    """What is wrong with ``module`` importing ``imported`` (an empty list when nothing is)."""
    if module in TOP:
        return []
    mine = layer_of(module)
    bad = []
    for name in imported:
        if name == "pipeline":
            bad.append(f"{module} imports the `pipeline` facade (import from the sub-package instead)")
            continue
        theirs = layer_of(name)
        if theirs is None:
            continue
        if RANKS[theirs] > RANKS[mine]:
            bad.append(f"{module} ({mine}) imports {name} ({theirs}), a higher layer")
        elif mine == theirs == "stages" and name.split(".")[:2] != module.split(".")[:2]:
            bad.append(f"stage {module} imports another stage, {name}")
    return bad


def _modules() -> list[tuple[str, Path]]:
    out = []
    for root in ("pipeline", "stages"):
        for path in sorted((REPO / root).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out.append((name, path))
    return out


def test_every_module_belongs_to_a_layer():
    orphans = [m for m, _ in _modules() if m not in TOP and layer_of(m) is None]
    assert orphans == [], f"modules outside the layers (move them into a sub-package): {orphans}"


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_imports_point_down(module, path):
    assert violations(module, imports_of(path.read_text(), module)) == []


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("pipeline.core.learner", "from pipeline.data.store import ActivationStore", "higher layer"),
        ("pipeline.data.harvest", "def f():\n    from pipeline.report import markdown as report", "higher layer"),
        ("pipeline.report.markdown", "import stages.report", "higher layer"),
        ("pipeline.runs.layout", "from stages.orchestrator import main", "higher layer"),
        ("stages.fit", "from stages.harvest import run", "imports another stage"),
        ("pipeline.core.coders", "from pipeline import encode", "facade"),
        ("pipeline.data.store", "from ..evals import heldout", "higher layer"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(module, source, expected):
    found = violations(module, imports_of(source, module))
    assert found and expected in found[0]


@pytest.mark.parametrize(
    "module, source",
    [
        ("pipeline.report.markdown", "from pipeline.data.store import ActivationStore"),
        ("stages.orchestrator", "from stages import fit, harvest"),
        ("stages.fit", "from pipeline.runs.layout import stage_dir\nfrom pipeline.utils.atomic import atomic_write"),
        ("pipeline.data.store", "from .harvest import x"),
    ],
)
def test_the_checker_allows_downward_imports(module, source):
    assert violations(module, imports_of(source, module)) == []
