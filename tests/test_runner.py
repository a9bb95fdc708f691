"""Failures become FAILED records with a reason, and a sweep goes on past them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.core.store import RunRecord, Store
from bench.run.spec import apply_overrides, load_config, resolve


def _specs(base_dir, tmp_path, **over):
    pairs = [("budget", "smoke"), ("base_model", str(base_dir)), ("out_dir", str(tmp_path / "out")), ("seeds", [0])]
    pairs += list(over.items())
    return resolve(apply_overrides(load_config(None), pairs))


def test_nan_loss_raises_a_clear_error(proxy_arch_dir, smoke_budget):
    import bench.methods  # noqa: F401
    from bench.datasets.shapes import ShapesWorld

    from bench.api.base_model import BaseModel
    from bench.api.types import collate
    from bench.core.registry import METHODS

    method = METHODS.get("controlnet")(BaseModel.load(str(proxy_arch_dir)), "canny", smoke_budget, {})
    batch = collate([ShapesWorld("train", 2, 32, conditions=("canny",))[i] for i in range(2)])
    batch.image[:] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss.*lower lr"):
        method.training_step(batch, 0)


def test_failed_run_is_recorded_and_the_sweep_goes_on(proxy_arch_dir, tmp_path):
    from bench.run.runner import run_specs

    (good,), out = _specs(proxy_arch_dir, tmp_path, methods=["baseline"])
    bad = dataclasses.replace(good, base_model=str(tmp_path / "missing"))
    with Store(tmp_path / "store.sqlite") as store:
        records = run_specs([bad, good], store, out, progress=False)
        assert [r.status for r in records] == ["FAILED", "FINISHED"]
        assert "base model file missing" in records[0].reason
        stored = store.get(bad.run_id)
        assert isinstance(stored, RunRecord) and stored.status == "FAILED"
        finished = store.get(good.run_id)
        assert set(finished.metrics) == {"canny_f1", "canny_f1_cnpp", "prompt_fidelity", "fd_segnet"}
        assert all(torch.isfinite(torch.tensor(v)) for v in finished.metrics.values())
        assert finished.compute["params_trainable"] == 0 and finished.compute["peak_mem_mb"] > 0
        assert finished.spec["budget_key"] == good.budget.key() and finished.git_sha


def test_a_run_planned_with_other_code_versions_is_refused(proxy_arch_dir, tmp_path):
    from bench.core.errors import ConfigError
    from bench.run.execute import execute

    (spec,), out = _specs(proxy_arch_dir, tmp_path, methods=["baseline"], metrics=["fd_segnet"])
    stale = dataclasses.replace(spec, method_version="baseline-v0")
    with pytest.raises(ConfigError, match="baseline-v0 -> baseline-v1.*run the command again"):
        execute(stale, out, progress=False)


def test_consistency_curve_is_measured_on_fixed_steps_and_subset(proxy_arch_dir, tmp_path):
    from bench.run.execute import execute

    (spec, *_), out = _specs(proxy_arch_dir, tmp_path, methods=["controlnet"], metrics=["canny_f1", "fd_segnet"],
                             **{"budget.curve_steps": [0, 2], "budget.curve_samples": 4})
    rec = execute(spec, out, progress=False)
    points = {(p["step"], p["metric"]) for p in rec.curve}
    assert points == {(0, "canny_f1"), (2, "canny_f1"), (4, "canny_f1")}  # fd is not a consistency metric
    assert all(0 <= p["value"] <= 1 for p in rec.curve)
    assert len(rec.metrics) == 2 and rec.compute["step_time_s"] > 0


def test_a_run_process_whose_launcher_is_already_gone_does_nothing(proxy_arch_dir, tmp_path):
    """The race between fork and prctl: a run process started by a launcher that died before the death
    signal was set finds another parent and exits at once, before importing torch or running anything."""
    import json
    import os
    import subprocess
    import sys
    import time

    from bench.run.process import PARENT_ENV, PARENT_GONE, RUN_MODULE

    (spec,), out = _specs(proxy_arch_dir, tmp_path, methods=["baseline"])
    result = out / "records" / f"{spec.run_id}.json"
    t0 = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", RUN_MODULE, spec.run_id, str(out), str(result), "0",
                            json.dumps(spec.to_dict())], env={**os.environ, PARENT_ENV: "1"},  # not its parent
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == PARENT_GONE, child.stderr
    assert not out.exists() and time.perf_counter() - t0 < 30


def test_a_run_claimed_by_another_live_process_is_skipped_and_reported(proxy_arch_dir, tmp_path, monkeypatch):
    import socket

    import bench.run.runner as runner
    from bench.run.execute import failed

    specs, out = _specs(proxy_arch_dir, tmp_path, methods=["baseline"], seeds=[0, 1])
    executed = []

    # the decision under test: which specs reach here
    def spy(spec, out_dir, progress=True, threads=None, started=None, launcher=None, gpu=None):
        executed.append(spec.run_id)
        return dataclasses.replace(failed(spec, ""), status="FINISHED")

    monkeypatch.setattr(runner, "run_isolated", spy)
    with Store(tmp_path / "store.sqlite") as store:
        store._db.execute("INSERT INTO claims VALUES (?, ?, 1, ?)", (specs[0].run_id, socket.gethostname(), 9e9))
        summary = runner.run_all(specs, store, out, progress=False)
        assert executed == [specs[1].run_id] and summary.ran == 1 and summary.elsewhere == [specs[0]]
        assert [r.run_id for r in summary.records] == [specs[1].run_id] and store.is_finished(specs[1].run_id)
        assert store._db.execute("SELECT run_id FROM claims").fetchall() == [(specs[0].run_id,)]  # ours released
        again = runner.run_all(specs, store, out, progress=False)  # finished: not run, not claimed
        assert executed == [specs[1].run_id] and again.ran == 0 and again.elsewhere == [specs[0]]


def test_jobs_run_several_run_processes_at_once(proxy_arch_dir, tmp_path):
    """run_all(jobs=2): every spec runs once, in its own process with half the cores' threads,
    records come back in spec order and say the machine was shared."""
    import os
    import threading

    import bench.run.runner as runner

    specs, out = _specs(proxy_arch_dir, tmp_path, methods=["baseline"], seeds=[0, 1, 2])
    cores = len(os.sched_getaffinity(0))
    live, peak, lock = set(), [0], threading.Lock()
    real = runner.run_isolated

    def counting(spec, out_dir, progress=True, threads=None, started=None, launcher=None, gpu=None):
        with lock:
            live.add(spec.run_id)
            peak[0] = max(peak[0], len(live))
        try:
            return real(spec, out_dir, progress, threads, started, launcher, gpu)
        finally:
            with lock:
                live.discard(spec.run_id)

    runner.run_isolated = counting
    try:
        with Store(tmp_path / "store.sqlite") as store:
            summary = runner.run_all(specs, store, out, progress=False, jobs=2)
    finally:
        runner.run_isolated = real
    assert summary.ran == 3 and [r.run_id for r in summary.records] == [s.run_id for s in specs]
    assert all(r.finished for r in summary.records) and peak[0] == 2
    for r in summary.records:
        assert r.machine["concurrent_runs"] == 2 and r.machine["torch_threads"] == max(1, cores // 2)


fork_server = pytest.mark.skipif(not __import__("bench.run.forkserver").run.forkserver.supported(),
                                 reason="the fork server needs Linux and setproctitle")


@fork_server
def test_a_forked_run_records_what_a_fresh_interpreter_records(proxy_arch_dir, tmp_path, monkeypatch):
    """The fork server changes how a run process starts, not what it computes: the same scores to
    the bit. Each record says how its process started, and their machine keys differ (CPU peak RSS
    depends on it)."""
    from bench.core.store import machine_key
    from bench.run.runner import run_all

    (spec,), out = _specs(proxy_arch_dir, tmp_path, methods=["controlnet"], metrics=["canny_f1"])
    records = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("CONTROLBENCH_FORK_SERVER", mode)
        with Store(tmp_path / f"store{mode}.sqlite") as store:
            (records[mode],) = run_all([spec], store, out / mode, progress=False).records
    forked, fresh = records["1"], records["0"]
    assert forked.finished and fresh.finished, (forked.reason, fresh.reason)
    assert forked.machine["run_process"] == "fork-server" and fresh.machine["run_process"] == "interpreter"
    assert forked.metrics == fresh.metrics and forked.sample_scores == fresh.sample_scores
    assert forked.machine["torch_threads"] == fresh.machine["torch_threads"]
    assert machine_key(forked.machine) != machine_key(fresh.machine)


@fork_server
def test_a_dead_fork_server_fails_its_live_run_and_later_runs_start_fresh(proxy_arch_dir, tmp_path, capsys):
    import os
    import signal

    from bench.run.process import Launcher, run_isolated

    specs, out = _specs(proxy_arch_dir, tmp_path, methods=["baseline"], seeds=[0, 1])
    with Launcher() as launcher:
        def kill_the_server(run) -> None:  # the run has just been forked: it dies by its death signal
            os.kill(launcher._server._proc.pid, signal.SIGKILL)

        first = run_isolated(specs[0], out, progress=False, started=kill_the_server, launcher=launcher)
        second = run_isolated(specs[1], out, progress=False, launcher=launcher)
    assert first.status == "FAILED" and "killed by signal 9" in first.reason
    assert second.finished and second.machine["run_process"] == "interpreter"
    assert "runs start in a fresh interpreter" in capsys.readouterr().err

