"""W&B mirror: offline run dir named by the harness run id, no duplicates on re-run, failures only
noted; `bench report --from-wandb` conversion from recorded API responses."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.core.store import RunRecord, Store, upgrade_spec
from bench.report.tables import leaderboard
from bench.run.wandb_mirror import mirror, records_from_wandb
from tests.test_agent import offline_log

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "wandb_runs.json"


def _offline_dirs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_offline_mirror_uses_the_harness_run_id_and_never_duplicates(tmp_path, proxy_arch_dir, monkeypatch):
    from bench.run.runner import run_specs
    from bench.run.spec import apply_overrides, load_config, parse_overrides, resolve

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    cfg = apply_overrides(load_config(None), parse_overrides(
        ["budget=smoke", "seeds=0,1", "methods=baseline", "metrics=canny_f1,canny_f1_cnpp",  # cnpp: a scores table
         f"base_model={proxy_arch_dir}"]))
    specs, _ = resolve(cfg)
    with Store(tmp_path / "s.sqlite") as store:
        # two runs from one command: the second must not find W&B's per-process state gone with the first
        record, second = run_specs(specs, store, out, progress=False)
        assert record.finished and second.finished, (record.reason, second.reason)
        dirs = _offline_dirs(out)
        assert sorted(d.name.rsplit("-", 1)[1] for d in dirs) == sorted([record.run_id, second.run_id])
        assert {record.artifacts["wandb"], second.artifacts["wandb"]} == {str(d) for d in dirs}
        run_specs(specs, store, out, progress=False)  # identical runs: skipped, nothing mirrored
        assert _offline_dirs(out) == dirs
    mirror(record, out)  # even a forced re-mirror replaces the run dir instead of adding one
    assert sorted(d.name.rsplit("-", 1)[1] for d in _offline_dirs(out)) == sorted([record.run_id, second.run_id])
    (run_dir,) = [d for d in _offline_dirs(out) if d.name.endswith(record.run_id)]
    log = offline_log(next(run_dir.glob("*.wandb")))  # offline runs keep summary in the log
    assert record.run_id.encode() in log and b"metrics/canny_f1" in log and b"compute/peak_mem_mb" in log


def _record() -> RunRecord:
    return RunRecord(run_id="r1", spec={"method": "baseline", "seed": 0}, status="FINISHED", metrics={"m": 1.0})


def test_a_wandb_failure_is_noted_never_raised_and_never_leaks_the_key(tmp_path, monkeypatch, capsys):
    import wandb

    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", secret)

    def broken_init(**kwargs):
        raise RuntimeError(f"auth failed for key {secret}")

    monkeypatch.setattr(wandb, "init", broken_init)
    rec = mirror(_record(), tmp_path)
    assert rec.finished and rec.artifacts["wandb"].startswith("mirror failed: RuntimeError")
    assert secret not in rec.artifacts["wandb"] and secret not in capsys.readouterr().err


def test_disabled_mode_mirrors_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rec = _record()
    assert mirror(rec, tmp_path) is rec
    assert not (tmp_path / "wandb").exists()


def _api_runs() -> tuple[list, list[dict]]:
    """`wandb.apis.public.Run` objects built from a recorded GraphQL `runs` response."""
    from wandb.apis.public import Run

    data = json.loads(FIXTURE.read_text())
    edges = data["response"]["data"]["project"]["runs"]["edges"]
    runs = [Run(None, "ent", "proj", e["node"]["name"], attrs=dict(e["node"])) for e in edges]
    return runs, data["expected_records"]


def upgraded(rec: RunRecord) -> RunRecord:
    spec, run_id = upgrade_spec(rec.spec, rec.run_id)
    return dataclasses.replace(rec, spec=spec, run_id=run_id)


def test_records_from_wandb_match_the_store_records():
    runs, expected = _api_runs()
    records = records_from_wandb(runs)
    assert len(runs) > len(records)  # a foreign run and a still-running run are skipped
    # the fixture was mirrored while seeds were a budget field: read back in today's form
    wandb_ids = [e["run_id"] for e in expected]
    expected = [upgraded(RunRecord.from_dict(e)) for e in expected]
    assert all("seeds" not in e.spec["budget_fields"] for e in expected)
    assert [r.run_id for r in records] == [e.run_id for e in expected]
    for rec, exp, wandb_id in zip(records, expected, wandb_ids):
        got = rec.to_dict()
        assert got.pop("artifacts") == {"wandb": f"ent/proj/{wandb_id}"}  # the W&B run keeps its id
        exp = {k: v for k, v in exp.to_dict().items() if k != "artifacts"}  # fields added since: defaults
        assert json.dumps(got, sort_keys=True) == json.dumps(exp, sort_keys=True)  # NaN-safe equality
    tables, _ = leaderboard(records)
    assert tables and {row.method for row in tables[0].rows} == {"baseline", "controlnet"}


def test_report_from_wandb_writes_the_leaderboard(tmp_path, monkeypatch):
    import wandb

    runs, _ = _api_runs()

    class FakeApi:  # the network boundary only; the conversion code is the real one
        def __init__(self, timeout=None):
            pass

        def runs(self, path):
            assert path == "ent/proj"
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert main(["report", "--from-wandb", "ent/proj", "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "controlnet" in text and "canny_f1" in text


def test_report_from_wandb_bad_path_exits_2(tmp_path, capsys):
    assert main(["report", "--from-wandb", "no-slash", "--out", str(tmp_path)]) == 2
    assert "ENTITY/PROJECT" in capsys.readouterr().err
