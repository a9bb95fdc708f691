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
