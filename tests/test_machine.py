"""Machine identity in records; reports never average compute figures across machines."""
from __future__ import annotations

import socket

import pytest

from bench.cli import main
from bench.core.provenance import machine_identity
from bench.core.store import RunRecord, Store, machine_key
from bench.report.tables import leaderboard

CPU_BOX = {"device": "cpu", "device_name": None, "device_count": 0, "cuda": None, "driver": None,
           "cpu": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cpu_cores": 2, "torch_threads": 2, "torch": "2.5.1+cpu",
           "host": "a1b2c3d4e5f6"}
GPU_BOX = {"device": "cuda", "device_name": "NVIDIA H200", "device_count": 1, "cuda": "12.4", "driver": "550.54.15",
           "cpu": "AMD EPYC 9654 96-Core Processor", "cpu_cores": 16, "torch_threads": 16, "torch": "2.5.1+cu124",
           "host": "0f9e8d7c6b5a"}
F1 = {"version": "1", "higher_is_better": True, "consistency": True}  # as the runner records canny_f1 on canny runs


def _rec(run_id: str, method: str, seed: int, machine: dict, step: float, mem: float) -> RunRecord:
    spec = {"method": method, "method_version": "1", "dataset": "shapes", "dataset_version": "1", "condition": "canny",
            "budget": "smoke", "budget_key": "bk", "seed": seed, "base_model": "proxy", "hparams": {},
            "metric_versions": {"canny_f1": "1"}}
    return RunRecord(run_id=run_id, spec=spec, status="FINISHED", metrics={"canny_f1": 0.5 + 0.01 * seed},
                     metric_meta={"canny_f1": F1}, machine=machine,
                     compute={"params_trainable": 2.0e6, "params_total": 3.0e6, "step_time_s": step,
                              "peak_mem_mb": mem, "sample_latency_s": step / 10})


def test_identity_of_this_machine() -> None:
    m = machine_identity()
    assert m["device"] in ("cpu", "cuda") and m["torch"] and m["cpu"] and m["cpu_cores"] >= 1
    if m["device"] == "cpu":  # no accelerator: no CUDA or driver version to report
        assert m["device_name"] is None and m["device_count"] == 0 and m["cuda"] is None and m["driver"] is None
    else:
        assert m["device_name"] and m["device_count"] >= 1 and m["cuda"]
    assert socket.gethostname() not in m.values() and len(m["host"]) == 12  # a hash, never the raw name


def test_machine_key_ignores_the_host_but_not_the_hardware() -> None:
    assert machine_key(CPU_BOX) == machine_key({**CPU_BOX, "host": "another"})  # twin machines share figures
    assert machine_key(CPU_BOX) != machine_key({**CPU_BOX, "torch_threads": 8})
    assert machine_key(CPU_BOX) != machine_key(GPU_BOX)
    assert machine_key({}) == "unknown"


def test_records_round_trip_their_machine(tmp_path) -> None:
    r = _rec("r1", "controlnet", 0, GPU_BOX, 0.1, 900.0)
    assert RunRecord.from_json(r.to_json()).machine == GPU_BOX
    with Store(tmp_path / "s.sqlite") as s:
        s.put(r)
        assert s.get("r1").machine == GPU_BOX
    bare = _rec("r2", "controlnet", 0, {}, 0.1, 900.0)
    assert "machine" not in bare.to_json()  # records without one keep their old text


def test_merged_stores_from_two_machines_keep_compute_apart(tmp_path, capsys) -> None:
    # machine A (CPU) ran seeds 0, 1; machine B (GPU) ran seed 2; each has its own store
    a, b, merged = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "all.sqlite"
    with Store(a) as s:
        for seed in (0, 1):
            s.put(_rec(f"cn{seed}", "controlnet", seed, CPU_BOX, 2.0, 4000.0))
            s.put(_rec(f"bl{seed}", "baseline", seed, CPU_BOX, 1.0, 3000.0))
    with Store(b) as s:
        s.put(_rec("cn2", "controlnet", 2, GPU_BOX, 0.02, 800.0))
        s.put(_rec("bl2", "baseline", 2, GPU_BOX, 0.01, 500.0))
    assert main(["store", "merge", str(merged), str(a), str(b)]) == 0
    assert main(["report", "--store", str(merged), "--out", str(tmp_path / "rep"), "--html"]) == 0
    capsys.readouterr()

    with Store(merged, read_only=True) as s:
        records = s.records()
    (table,) = leaderboard(records)[0]
    assert table.split_by_machine and set(table.machines) == {machine_key(CPU_BOX), machine_key(GPU_BOX)}
    cn = next(r for r in table.rows if r.method == "controlnet")
    assert cn.n_seeds == 3  # metrics still pool the seeds: they do not depend on the machine
    assert "step_time_s" not in cn.compute and "peak_mem_mb" not in cn.compute  # never averaged across machines
    assert cn.compute["params_trainable"] == 2.0e6  # parameter counts do not depend on the machine
    assert cn.compute_by_machine[machine_key(CPU_BOX)] == (2, {"step_time_s": 2.0, "peak_mem_mb": 4000.0,
                                                               "sample_latency_s": 0.2})
    assert cn.compute_by_machine[machine_key(GPU_BOX)][1]["step_time_s"] == 0.02

    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "Compute figures split by machine" in md and "2 different machines" in md
    assert "NVIDIA H200" in md and "AMD EPYC" in md and "Intel(R) Xeon(R)" in md
    cn_lines = [line for line in md.splitlines() if line.startswith("| controlnet |")]
    assert len(cn_lines) == 3  # the leaderboard row and one row per machine
    assert any("| 2.00 | 4000 |" in line for line in cn_lines) and any("| 0.0200 | 800 |" in line for line in cn_lines)
    assert not any("1.01" in line for line in cn_lines)  # the cross-machine mean step time (2+2+0.02)/3
    html = (tmp_path / "rep" / "leaderboard.html").read_text()
    assert "Compute figures split by machine" in html and 'class="by-machine"' in html


def test_one_machine_is_named_not_split() -> None:
    (table,) = leaderboard([_rec(f"cn{s}", "controlnet", s, CPU_BOX, 2.0 + s, 4000.0) for s in range(2)])[0]
    assert not table.split_by_machine and table.rows[0].compute["step_time_s"] == 2.5


def test_claims_never_compare_step_times_across_machines() -> None:
    from bench.analysis.claims import evaluate, load_claims

    claim = next(c for c in load_claims() if c.id == "t2i-adapter-faster-step")
    # controlnet only on the GPU box, t2i_adapter only on the CPU box: a 10x "speed-up" that is the machine's
    split = [_rec("a", "controlnet", 0, GPU_BOX, 0.1, 100.0), _rec("b", "t2i_adapter", 0, CPU_BOX, 1.0, 100.0)]
    r = evaluate(claim, split)
    assert r.verdict == "not measured" and "no machine ran both sides" in r.detail, r
    # both on both boxes: measured per machine, and the detail names the machine it used
    both = split + [_rec("c", "controlnet", 1, CPU_BOX, 2.0, 100.0), _rec("d", "t2i_adapter", 1, GPU_BOX, 0.05, 100.0)]
    r = evaluate(claim, both)
    assert r.verdict == "reproduced" and r.measured == pytest.approx(0.5) and ", on " in r.detail, r
    # parameter counts do not depend on the machine: they still pool
    params = next(c for c in load_claims() if c.id == "controlnext-param-reduction")
    assert evaluate(params, [_rec("a", "controlnet", 0, GPU_BOX, 0.1, 1.0),
                             _rec("b", "controlnext", 0, CPU_BOX, 0.1, 1.0)]).verdict != "not measured"
