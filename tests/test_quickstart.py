"""The quickstart (`make run`) leaderboard carries paired intervals and says how they were made."""
from __future__ import annotations

import pytest

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
    """Each record carries its phases' wall seconds (bench.run.execute.PhaseClock), which add up to no
    more than the run process's life; `bench.profile.benchmarks.quickstart_split` sums them per phase, as
    lane-seconds when runs ran two at a time."""
    from bench.core.store import Store
    from bench.profile.benchmarks import PHASES, quickstart_split

    out = tmp_path / "qs"
    assert main(["run", "bench/configs/quickstart.yaml", "budget=smoke", "methods=baseline,controlnet", "seeds=0",
                 f"out_dir={out}", "--quiet", "--jobs", "2"]) == 0
    records = Store(out / "store.sqlite", read_only=True).records("FINISHED", with_scores=False)
    assert len(records) == 2
    for r in records:
        c = r.compute
        inside = sum(c[f"phase_{p}_s"] for p in ("build", "data", "train", "checkpoint", "evaluate"))
        assert 0 < c["phase_sample_s"] <= c["phase_evaluate_s"] and 0 < inside <= c["phase_total_s"]
    trained = next(r for r in records if r.method == "controlnet").compute
    assert trained["phase_train_s"] > next(r for r in records if r.method == "baseline").compute["phase_train_s"]
    text = quickstart_split(out / "store.sqlite", wall=100.0, install=42.0, jobs=2)
    assert "2 runs" in text and "42 s install" in text and all(f"  {p}" in text for p in PHASES + ("start-up",))
    # two runs at a time: the phases are lane-seconds out of 2 x wall, each share within 0-100%
    assert "2 at a time" in text and "2 x 100 s = 200" in text
    shares = [float(line.split()[-1].rstrip("%")) for line in text.splitlines() if line.rstrip().endswith("%")]
    assert len(shares) == len(PHASES) + 1 and all(0 <= s <= 100 for s in shares)


def test_median_ratio_interval_is_a_point_for_an_exact_ratio():
    """Every step of the harness exactly 1.5x its paired bare step: ratio and both bounds are 1.5;
    a harness that is sometimes slower widens the interval around the median."""
    from bench.profile.benchmarks import median_ratio

    bare = [0.1 + 0.01 * i for i in range(30)]
    assert median_ratio([1.5 * b for b in bare], bare) == pytest.approx((1.5, 1.5, 1.5))
    ratio, lo, hi = median_ratio([b * (1.0 if i % 2 else 1.2) for i, b in enumerate(bare)], bare)
    assert lo <= ratio <= hi and lo < hi


def test_train_ratio_interleaves_the_harness_and_bare_loops():
    """The overhead benchmark times the same number of harness and bare steps, one pair per step."""
    from bench.api.base_model import BaseModel
    from bench.core.budget import load_budgets
    from bench.profile.benchmarks import train_ratio

    harness, bare = train_ratio(BaseModel.load("proxy"), load_budgets()["smoke"], steps=4, batch=2)
    assert len(harness) == len(bare) == 4 and min(harness + bare) > 0
