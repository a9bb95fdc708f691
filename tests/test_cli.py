"""CLI behaviour: bad input exits 2 with one line; runs are resumable after SIGKILL."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from bench.cli import main

BENCH = [sys.executable, "-m", "bench.cli"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "CONTROLBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("argv, needle", [
    (["run", "methods=contrlnet"], "did you mean 'controlnet'"),
    (["run", "budget=nope"], "unknown budget"),
    (["run", "oops"], "cannot read config"),
    (["run", "budget.train_steps=-3"], "train_steps"),
    (["run", "--frobnicate=1"], "unknown config key"),
    (["run", "hparams.controlnet.nope=1"], "unknown hparam"),
    (["run", "metrics=fid_typo"], "unknown metric"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_corrupt_config_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [baseline\nbudget: : smoke\n")
    out = subprocess.run([*BENCH, "run", str(bad)], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "not valid YAML" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_missing_base_model_fails_before_compute(tmp_path, capsys):
    assert main(["run", f"base_model={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "base model file missing" in err and "unet/config.json" in err
    assert not (tmp_path / "out").exists()


def test_sdxl_directory_without_its_second_text_encoder_fails_before_compute(tmp_path, tiny_sdxl_dir, capsys):
    import shutil

    partial = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_dir, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    assert main(["run", f"base_model={partial}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "base model file missing" in err and "text_encoder_2/config.json" in err
    assert not (tmp_path / "out").exists()


def _finished(store: Path) -> list[tuple[str, float]]:
    if not store.exists():
        return []
    try:
        with sqlite3.connect(store) as db:
            return db.execute("SELECT run_id, updated_at FROM runs WHERE status='FINISHED' ORDER BY run_id").fetchall()
    except sqlite3.OperationalError:
        return []


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_completes_without_duplicates(tmp_path, proxy_arch_dir):
    out = tmp_path / "out"
    args = [*BENCH, "run", "budget=smoke", "methods=baseline,controlnet", "seeds=0,1",
            f"base_model={proxy_arch_dir}", f"out_dir={out}", "--quiet"]
    proc = subprocess.Popen(args, env=_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _finished(out / "store.sqlite") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    first = _finished(out / "store.sqlite")
    assert first, "no run finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its run process
    proc.wait()
    assert len(first) < 4, "the sweep ended before it could be killed"

    rerun = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = _finished(out / "store.sqlite")
    assert len(done) == 4 and len({r for r, _ in done}) == 4
    assert set(first) <= set(done), "a FINISHED record was rewritten or lost"
    pngs = [p for p in (out / "images").rglob("*.png") if not p.name.startswith(".")]
    assert len(pngs) == 4 * 8
    assert all(cv2.imread(str(p)) is not None for p in pngs), "half-written PNG"

    again = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4/4 runs finished" in again.stdout
    assert _finished(out / "store.sqlite") == done
