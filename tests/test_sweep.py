"""Sweeps: every sweeps/*.yaml resolves; local sweeps resume after SIGKILL and share work."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.core.errors import ConfigError
from bench.core.store import Store
from bench.run.process import run_isolated
from bench.run.sweep import (
    configs,
    fit_metrics,
    load_sweep,
    overrides,
    resolve_sweep,
    sweep_files,
)

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
BENCH = [sys.executable, "-m", "bench.cli"]


def _env(tmp_path: Path) -> dict:
    # The mirror is tested in test_wandb.py; here it would only add seconds per run.
    return {**os.environ, "CONTROLBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled"}


def _grid(tmp_path: Path, base: Path, n: int) -> Path:
    """A cheap n-config grid: baseline (trains nothing) x n seeds at the smoke budget, canny_f1 only.
    Claims and resume do not depend on the method; run time is mostly process start."""
    sweep = {"program": "bench.cli", "method": "grid", "metric": {"name": "metrics/canny_f1", "goal": "maximize"},
             "command": ["${env}", "${interpreter}", "-m", "${program}", "run", "${args}"],
             "parameters": {"methods": {"value": "baseline"}, "seeds": {"values": list(range(n))},
                            "budget": {"value": "smoke"}, "base_model": {"value": str(base)},
                            "metrics": {"value": ["canny_f1"]}, "out_dir": {"value": str(tmp_path / "out")}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _finished(store: Path) -> list[tuple[str, float]]:
    if not store.exists():  # sqlite3.connect would make a 0-byte file there, which a store refuses (issue 28)
        return []
    try:
        with sqlite3.connect(store) as db:
            return db.execute("SELECT run_id, updated_at FROM runs WHERE status='FINISHED' ORDER BY run_id").fetchall()
    except sqlite3.OperationalError:
        return []


def test_sweep_files_are_wandb_format_and_resolve_against_the_registries():
    files = sweep_files(SWEEPS)
    names = {p.stem for p in files}
    assert {"spatial", "identity", "compute_profile", "regression"} <= names and "budgets" not in names
    caps = set()
    for path in files:
        raw = yaml.safe_load(path.read_text())
        assert {"program", "method", "metric", "parameters", "command"} <= set(raw), path
        assert "${args}" in raw["command"] or "${args_no_hyphens}" in raw["command"], path
        sweep = load_sweep(path)
        specs, _ = resolve_sweep(sweep)  # raises ConfigError on any unregistered name
        assert specs, path
        if path.stem.startswith("tune_"):
            caps.add(sweep.run_cap)
    assert len(caps) == 1, "tuning sweeps must give every method the same number of trials"


def test_wandb_agent_args_and_local_overrides_agree():
    """`wandb agent` passes `--key=value`; the local sweep passes the same key/values."""
    from bench.run.spec import apply_overrides, load_config, parse_overrides

    sweep = load_sweep(SWEEPS / "compute_profile.yaml")
    cfg = configs(sweep)[0]
    agent_args = [f"--{k}={v}" for k, v in cfg.items()]
    assert apply_overrides(load_config(None), parse_overrides(agent_args)) == \
        apply_overrides(load_config(None), overrides(cfg))


def test_random_sweep_draws_are_seeded_and_counted():
    sweep = load_sweep(SWEEPS / "tune_controlnet.yaml")
    assert configs(sweep, seed=1) == configs(sweep, seed=1) != configs(sweep, seed=2)
    assert len(configs(sweep)) == sweep.run_cap and len(configs(sweep, count=3)) == 3


@pytest.mark.parametrize("text, needle", [
    ("method: grid\n", "parameters"),
    ("method: hill\nparameters: {methods: {value: baseline}}\n", "method must be one of"),
    ("method: grid\nparameters: {methods: {value: contrlnet}}\n", "did you mean 'controlnet'"),
    ("method: random\nparameters: {methods: {value: baseline}}\n", "run_cap"),
    ("method: grid\nparameters: {methods: 3}\n", "value:, values: or distribution:"),
])
def test_bad_sweep_file_exits_2_with_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["sweep", str(path), "--local", "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_a_stale_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store(tmp_path / "s.sqlite") as store:
        store._db.execute("INSERT INTO claims VALUES ('stale', ?, ?, 0)", (socket.gethostname(), dead.pid))
        store._db.execute("INSERT INTO claims VALUES ('live', ?, 1, ?)", (socket.gethostname(), time.time()))
        assert store.claim("stale") and store.claim("fresh")
        assert not store.claim("live")  # pid 1 is alive
        store.release("stale")
        assert store.claim("stale")


@pytest.mark.slow
def test_one_sweep_combination_runs_end_to_end_with_smoke(tmp_path, proxy_arch_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep = load_sweep(SWEEPS / "spatial.yaml")
    from bench.run.spec import apply_overrides, load_config, resolve

    grid = configs(sweep)
    assert len(grid) == 5 * 2 * 3, "one config per (method, condition, seed)"
    cfg = next(c for c in grid if c["methods"] == "controlnet" and c["condition"] == "canny" and c["seeds"] == 0)
    cfg.update(budget="smoke", seeds=[0], base_model=str(proxy_arch_dir))
    specs, _ = resolve(fit_metrics(apply_overrides(load_config(None), overrides(cfg)))[0])
    record = run_isolated(specs[0], tmp_path / "out", progress=False)
    assert record.finished, record.reason
    assert record.method == "controlnet" and set(record.metrics) == {"canny_f1", "prompt_fidelity", "fd_segnet"}


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_then_noop(tmp_path, proxy_arch_dir):
    grid = _grid(tmp_path, proxy_arch_dir, 4)
    store = tmp_path / "out" / "store.sqlite"
    args = [*BENCH, "sweep", str(grid), "--local", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _finished(store) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its run process, right after the first record
    proc.wait()
    first_s = time.perf_counter() - t0
    first = _finished(store)
    assert 1 <= len(first) < 4

    t0 = time.perf_counter()
    rerun = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    second_s = time.perf_counter() - t0
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = _finished(store)
    assert len(done) == 4 and set(first) <= set(done), "4 FINISHED, none rewritten"
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 4
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0

    t0 = time.perf_counter()
    again = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    third_s = time.perf_counter() - t0
    assert again.returncode == 0 and "0 ran here" in again.stdout and _finished(store) == done
    sweep_s = first_s + second_s  # the sweep's work, done across the killed run and its resume
    print(f"\nsweep timing: killed run {first_s:.1f}s + resume {second_s:.1f}s = {sweep_s:.1f}s; "
          f"no-op rerun {third_s:.2f}s ({100 * third_s / sweep_s:.2f}%)")
    assert third_s < 0.02 * sweep_s


@pytest.mark.slow
def test_two_concurrent_local_sweeps_share_a_6_config_grid(tmp_path, proxy_arch_dir):
    grid = _grid(tmp_path, proxy_arch_dir, 6)
    args = [*BENCH, "sweep", str(grid), "--local", "--quiet"]
    procs = [subprocess.Popen(args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    ran = [int(out.split("ran here")[0].split()[-1]) for out, _ in outs]
    assert sum(ran) == 6, outs  # each config ran exactly once, in one of the two processes
    with sqlite3.connect(tmp_path / "out" / "store.sqlite") as db:
        rows = db.execute("SELECT run_id, status FROM runs").fetchall()
    assert len(rows) == 6 and {s for _, s in rows} == {"FINISHED"}


def test_sweep_without_local_explains_wandb(tmp_path, capsys):
    assert main(["sweep", str(SWEEPS / "regression.yaml")]) == 2
    assert "wandb agent" in capsys.readouterr().err


def test_budget_refinement_of_a_named_budget():
    from bench.run.spec import apply_overrides, load_config, parse_overrides

    cfg = apply_overrides(load_config(None), parse_overrides(["budget.train_steps=9"]))
    assert cfg["budget"] == {"name": "quickstart", "train_steps": 9}
    with pytest.raises(ConfigError):
        load_sweep(Path("/nonexistent.yaml"))


def test_store_merge_is_idempotent_by_run_id(tmp_path, capsys):
    from bench.core.store import RunRecord

    def rec(run_id: str) -> RunRecord:
        return RunRecord(run_id=run_id, spec={"method": "baseline"}, status="FINISHED", created_at=1.0)

    for name, ids in (("a", ["r1", "r2"]), ("b", ["r2", "r3"])):
        with Store(tmp_path / f"{name}.sqlite") as store:
            for run_id in ids:
                store.put(rec(run_id))
    argv = ["store", "merge", str(tmp_path / "all.sqlite"), str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite")]
    assert main(argv) == 0 and main(argv) == 0
    assert "0 records merged" in capsys.readouterr().out.splitlines()[-2]
    with Store(tmp_path / "all.sqlite") as store:
        assert sorted(r.run_id for r in store.records()) == ["r1", "r2", "r3"]
    assert main(["store", "merge", str(tmp_path / "all.sqlite"), str(tmp_path / "nope.sqlite")]) == 2


def test_strategy_and_devices_reach_the_spec_without_changing_single_device_ids():
    from bench.run.spec import (
        RunSpec,
        apply_overrides,
        load_config,
        parse_overrides,
        resolve,
    )

    plain, _ = resolve(apply_overrides(load_config(None), parse_overrides(["budget=smoke", "methods=controlnet"])))
    ddp, _ = resolve(apply_overrides(load_config(None), parse_overrides(
        ["budget=smoke", "methods=controlnet", "--strategy", "ddp", "--devices=2"])))
    assert "trainer" not in plain[0].to_dict()
    assert dict(ddp[0].trainer) == {"strategy": "ddp", "devices": 2} and ddp[0].run_id != plain[0].run_id
    assert RunSpec.from_dict(ddp[0].to_dict()) == ddp[0]
