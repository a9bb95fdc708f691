"""A normal (non-editable) install works: budgets, configs, claims and proxy assets ship in the wheel.

The wheel is built from a copy of the source (so the checkout gets no build/ or egg-info) and
installed without dependencies into a fresh venv. The dependencies come from this test's own
environment through a .pth file that lists its site-packages as a plain path line: Python appends
such a directory to sys.path without running the .pth files inside it, so the editable install's
finder, which would map `bench` back to the checkout, stays inactive. The test checks that.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("bench", "methods", "metrics", "datasets", "pyproject.toml", "README.md")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", ".pretrain-*", ".*.tmp*")


def _run(args: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, \
        f"{' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _data_files(root: Path) -> set[str]:
    """Every non-Python file of the bench package in the source tree, relative to bench/."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree(REPO / name, src / name, ignore=IGNORE) if (REPO / name).is_dir()
         else shutil.copy2(REPO / name, src / name))
    outside = tmp_path / "elsewhere"  # a cwd with no checkout above it
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", CONTROLBENCH_CACHE=str(tmp_path / "cache"),
               PYTHONNOUSERSITE="1")

    # Build offline with this environment's setuptools where it has one (no build isolation download).
    pip = [sys.executable, "-m", "pip"]
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = _run([*pip, "wheel", "--no-deps", *isolation, "-w", tmp_path / "dist", src], outside, env)
    assert "would be ignored" not in build.stdout + build.stderr, "setuptools warns about unlisted data directories"
    (wheel,) = (tmp_path / "dist").glob("controlbench-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], outside, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], outside, env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], outside, env)
                .stdout.strip())
    (site / "_controlbench_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    # The installed package, not the checkout, and every data file of the source tree shipped.
    names = ("bench", "bench.methods", "bench.metrics", "bench.datasets", "bench.proxy")
    where = _run([python, "-c", f"import importlib.util\nfor n in {names}: print(importlib.util.find_spec(n).origin)"],
                 outside, env).stdout.split()  # find_spec: located, not imported (torch loads once, in `bench list`)
    assert len(where) == 5 and all(Path(w).resolve().is_relative_to(site.resolve()) for w in where), where
    missing = _data_files(src / "bench") - _data_files(site / "bench")
    assert not missing, f"not in the wheel: {sorted(missing)[:5]}"

    bench = venv / "bin" / "bench"
    listed = _run([bench, "list"], outside, env).stdout
    assert "controlnet" in listed and "smoke" in listed and "canny_f1" in listed

    out = tmp_path / "out"
    _run([bench, "run", "budget=smoke", "methods=baseline,controlnet", "seeds=0", f"out_dir={out}", "--quiet"],
         outside, env)
    with sqlite3.connect(out / "store.sqlite") as db:
        rows = db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
    assert rows == [("FINISHED", 2)], rows
    _run([bench, "report", "--store", out / "store.sqlite", "--out", tmp_path / "report"], outside, env)
    assert (tmp_path / "report" / "leaderboard.md").is_file()
