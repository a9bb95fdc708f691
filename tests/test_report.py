"""Report: CI maths, grouping rules (never mix budgets or metric versions), Markdown safety."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.report import ci95, leaderboard, render_markdown, write_report
from bench.store import RunRecord

META = {"git_sha": "deadbeefcafe", "generated_by": "bench report"}
F1 = {"version": "1", "higher_is_better": True}
FD = {"version": "1", "higher_is_better": False}


def rec(run_id: str, method: str = "controlnet", seed: int = 0, status: str = "FINISHED",
        budget_key: str = "bk1", f1: float = 0.5, f1_meta: dict | None = None,
        reason: str = "", created_at: float = 1.0, **spec: object) -> RunRecord:
    full_spec = {
        "method": method, "method_version": "1", "dataset": "shapes", "dataset_version": "1",
        "condition": "canny", "budget": "proxy-xs", "budget_key": budget_key, "seed": seed,
        "base_model": "proxy", "hparams": {},
    }
    full_spec.update(spec)
    return RunRecord(
        run_id=run_id, spec=full_spec, status=status, reason=reason, created_at=created_at,
        metrics={"canny_f1": f1, "fd_proxy": 10.0 * (1 - f1)},
        metric_meta={"canny_f1": f1_meta or F1, "fd_proxy": FD},
        compute={"params_trainable": 2.5e6, "step_time_s": 0.05},
    )


def test_ci95_hand_computed() -> None:
    mean, half = ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)


def test_ci95_small_n() -> None:
    mean, half = ci95([0.7])
    assert mean == 0.7 and math.isnan(half)
    mean, half = ci95([])
    assert math.isnan(mean) and math.isnan(half)


def test_aggregates_seeds_and_sorts_by_first_metric() -> None:
    records = [rec(f"a{s}", "controlnet", s, f1=0.6 + 0.01 * s) for s in range(3)]
    records += [rec(f"b{s}", "t2i_adapter", s, f1=0.8) for s in range(3)]
    tables, excluded = leaderboard(records)
    assert excluded == []
    (table,) = tables
    assert table.columns == ["canny_f1", "fd_proxy"]
    assert [r.method for r in table.rows] == ["t2i_adapter", "controlnet"]  # f1 higher first
    cn = table.rows[1]
    assert cn.n_seeds == 3
    assert cn.metrics["canny_f1"] == pytest.approx(ci95([0.60, 0.61, 0.62]))
    assert cn.compute["params_trainable"] == pytest.approx(2.5e6)


def test_lower_is_better_first_metric_sorts_ascending() -> None:
    fd_first = {"version": "1", "higher_is_better": False}
    records = [rec("a", "m1", f1=0.2, f1_meta=fd_first), rec("b", "m2", f1=0.9, f1_meta=fd_first)]
    (table,), _ = leaderboard(records)
    assert [r.method for r in table.rows] == ["m1", "m2"]


def test_never_mixes_budget_keys() -> None:
    records = [rec("a", budget_key="bk1"), rec("b", "t2i_adapter", budget_key="bk2")]
    tables, excluded = leaderboard(records)
    assert len(tables) == 2 and excluded == []
    assert sorted(t.group["budget_key"] for t in tables) == ["bk1", "bk2"]
    assert all(len(t.rows) == 1 for t in tables)


def test_never_mixes_metric_versions() -> None:
    v2 = {"version": "2", "higher_is_better": True}
    records = [rec("a", seed=0), rec("b", seed=1, f1_meta=v2)]
    tables, _ = leaderboard(records)
    assert len(tables) == 2
    assert sorted(t.group["metric_versions"]["canny_f1"] for t in tables) == ["1", "2"]
    assert all(t.rows[0].n_seeds == 1 for t in tables)
    md = render_markdown(tables, [], META)
    assert "canny_f1@1" in md and "canny_f1@2" in md


def test_unversioned_metric_is_excluded_with_reason() -> None:
    bad = RunRecord(run_id="nover", spec=rec("x").spec, status="FINISHED",
                    metrics={"canny_f1": 0.5}, metric_meta={})
    tables, excluded = leaderboard([rec("a"), bad])
    assert len(tables) == 1
    assert [(r.run_id, "version unknown" in why) for r, why in excluded] == [("nover", True)]


def test_failed_runs_are_excluded_with_reason() -> None:
    records = [rec("ok"), rec("bad", "t2i_adapter", status="FAILED", reason="CUDA OOM")]
    tables, excluded = leaderboard(records)
    assert [r.method for r in tables[0].rows] == ["controlnet"]
    assert [(r.run_id, why) for r, why in excluded] == [("bad", "FAILED: CUDA OOM")]
    md = render_markdown(tables, excluded, META)
    assert "## Excluded runs" in md and "CUDA OOM" in md


def test_hparam_variants_stay_separate_rows() -> None:
    records = [rec("a", "controlnext", hparams={"scale": 0.5}),
               rec("b", "controlnext", hparams={"scale": 1.0})]
    (table,), _ = leaderboard(records)
    assert len(table.rows) == 2 and all(r.n_seeds == 1 for r in table.rows)
    assert table.rows[0].method != table.rows[1].method


def test_markdown_escapes_pipes_and_newlines() -> None:
    records = [rec("a", "evil|method\nname"),
               rec("f", "x", status="FAILED", reason="bad | reason\nline two")]
    md = render_markdown(*leaderboard(records), META)
    assert "evil\\|method name" in md
    assert "bad \\| reason line two" in md
    for line in md.splitlines():
        if line.startswith("| evil"):
            # unescaped pipes = column separators: 2 fixed + 2 metrics + 4 compute + 1 edge
            assert line.replace("\\|", "").count("|") == 10


def test_markdown_arrows_and_header() -> None:
    tables, excluded = leaderboard([rec("a"), rec("b", seed=1, f1=0.6)])
    md = render_markdown(tables, excluded, META)
    assert "deadbeefcafe" in md
    assert "canny_f1 ↑" in md and "fd_proxy ↓" in md
    assert "canny_f1 ↓" not in md and "fd_proxy ↑" not in md
    assert "0.550 ± " in md  # mean of 0.5 and 0.6 at three significant digits
    assert "bk1" in md


def test_write_report_is_atomic(tmp_path: Path) -> None:
    out = write_report([rec("a")], tmp_path / "report", META)
    assert out == tmp_path / "report" / "leaderboard.md"
    assert "controlnet" in out.read_text(encoding="utf-8")
    assert [p.name for p in out.parent.iterdir()] == ["leaderboard.md"]  # no temp left behind
