"""Multi-process training: Lightning DDP on 2 CPU processes (gloo) on the proxy, smoke budget.

Only rank 0 evaluates and writes; the record says it ran on 2 processes; the budget's batch size
is the global batch (each process loads half), so a step sees as many samples as on 1 process."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from bench.core.store import Store, machine_key

BENCH = [sys.executable, "-m", "bench.cli"]


def test_ddp_two_cpu_processes_rank0_records(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CONTROLBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(BENCH + ["run", "methods=controlnet", "budget=smoke", "budget.eval_samples=4", "seeds=0", "metrics=canny_f1",
                                  "strategy=ddp", "devices=2", "--quiet", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    with Store(out / "store.sqlite", read_only=True) as store:
        (rec,) = store.records()  # one record: rank 1 trained but wrote nothing
    assert rec.finished, rec.reason
    assert rec.spec["trainer"] == {"devices": 2, "strategy": "ddp"}
    assert rec.machine["world_size"] == 2 and rec.machine["device"] == "cpu"  # it ran on 2 processes
    assert machine_key(rec.machine) != machine_key({**rec.machine, "world_size": 1})  # never averaged with 1-process runs
    assert 0.0 <= rec.metrics["canny_f1"] <= 1.0 and math.isfinite(rec.compute["step_time_s"])
    assert rec.compute["params_trainable"] > 0
    assert [p.name for p in (out / "records").iterdir()] == [f"{rec.run_id}.json"]
    assert len(list((out / "images" ).rglob("*.png"))) == rec.spec["budget_fields"]["eval_samples"]


def test_global_batch_must_split_over_the_processes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CONTROLBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(BENCH + ["run", "methods=controlnet", "budget=smoke", "budget.batch_size=3", "seeds=0",
                                  "metrics=canny_f1", "strategy=ddp", "devices=2", "--quiet", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    with Store(out / "store.sqlite", read_only=True) as store:
        (rec,) = store.records()
    assert rec.status == "FAILED" and "batch_size 3 does not split over 2 processes" in rec.reason, rec.reason
    assert res.returncode == 1
