"""Seeds outside the budget key, schema-1 store upgrade, and one comparability rule that the
report, `bench check` and claims share (a tuning sweep's settings are never averaged)."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from bench.analysis.check import summarize
from bench.analysis.claims import Claim, evaluate
from bench.analysis.compare import group_runs
from bench.cli import main
from bench.core.store import SCHEMA_VERSION, RunRecord, Store, spec_hash
from bench.report.markdown import render_markdown
from bench.report.tables import leaderboard
from bench.run.spec import apply_overrides, load_config, resolve

F1 = {"version": "1", "higher_is_better": True, "consistency": True}  # as the runner records canny_f1 on canny runs


def _specs(**overrides):
    cfg = apply_overrides(load_config(None), [("budget", "smoke"), ("methods", "baseline,controlnet"),
                                              *overrides.items()])
    return resolve(cfg)[0]


def test_adding_a_seed_adds_exactly_one_run_per_method():
    two = {s.run_id: s for s in _specs(seeds="0,1")}
    three = {s.run_id: s for s in _specs(seeds="0,1,2")}
    assert set(two) < set(three), "adding a seed changed the ids of the seeds already run"
    new = [three[i] for i in set(three) - set(two)]
    assert sorted((s.method, s.seed) for s in new) == [("baseline", 2), ("controlnet", 2)]
    assert len({s.budget.key() for s in three.values()}) == 1


def test_seeds_are_validated():
    from bench.core.errors import ConfigError

    with pytest.raises(ConfigError, match="repeat a seed"):
        _specs(seeds="0,0")
    with pytest.raises(ConfigError, match="non-negative integers"):
        _specs(seeds="a")


def _schema1(spec: dict, seeds: list[int]) -> tuple[dict, str]:
    """The spec and run id a schema-1 controlbench wrote: seeds inside the budget fields and key."""
    fields = dict(spec["budget_fields"], seeds=seeds)
    keyed = {k: v for k, v in fields.items() if k != "name"}
    old = dict(spec, budget_fields=fields,
               budget_key=hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12])
    return old, spec_hash(old)


def _write_schema1_store(path: Path, records: list[RunRecord]) -> None:
    with Store(path) as store:
        for r in records:
            store.put(r)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=1")


def test_schema1_store_upgrades_to_todays_run_ids(tmp_path):
    spec = _specs(seeds="0")[0]
    today = spec.to_dict()
    old_quick, old_id = _schema1(dict(today, budget="quick"), [0, 1])
    old_identity, old_id2 = _schema1(dict(today, budget="identity"), [0, 1, 2])
    assert len({old_id, old_id2, spec.run_id}) == 3
    path = tmp_path / "old.sqlite"
    _write_schema1_store(path, [
        RunRecord(run_id=old_id, spec=old_quick, status="FINISHED", metrics={"canny_f1": 0.1}, created_at=1.0),
        RunRecord(run_id=old_id2, spec=old_identity, status="FINISHED", metrics={"canny_f1": 0.2}, created_at=2.0)])

    with Store(path, read_only=True) as ro:  # read both forms: nothing rewritten
        assert {r.run_id for r in ro.records()} == {spec.run_id}
        assert all("seeds" not in r.spec["budget_fields"] for r in ro.records())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1

    with Store(path) as store:  # migrate on open: the newer of the two collided records wins
        assert len(store) == 1 and store.is_finished(spec.run_id)
        got = store.get(spec.run_id)
        assert got.metrics == {"canny_f1": 0.2} and got.budget_key == spec.budget.key()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_adding_a_seed_to_a_finished_schema1_run_executes_one_run_per_method(tmp_path, monkeypatch):
    """A two-seed run finished by a schema-1 controlbench, then seeds=0,1,2: only seed 2 runs."""
    import bench.run.runner as runner
    from bench.run.execute import failed

    path = tmp_path / "store.sqlite"
    old = [_schema1(s.to_dict(), [0, 1]) for s in _specs(seeds="0,1")]
    _write_schema1_store(path, [RunRecord(run_id=i, spec=spec, status="FINISHED", metrics={"canny_f1": 0.5})
                                for spec, i in old])
    executed = []

    # the decision under test: which specs reach here
    def spy(spec, out_dir, progress=True, threads=None, started=None, launcher=None, gpu=None):
        executed.append((spec.method, spec.seed))
        return failed(spec, "not executed in this test")

    monkeypatch.setattr(runner, "run_isolated", spy)
    with Store(path) as store:
        records = runner.run_specs(_specs(seeds="0,1,2"), store, tmp_path, progress=False)
    assert sorted(executed) == [("baseline", 2), ("controlnet", 2)]
    assert sum(r.finished for r in records) == 4


def rec(run_id: str, method: str, seed: int, f1: float, hparams: dict | None = None, **spec) -> RunRecord:
    full = {"method": method, "method_version": "1", "dataset": "shapes", "dataset_version": "1",
            "condition": "canny", "budget": "quick", "budget_key": "bk", "seed": seed, "base_model": "proxy",
            "hparams": hparams or {}, **spec}
    return RunRecord(run_id=run_id, spec=full, status="FINISHED", metrics={"canny_f1": f1},
                     metric_meta={"canny_f1": F1}, compute={"step_time_s": 0.1})


TUNING = ([rec(f"b{s}", "baseline", s, 0.20 + s / 100) for s in (0, 1)]
          + [rec(f"lo{s}", "controlnet", s, 0.30 + s / 100, {"conditioning_scale": 0.5}) for s in (0, 1)]
          + [rec(f"hi{s}", "controlnet", s, 0.60 + s / 100, {"conditioning_scale": 1.5}) for s in (0, 1)]
          + [rec("other-data", "controlnet", 0, 0.9, dataset_version="2")])


def test_report_check_and_claims_agree_on_a_tuning_sweep(tmp_path, capsys):
    groups, _ = group_runs(TUNING)
    assert len(groups) == 2  # dataset version 2 is its own group

    tables, _ = leaderboard(TUNING)
    main_table = next(t for t in tables if t.group["dataset_version"] == "1")
    rows = {r.method: r for r in main_table.rows}
    assert len(rows) == 3 and rows['controlnet {"conditioning_scale": 1.5}'].metrics["canny_f1"][0] == pytest.approx(0.605)
    assert rows['controlnet {"conditioning_scale": 0.5}'].metrics["canny_f1"][0] == pytest.approx(0.305)

    stats = summarize(TUNING)
    cn = sorted(s.mean for e, s in stats.items() if e.arm.method == "controlnet" and e.group.dataset_version == "1")
    assert cn == pytest.approx([0.305, 0.605]), "check averaged two hparam settings"

    measure = {"key": "canny_f1", "transform": "gain", "reference": {"method": "baseline"}}
    expect = {"op": "at_least", "value": 0.0}
    both = evaluate(Claim("x", "s", "st", "d", {**measure, "subject": {"method": "controlnet"}}, expect), TUNING)
    assert both.verdict == "not measured" and "2 settings match" in both.detail
    one = evaluate(Claim("x", "s", "st", "d", {**measure, "subject": {
        "method": "controlnet", "hparams.conditioning_scale": 0.5}}, expect), TUNING)
    assert one.measured == pytest.approx(0.305 / 0.205 - 1) and "dataset=shapes@1" in one.detail

    # check: a baseline from the sweep, then only the 1.5 setting regresses
    store = tmp_path / "s.sqlite"
    with Store(store) as s:
        for r in TUNING:
            s.put(r)
    baseline = tmp_path / "baseline.json"
    assert main(["check", "--baseline", str(baseline), "--store", str(store), "--update-baseline"]) == 0
    worse = [r for r in TUNING if not r.run_id.startswith("hi")] + [
        rec(f"hi{s}", "controlnet", s, 0.10, {"conditioning_scale": 1.5}) for s in (0, 1)]
    store2 = tmp_path / "s2.sqlite"
    with Store(store2) as s:
        for r in worse:
            s.put(r)
    capsys.readouterr()
    assert main(["check", "--baseline", str(baseline), "--store", str(store2)]) == 1
    failing = [line for line in capsys.readouterr().out.splitlines() if "regressed" in line]
    assert len(failing) == 1 and '"conditioning_scale": 1.5' in failing[0]


def test_a_table_whose_rows_differ_in_seeds_says_so():
    recs = [rec("b0", "baseline", 0, 0.2), rec("c0", "controlnet", 0, 0.5), rec("c1", "controlnet", 1, 0.6)]
    tables, _ = leaderboard(recs)
    text = render_markdown(tables, [], {})
    assert "rows differ in seeds" in text and "baseline [0]" in text and "controlnet [0, 1]" in text
    same, _ = leaderboard(recs[:2])
    assert "rows differ in seeds" not in render_markdown(same, [], {})


def _finished(spec, seed: int, value: float, **spec_changes) -> RunRecord:
    """A FINISHED canny_f1 record of `spec` at `seed`, its spec fields changed as given."""
    d = {**spec.to_dict(), "seed": seed, **spec_changes}
    return RunRecord(run_id=f"{d['method']}-{d.get('base_model')}-{d.get('method_version')}-{seed}", spec=d,
                     status="FINISHED", metrics={"canny_f1": value}, metric_meta={"canny_f1": F1})


def test_runs_on_two_base_models_never_share_a_table():
    """Same method, budget and seeds on two base models: two tables, never one averaged row."""
    from bench.analysis.compare import group_runs

    spec = next(s for s in _specs() if s.method == "controlnet")
    records = [_finished(spec, 0, 0.2, base_model="proxy"), _finished(spec, 1, 0.3, base_model="proxy"),
               _finished(spec, 0, 0.8, base_model="/models/sd15"), _finished(spec, 1, 0.9, base_model="/models/sd15")]
    groups, excluded = group_runs(records)
    assert not excluded and sorted(g.key.base_model for g in groups) == ["/models/sd15", "proxy"]
    tables, _ = leaderboard(records)
    assert sorted(t.rows[0].metrics["canny_f1"][0] for t in tables) == pytest.approx([0.25, 0.85])


def test_two_versions_of_a_method_are_two_rows():
    """A method's code changed version between runs: its rows stay apart, never averaged."""
    from bench.analysis.compare import group_runs

    spec = next(s for s in _specs() if s.method == "controlnet")
    records = [_finished(spec, 0, 0.2, method_version="controlnet-v1"), _finished(spec, 1, 0.3, method_version="controlnet-v1"),
               _finished(spec, 0, 0.8, method_version="controlnet-v2"), _finished(spec, 1, 0.9, method_version="controlnet-v2")]
    (group,), _ = group_runs(records)
    assert sorted(a.method_version for a in group.arms) == ["controlnet-v1", "controlnet-v2"]
    (table,), _ = leaderboard(records)
    assert sorted(r.metrics["canny_f1"][0] for r in table.rows) == pytest.approx([0.25, 0.85])
