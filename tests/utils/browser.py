"""Headless Chromium for the tests that open generated pages (Debian's ``chromium``, installed by
``bash setup.sh --tests``): the DOM after load, what the page logged to its console, a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Chromium's flags for a headless run as root in a container, with the page's console on stderr.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? (.*)")
#: Where the tests leave their screenshots (ignored by git).
ARTIFACTS = Path(__file__).resolve().parents[2] / "outputs" / "test_artifacts"


def chromium() -> str:
    """The Chromium executable, or skip the test with the reason and the fix."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no headless Chromium on this machine: `bash setup.sh --tests` installs Debian's chromium "
        "(apt-get, needs root); the page checks run where it is"
    )


@dataclass
class Page:
    dom: str
    """The serialised DOM after load."""
    console: list[str]
    """Every message the page wrote to its console (a static page writes none)."""


def open_page(path: Path, *, screenshot: Path | None = None, timeout: float = 90.0) -> Page:
    """Load ``path`` (a file) in headless Chromium; optionally save a screenshot."""
    exe = chromium()
    url = path.resolve().as_uri()
    run = subprocess.run([exe, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [m.group(1) for m in map(_CONSOLE.search, run.stderr.splitlines()) if m]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run(
            [exe, *FLAGS, "--window-size=1200,1600", f"--screenshot={screenshot}", url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    return Page(run.stdout, console)


def local_links(html: str, base: Path) -> list[Path]:
    """Every relative ``href``/``src`` target of ``html`` (anchors and URLs with a scheme left out), resolved
    against the folder ``base``."""
    out = []
    for target in re.findall(r'(?:href|src)="([^"#]+)', html):
        if not re.match(r"^[a-z]+:", target):
            out.append((base / target).resolve())
    return out
