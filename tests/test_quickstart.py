"""The quickstart (`make run`) leaderboard carries paired intervals and says how they were made."""
from __future__ import annotations

from bench.cli import main


def test_quickstart_leaderboard_shows_paired_intervals(tmp_path):
    """The shipped quickstart config at the smoke budget (2 methods, 2 seeds): canny_f1_cnpp has
    per-sample scores, so its column's interval is the hierarchical bootstrap and the table gets a
    paired difference against baseline; the pooled metrics say they fall back to the seed t-interval."""
    out = tmp_path / "qs"
    assert main(["run", "bench/configs/quickstart.yaml", "budget=smoke", "methods=baseline,controlnet",
                 f"out_dir={out}", "--quiet"]) == 0
    md = (out / "report" / "leaderboard.md").read_text()
    intervals = next(ln for ln in md.splitlines() if ln.startswith("Intervals:"))
    assert "canny_f1_cnpp" in intervals and "hierarchical bootstrap" in intervals
    assert "Student t over seed means (no per-sample scores)" in intervals
    paired = next(ln for ln in md.splitlines() if ln.startswith("Paired vs baseline"))
    assert "canny_f1_cnpp" in paired and "controlnet" in paired and "[" in paired


def test_quickstart_split_accounts_for_each_runs_time(tmp_path):
    """Each record carries its phases' wall seconds (bench.runner.PhaseClock), which add up to no
    more than the run process's life; `bench.benchmarks.quickstart_split` sums them per phase."""
    from bench.benchmarks import PHASES, quickstart_split
    from bench.store import Store

    out = tmp_path / "qs"
    assert main(["run", "bench/configs/quickstart.yaml", "budget=smoke", "methods=baseline,controlnet", "seeds=0",
                 f"out_dir={out}", "--quiet"]) == 0
    records = Store(out / "store.sqlite", read_only=True).records("FINISHED", with_scores=False)
    assert len(records) == 2
    for r in records:
        c = r.compute
        inside = sum(c[f"phase_{p}_s"] for p in ("build", "data", "train", "checkpoint", "evaluate"))
        assert 0 < c["phase_sample_s"] <= c["phase_evaluate_s"] and 0 < inside <= c["phase_total_s"]
    trained = next(r for r in records if r.method == "controlnet").compute
    assert trained["phase_train_s"] > next(r for r in records if r.method == "baseline").compute["phase_train_s"]
    text = quickstart_split(out / "store.sqlite", wall=100.0, install=42.0)
    assert "2 runs" in text and "42 s install" in text and all(f"  {p}" in text for p in PHASES + ("start-up",))
