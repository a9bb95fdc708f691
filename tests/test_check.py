"""`bench check`: planted regressions fail naming method and metric; unchanged passes; new methods
must beat `baseline`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.analysis.check import load_baseline
from bench.cli import main
from bench.core.store import RunRecord, Store

REPO = Path(__file__).resolve().parent.parent
META = {"canny_f1": {"version": "c1", "higher_is_better": True, "consistency": True},
        "fd_segnet": {"version": "f1", "higher_is_better": False}}


def _record(method: str, seed: int, canny: float, fd: float = 10.0, run: str = "") -> RunRecord:
    spec = {"method": method, "method_version": "1", "dataset": "shapes", "dataset_version": "d",
            "condition": "canny", "budget": "smoke", "budget_key": "bk", "seed": seed, "base_model": "proxy",
            "hparams": {}}
    return RunRecord(run_id=run or f"{method}-{seed}", spec=spec, status="FINISHED",
                     metrics={"canny_f1": canny, "fd_segnet": fd}, metric_meta=META)


def _store(path: Path, records: list[RunRecord]) -> Path:
    with Store(path) as store:
        for rec in records:
            store.put(rec)
    return path


@pytest.fixture
def baseline_file(tmp_path) -> Path:
    """A baseline written by `--update-baseline` from baseline+controlnet over two seeds."""
    store = _store(tmp_path / "base.sqlite", [_record("baseline", s, 0.20 + s / 100) for s in (0, 1)]
                   + [_record("controlnet", s, 0.50 + s / 100) for s in (0, 1)])
    path = tmp_path / "ci" / "baseline.json"
    assert main(["check", "--baseline", str(path), "--store", str(store), "--update-baseline"]) == 0
    return path


def _check(tmp_path: Path, baseline: Path, records: list[RunRecord], capsys) -> tuple[int, str]:
    store = _store(tmp_path / "cur.sqlite", records)
    code = main(["check", "--baseline", str(baseline), "--store", str(store)])
    return code, capsys.readouterr().out


def test_unchanged_passes(tmp_path, baseline_file, capsys):
    capsys.readouterr()
    recs = [_record("baseline", s, 0.20 + s / 100) for s in (0, 1)] + \
           [_record("controlnet", s, 0.50 + s / 100) for s in (0, 1)]
    code, out = _check(tmp_path, baseline_file, recs, capsys)
    assert code == 0 and "OK, 4" in out, out
    assert not list(baseline_file.parent.glob(".*tmp")), "baseline write left a temp file"


def test_planted_regression_fails_naming_method_and_metric(tmp_path, baseline_file, capsys):
    capsys.readouterr()
    recs = [_record("baseline", s, 0.20 + s / 100) for s in (0, 1)] + \
           [_record("controlnet", s, 0.05, fd=10.0) for s in (0, 1)]  # "returns noise"
    code, out = _check(tmp_path, baseline_file, recs, capsys)
    assert code == 1
    rows = [line for line in out.splitlines() if line.startswith("| controlnet")]
    assert len(rows) == 1 and "| canny_f1 |" in rows[0] and "regressed" in rows[0], out


def test_lower_is_better_metric_regresses_upwards(tmp_path, baseline_file, capsys):
    capsys.readouterr()
    recs = [_record("baseline", s, 0.20 + s / 100, fd=30.0) for s in (0, 1)] + \
           [_record("controlnet", s, 0.50 + s / 100, fd=5.0) for s in (0, 1)]
    code, out = _check(tmp_path, baseline_file, recs, capsys)
    assert code == 1 and "| baseline | fd_segnet |" in out and "controlnet" not in out, out


def test_change_within_tolerance_passes(tmp_path, baseline_file, capsys):
    capsys.readouterr()
    recs = [_record("baseline", s, 0.20 + s / 100 - 0.01) for s in (0, 1)] + \
           [_record("controlnet", s, 0.50 + s / 100 - 0.01) for s in (0, 1)]
    code, out = _check(tmp_path, baseline_file, recs, capsys)
    assert code == 0, out


def test_new_method_must_beat_baseline(tmp_path, baseline_file, capsys):
    capsys.readouterr()
    same = [_record("baseline", s, 0.20 + s / 100) for s in (0, 1)] + \
           [_record("controlnet", s, 0.50 + s / 100) for s in (0, 1)]
    code, out = _check(tmp_path, baseline_file, same + [_record("t2i_adapter", s, 0.19) for s in (0, 1)], capsys)
    assert code == 1 and "| t2i_adapter | canny_f1 |" in out and "does not beat" in out, out

    code, out = _check(tmp_path, baseline_file, [_record("t2i_adapter", s, 0.40, run=f"t2i-good-{s}")
                                                 for s in (0, 1)], capsys)
    assert code == 0, out


def test_failed_run_of_a_baselined_method_fails(tmp_path, baseline_file, capsys):
    capsys.readouterr()
    crashed = RunRecord(run_id="cn-crash", spec=_record("controlnet", 0, 0).spec, status="FAILED",
                        reason="RuntimeError: boom")
    code, out = _check(tmp_path, baseline_file, [_record("baseline", s, 0.20 + s / 100) for s in (0, 1)]
                       + [crashed], capsys)
    assert code == 1 and "controlnet" in out and "boom" in out, out


def test_bad_baseline_file_exits_2_with_one_line(tmp_path, capsys):
    store = _store(tmp_path / "s.sqlite", [_record("baseline", 0, 0.2)])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [{"method": "x"}]}))
    assert main(["check", "--baseline", str(bad), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--update-baseline" in err


def test_checked_in_baseline_covers_the_regression_sweep():
    entries, tolerances = load_baseline(REPO / "sweeps" / "regression" / "baseline.json")
    assert {e.arm.method for e in entries} == {"baseline", "controlnet", "t2i_adapter"}
    assert {e.metric for e in entries} == {"canny_f1", "canny_f1_cnpp", "prompt_fidelity"} and "default" in tolerances
    assert all(s.n == 2 for s in entries.values()), "the regression sweep runs two seeds per method"
    paired = {e.arm.method for e, s in entries.items() if e.metric == "canny_f1_cnpp" and s.samples}
    assert paired == {"baseline", "controlnet", "t2i_adapter"}, "the per-image metric gates on paired deltas"


# ---- paired per-sample deltas (issue 16) -----------------------------------------------------------

def _per_sample_runs(method: str, scale: float, noise_seed: int, seeds=(0, 1, 2), n: int = 100) -> list[RunRecord]:
    """canny_f1 per sample: the samples' difficulty and the per-(seed, sample) noise are the same
    for every run of a seed (the shared sampler's noise), times ``scale``, plus residual noise drawn
    from ``noise_seed`` (a rerun)."""
    import dataclasses

    import numpy as np

    world = np.random.default_rng(5)
    difficulty, shared = world.uniform(0.4, 0.8, n), world.normal(0, 0.1, (len(seeds), n))
    rerun = np.random.default_rng(noise_seed)
    out = []
    for k, s in enumerate(seeds):
        x = (difficulty + shared[k]) * scale + rerun.normal(0, 0.02, n)
        rec = _record(method, s, float(x.mean()))
        out.append(dataclasses.replace(rec, sample_scores={"canny_f1": {f"s{i}": float(v) for i, v in enumerate(x)}}))
    return out


@pytest.fixture
def per_sample_baseline(tmp_path) -> Path:
    store = _store(tmp_path / "base.sqlite", _per_sample_runs("baseline", 0.4, 1) + _per_sample_runs("controlnet", 1.0, 2))
    path = tmp_path / "ci" / "baseline.json"
    assert main(["check", "--baseline", str(path), "--store", str(store), "--update-baseline"]) == 0
    entries, _ = load_baseline(path)
    assert all(s.samples and len(s.samples) == 3 for e, s in entries.items() if e.metric == "canny_f1")
    return path


def test_paired_check_catches_a_planted_5pct_drop(tmp_path, per_sample_baseline, capsys):
    runs = _per_sample_runs("baseline", 0.4, 11) + _per_sample_runs("controlnet", 0.95, 12)
    code, out = _check(tmp_path, per_sample_baseline, runs, capsys)
    assert code == 1 and "controlnet" in out and "canny_f1" in out and "paired worsening" in out
    assert "hierarchical bootstrap" in out


def test_paired_check_is_quiet_on_a_reseeded_identical_method(tmp_path, per_sample_baseline, capsys):
    runs = _per_sample_runs("baseline", 0.4, 21) + _per_sample_runs("controlnet", 1.0, 22)
    code, out = _check(tmp_path, per_sample_baseline, runs, capsys)
    assert code == 0, out


def test_a_format_2_baseline_still_reads(tmp_path, baseline_file):
    raw = json.loads(baseline_file.read_text())
    raw["format"] = "controlbench-baseline/2"
    baseline_file.write_text(json.dumps(raw))
    entries, _ = load_baseline(baseline_file)
    assert entries and all(s.samples is None for s in entries.values())
