"""Report: CI maths, grouping rules (never mix budgets or metric versions), Markdown safety."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.analysis.stats import ci95
from bench.core.store import RunRecord
from bench.report.markdown import render_markdown
from bench.report.tables import COMPUTE_COLUMNS, leaderboard
from bench.report.write import write_report

META = {"git_sha": "deadbeefcafe", "generated_by": "bench report"}
F1 = {"version": "1", "higher_is_better": True, "consistency": True}  # as the runner records canny_f1 on canny runs
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
            # unescaped pipes = column separators: 2 fixed + 2 metrics + the compute columns + 1 edge
            assert line.replace("\\|", "").count("|") == 2 + 2 + len(COMPUTE_COLUMNS) + 1


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


# ---- recipes beside each table ----------------------------------------------------------------
CN_RECIPE = {"conditioning_scale": 1.0, "empty_prompt_prob": 0.5, "timesteps": "uniform"}


def test_recipe_line_per_row_marks_user_set_fields() -> None:
    records = [rec("a", "controlnet", hparams={"conditioning_scale": 0.7},
                   recipe={**CN_RECIPE, "conditioning_scale": 0.7}),
               rec("b", "t2i_adapter", f1=0.4, recipe={"conditioning_scale": 1.0, "empty_prompt_prob": 0.5,
                                                      "timesteps": "cubic", "unet_trainable": ""})]
    (table,), _ = leaderboard(records)
    cn = next(r for r in table.rows if r.method == "controlnet")
    assert cn.recipe == tuple(sorted({**CN_RECIPE, "conditioning_scale": 0.7}.items()))
    assert cn.overridden == {"conditioning_scale"}
    md = render_markdown([table], [], META)
    after = md.split("| t2i_adapter |", 1)[1]  # the lines come under the table
    assert ("- controlnet: **conditioning\\_scale 0.7**, empty\\_prompt\\_prob 0.5, timesteps uniform"
            in after.splitlines())
    assert ("- t2i\\_adapter: conditioning\\_scale 1.0, empty\\_prompt\\_prob 0.5, timesteps cubic, "
            'unet\\_trainable ""' in after.splitlines())
    assert after.index("- controlnet:") < after.index("- t2i\\_adapter:")  # leaderboard order
    assert "## Excluded runs" in after.split("- t2i\\_adapter:", 1)[1]


def test_records_without_recipe_say_so() -> None:
    md = render_markdown(*leaderboard([rec("old", "controlnet")]), META)
    assert "- controlnet: _recipe not recorded_" in md.splitlines()


def test_recipe_values_are_escaped_and_seed_disagreement_noted() -> None:
    records = [rec("a", "controlnext", seed=0, created_at=1.0, hparams={"unet_trainable": "a|b*_x\nz"},
                   recipe={"unet_trainable": "a|b*_x\nz", "scale": 1.0}),
               rec("b", "controlnext", seed=1, created_at=2.0, hparams={"unet_trainable": "a|b*_x\nz"},
                   recipe={"unet_trainable": "a|b*_x\nz", "scale": 2.0})]
    (table,), _ = leaderboard(records)
    (row,) = table.rows
    assert dict(row.recipe)["scale"] == 2.0 and "disagree" in row.recipe_note  # the newest, flagged
    md = render_markdown([table], [], META)
    line = next(ln for ln in md.splitlines() if ln.startswith("- controlnext:"))
    assert "**unet\\_trainable a\\|b\\*\\_x z**" in line and "disagree" in line


def test_recipes_built_on_other_code_say_so() -> None:
    """InstantID and PhotoMaker publish no training code: their rows name the code their recipe comes from."""
    records = [rec("a", "instantid", recipe={"lr_ratio": 10.0}), rec("b", "controlnet", f1=0.4, recipe=CN_RECIPE)]
    md = render_markdown(*leaderboard(records), META)
    line = next(ln for ln in md.splitlines() if ln.startswith("- instantid:"))
    assert "_(recipe built on training code unpublished: IP-Adapter's tutorial\\_train.py" in line
    assert "built on" not in next(ln for ln in md.splitlines() if ln.startswith("- controlnet:"))


# ---- tuning view ------------------------------------------------------------------------------
def _trials(method: str, scores: list[float], meta: dict, budget_key: str = "bk1") -> list[RunRecord]:
    return [rec(f"{method}-{i}", method, f1=s, f1_meta=meta, budget_key=budget_key,
                hparams={"conditioning_scale": 0.5 + 0.1 * i}) for i, s in enumerate(scores)]


@pytest.mark.parametrize("meta, best_index", [(F1, 2), (FD, 3)])
def test_tuning_best_trial_respects_direction(meta: dict, best_index: int) -> None:
    scores = [0.50, 0.62, 0.91, 0.05, 0.40]
    records = _trials("controlnet", scores, meta) + [rec("t2i", "t2i_adapter", f1=0.3, f1_meta=meta)]
    (table,), _ = leaderboard(records)
    by_metric = {t.metric: t for t in table.tuning}
    assert {t.method for t in table.tuning} == {"controlnet"}  # one arm of t2i_adapter: not tuned
    f1 = by_metric["canny_f1"]
    assert f1.higher_is_better is meta["higher_is_better"] and f1.trials == 5
    assert f1.best == pytest.approx(scores[best_index])
    assert f1.best_hparams == {"conditioning_scale": pytest.approx(0.5 + 0.1 * best_index)}
    assert (f1.low, f1.median, f1.high) == pytest.approx((0.05, 0.50, 0.91))
    fd = by_metric["fd_proxy"]  # fd = 10 (1 - f1), lower is better: the f1-best trial
    assert fd.best == pytest.approx(10 * (1 - 0.91)) and fd.best_hparams["conditioning_scale"] == pytest.approx(0.7)
    md = render_markdown([table], [], META)
    section = md.split("## Tuning", 1)[1].split("## Excluded runs", 1)[0]
    arrow = "↑" if meta["higher_is_better"] else "↓"
    best_hp = f'{{"conditioning_scale": {0.5 + 0.1 * best_index}}}'
    assert f"| controlnet | canny_f1 {arrow} | 5 | {best_hp} | {_fmt_expected(scores[best_index])} |" in section


def _fmt_expected(x: float) -> str:
    from bench.report.numbers import format_number

    return format_number(x)


def test_tuning_trials_average_seeds_and_note_unequal_budgets() -> None:
    records = [rec(f"cn{i}-{s}", "controlnet", seed=s, f1=f, hparams={"conditioning_scale": c})
               for i, (c, fs) in enumerate(((0.5, (0.2, 0.9)), (1.0, (0.6, 0.6)))) for s, f in enumerate(fs)]
    records += _trials("t2i_adapter", [0.3, 0.4, 0.5], F1)
    (table,), _ = leaderboard(records)
    cn = next(t for t in table.tuning if t.method == "controlnet" and t.metric == "canny_f1")
    # by the seed mean (0.55 vs 0.6), not by the single best seed (0.9)
    assert cn.trials == 2 and cn.best == pytest.approx(0.6) and cn.best_hparams == {"conditioning_scale": 1.0}
    assert (cn.low, cn.high) == pytest.approx((0.55, 0.6))
    assert table.tuning_note == "tuning budgets differ (trials per method): controlnet 2, t2i_adapter 3"
    assert table.tuning_note in render_markdown([table], [], META)


def test_no_tuning_section_without_trials() -> None:
    tables, _ = leaderboard([rec("a"), rec("b", "t2i_adapter")])
    assert tables[0].tuning == [] and "## Tuning" not in render_markdown(tables, [], META)


def test_tuning_never_spans_budgets() -> None:
    """Two settings of one method under different budgets are two tables, not two trials."""
    records = [rec("a", hparams={"conditioning_scale": 0.5}, budget_key="bk1"),
               rec("b", hparams={"conditioning_scale": 1.5}, budget_key="bk2")]
    tables, _ = leaderboard(records)
    assert len(tables) == 2 and all(t.tuning == [] for t in tables)


# ---- per-sample scores: intervals, CSV export, W&B table (issue 16) --------------------------------

def _with_scores(r: RunRecord, n: int = 30) -> RunRecord:
    import dataclasses

    import numpy as np

    x = np.random.default_rng(sum(map(ord, r.run_id))).normal(r.metrics["canny_f1"], 0.1, n)
    return dataclasses.replace(r, sample_scores={"canny_f1": {f"s{i:02d}": float(v) for i, v in enumerate(x)}})


def test_each_table_states_its_interval_method() -> None:
    runs = [_with_scores(rec(f"a{s}", seed=s, f1=0.5)) for s in (0, 1)] + [rec("b0", "t2i_adapter", seed=0),
                                                                           rec("b1", "t2i_adapter", seed=1)]
    md = render_markdown(*leaderboard(runs), META)
    line = next(ln for ln in md.splitlines() if ln.startswith("Intervals:"))
    assert "canny_f1" in line and "hierarchical bootstrap" in line  # controlnet has per-sample scores
    assert "Student t over seed means" in line  # fd_proxy and t2i_adapter do not
    only_seeds = render_markdown(*leaderboard([rec("c0", seed=0), rec("c1", seed=1)]), META)
    assert "Intervals: 95% interval: Student t over seed means (no per-sample scores)." in only_seeds


def test_bootstrap_half_width_replaces_the_seed_t_for_per_sample_rows() -> None:
    tables, _ = leaderboard([_with_scores(rec(f"a{s}", seed=s, f1=0.5 + s / 10)) for s in (0, 1)])
    row = tables[0].rows[0]
    mean, half = row.metrics["canny_f1"]
    assert row.interval_methods["canny_f1"] == "hierarchical bootstrap"
    assert mean == pytest.approx(0.55) and 0 < half < ci95([0.5, 0.6])[1]


def test_report_exports_per_sample_scores_as_csv(tmp_path: Path, capsys) -> None:
    import csv

    from bench.cli import main
    from bench.core.store import Store

    with Store(tmp_path / "s.sqlite") as store:
        store.put(_with_scores(rec("a0", seed=0), n=3))
        store.put(rec("b0", "t2i_adapter"))  # no per-sample scores: no rows
    out = tmp_path / "scores.csv"
    assert main(["report", "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "rep"),
                 "--scores-csv", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["run_id", "method", "seed", "sample_id", "metric", "value"]
    assert [r[:5] for r in rows[1:]] == [["a0", "controlnet", "0", f"s0{i}", "canny_f1"] for i in range(3)]
    assert "3 rows" in capsys.readouterr().out


def test_wandb_mirror_logs_per_sample_scores_as_a_table(tmp_path: Path, monkeypatch) -> None:
    """Real wandb, offline: the run's history holds the scores table, and its table file the rows."""
    import json

    from bench.run import wandb_mirror
    from tests.test_agent import run_contents

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    record = _with_scores(rec("a0"), n=2)
    wandb_mirror._log(record, tmp_path, "offline")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = run_contents(next(run_dir.glob("*.wandb")))["history"]
    key = wandb_mirror.SCORES_TABLE  # wandb flattens the table's reference into "<key>/<field>" items
    refs = [h for h in history if f"{key}/_type" in h]
    assert len(refs) == 1 and refs[0][f"{key}/_type"] == "table-file"
    table = json.loads((run_dir / "files" / refs[0][f"{key}/path"]).read_text())
    assert table["columns"] == ["sample_id", "metric", "value"]
    assert [row[:2] for row in table["data"]] == [["s00", "canny_f1"], ["s01", "canny_f1"]]


def test_each_method_is_compared_with_baseline_on_paired_samples() -> None:
    runs = [_with_scores(rec(f"c{s}", seed=s, f1=0.6)) for s in (0, 1)]
    runs += [_with_scores(rec(f"b{s}", "baseline", seed=s, f1=0.2)) for s in (0, 1)]
    md = render_markdown(*leaderboard(runs), META)
    line = next(ln for ln in md.splitlines() if ln.startswith("Paired vs baseline"))
    assert "canny_f1" in line and "controlnet +0.4" in line
    assert "Paired vs baseline" not in render_markdown(*leaderboard([rec("x0"), rec("x1", seed=1)]), META)
