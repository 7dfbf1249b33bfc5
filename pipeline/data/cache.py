"""Where this project keeps what it builds once and reuses offline: the cache root and the setup hint.

``<cache root>/models/<name>/`` holds converted offline models (:mod:`pipeline.data.offline_models`),
``<cache root>/text/austen/`` the extracted Austen novels (:mod:`pipeline.data.text`).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DBKSVD_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/dbksvd-pipeline``)."""
SETUP_HINT = "run `bash setup.sh` in the repository root (it installs the offline model and text packages)"


def cache_root() -> Path:
    """Root of this project's on-disk cache (converted models, extracted text)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dbksvd-pipeline")


__all__ = ["CACHE_ENV", "SETUP_HINT", "cache_root"]
