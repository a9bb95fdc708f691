"""Where the installed package's own files are: every `__file__`-relative path starts here."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # bench/
CONFIGS_DIR = PACKAGE_DIR / "configs"  # budgets, shipped run configs, architecture configs
CACHE_ENV = "CONTROLBENCH_CACHE"


def cache_dir() -> Path:
    """Where derived data (materialized splits, FID reference features) is cached; CONTROLBENCH_CACHE overrides."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "controlbench"))
