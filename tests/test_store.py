"""Store: round trip, WAL, FINISHED-wins, merge idempotence, corrupt files, concurrent writers."""
from __future__ import annotations

import json
import math
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bench.core.store import SCHEMA_VERSION, RunRecord, Store, StoreError


def make_record(run_id: str, status: str = "FINISHED", created_at: float = 1.0, **kw) -> RunRecord:
    spec = {
        "method": "controlnet", "method_version": "1", "dataset": "shapes",
        "dataset_version": "1", "condition": "canny", "budget": "proxy-xs",
        "budget_key": "bk1", "seed": 0, "base_model": "proxy", "hparams": {"lr": 1e-4},
    }
    spec.update(kw.pop("spec", {}))
    return RunRecord(
        run_id=run_id, spec=spec, status=status, created_at=created_at,
        metrics=kw.pop("metrics", {"canny_f1": 0.5}),
        metric_meta=kw.pop("metric_meta", {"canny_f1": {"version": "1", "higher_is_better": True}}),
        **kw,
    )


def test_record_json_round_trip() -> None:
    rec = make_record("r1", compute={"params_total": 1e6}, artifacts={"images": "/x"},
                      git_sha="abc", versions={"torch": "2.3"}, reason="")
    again = RunRecord.from_json(rec.to_json())
    assert again == rec
    assert (again.method, again.budget_key, again.seed, again.dataset, again.condition) == (
        "controlnet", "bk1", 0, "shapes", "canny")


def test_record_rejects_bad_status() -> None:
    with pytest.raises(ValueError, match="status"):
        make_record("r1", status="DONE")


def test_store_round_trip_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "runs.db"
    rec = make_record("r1", compute={"step_time_s": 0.1})
    with Store(path) as store:
        assert store.journal_mode == "wal"
        assert store.put(rec)
        assert store.get("r1") == rec
        assert store.get("missing") is None
        assert store.is_finished("r1") and not store.is_finished("missing")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert conn.execute("SELECT method, budget_key FROM runs").fetchall() == [("controlnet", "bk1")]
    conn.close()
    with Store(path) as store:  # reopen
        assert store.get("r1") == rec


def test_finished_not_overwritten_by_failure(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        assert store.put(make_record("r1", "FINISHED"))
        assert not store.put(make_record("r1", "FAILED", reason="OOM", created_at=2.0))
        assert not store.put(make_record("r1", "KILLED", created_at=3.0))
        assert store.get("r1").status == "FINISHED"


def test_failed_then_finished_overwrites(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        assert store.put(make_record("r1", "FAILED", reason="OOM"))
        assert not store.is_finished("r1")
        assert store.put(make_record("r1", "FINISHED", created_at=2.0))
        assert store.is_finished("r1")
        assert [r.status for r in store.records()] == ["FINISHED"]


def test_records_filter_and_order(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.put(make_record("b", created_at=2.0))
        store.put(make_record("a", "FAILED", created_at=3.0))
        store.put(make_record("c", created_at=1.0))
        assert [r.run_id for r in store.records()] == ["c", "b", "a"]
        assert [r.run_id for r in store.records("FINISHED")] == ["c", "b"]
        assert [r.run_id for r in store.records("FAILED")] == ["a"]


def test_merge_is_idempotent_and_finished_wins(tmp_path: Path) -> None:
    with Store(tmp_path / "other.db") as other:
        for i in range(5):
            other.put(make_record(f"r{i}", created_at=float(i)))
        other.put(make_record("x", "FAILED", reason="boom"))
    with Store(tmp_path / "main.db") as main:
        main.put(make_record("x", "FINISHED"))
        assert main.merge_from(tmp_path / "other.db") == 5
        assert len(main) == 6
        assert main.merge_from(tmp_path / "other.db") == 0
        assert len(main) == 6
        assert main.is_finished("x")


def test_merge_missing_source_is_store_error(tmp_path: Path) -> None:
    with Store(tmp_path / "main.db") as main, pytest.raises(StoreError, match="no store"):
        main.merge_from(tmp_path / "nope.db")


def test_corrupt_file_gives_one_line_store_error(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    path.write_bytes(b"this is definitely not an sqlite database\n" * 100)
    with pytest.raises(StoreError) as info:
        Store(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and "--store" in msg
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_foreign_sqlite_db_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE something (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a controlbench store"):
        Store(path)


_WRITER = """
import sys
from bench.core.store import RunRecord, Store
path, prefix = sys.argv[1], sys.argv[2]
with Store(path) as store:
    for i in range(50):
        store.put(RunRecord(run_id=f"{prefix}-{i}", spec={"method": "m", "budget_key": "k", "seed": i},
                            status="FINISHED", created_at=float(i)))
"""


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, p]) for p in ("a", "b")]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    with Store(path) as store:
        assert len(store.records()) == 100


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"bare {token} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_records_are_strict_json_and_non_finite_numbers_read_back_as_nan(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    rec = make_record("r1", metrics={"canny_f1": nan, "fd": inf, "ok": 0.5}, compute={"step_time_s": nan},
                      curve=[{"step": 2, "metric": "canny_f1", "value": -inf}])
    text = rec.to_json()
    assert _strict(text)["metrics"] == {"canny_f1": None, "fd": None, "ok": 0.5}
    json.dumps(json.loads(text), allow_nan=False)
    back = RunRecord.from_json(text)
    assert math.isnan(back.metrics["canny_f1"]) and math.isnan(back.metrics["fd"]) and back.metrics["ok"] == 0.5
    assert math.isnan(back.compute["step_time_s"]) and math.isnan(back.curve[0]["value"])
    with Store(tmp_path / "s.db") as store:
        store.put(rec)
        assert math.isnan(store.get("r1").metrics["canny_f1"])
        stored = store._db.execute("SELECT record FROM runs").fetchone()[0]
        _strict(stored)
        old = make_record("old", created_at=2.0).to_json().replace('"canny_f1": 0.5', '"canny_f1": NaN')
        store._db.execute("INSERT INTO runs VALUES ('old', 'FINISHED', 'controlnet', 'bk1', ?, 0)", (old,))
        assert math.isnan(store.get("old").metrics["canny_f1"])  # stores written before strict JSON still read
        assert [r.run_id for r in store.records()] == ["r1", "old"]


def test_every_sqlite_error_is_a_one_line_store_error(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.put(make_record("r1"))
        store._conn.close()  # the connection fails under the store: each call says so in one line
        for call in (lambda: store.get("r1"), store.records, lambda: store.put(make_record("r2")),
                     lambda: store.claim("r1"), lambda: store.release("r1"), lambda: len(store)):
            with pytest.raises(StoreError) as info:
                call()
            assert str(tmp_path / "s.db") in str(info.value) and "\n" not in str(info.value)
            assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_claim_whose_run_process_outlived_its_claimant_is_not_taken_over(tmp_path: Path) -> None:
    """An orphan run process (claimant dead, run process alive) keeps its claim: taking it over
    would run the same config twice at once."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "bench.run.process", "run-x", "out"])
    try:
        with Store(tmp_path / "s.db") as store:
            store._db.execute("INSERT INTO claims VALUES ('run-x', ?, ?, 0)", (socket.gethostname(), dead.pid))
            store._db.execute("INSERT INTO claims VALUES ('run-y', ?, ?, 0)", (socket.gethostname(), dead.pid))
            assert not store.claim("run-x")  # its run process still runs
            assert store.claim("run-y")  # no process runs run-y: stale, taken over
            orphan.kill()
            orphan.wait()
            assert store.claim("run-x")
    finally:
        orphan.kill()
        orphan.wait()


# ---- per-sample scores (schema 3) --------------------------------------------------------------

def test_per_sample_scores_round_trip_in_their_own_table(tmp_path: Path) -> None:
    scores = {"canny_f1": {"s0": 0.25, "s1": 0.75, "s2": math.nan}, "id_sim_mean": {"s0": 0.5}}
    rec = make_record("r1", sample_scores=scores)
    with Store(tmp_path / "s.sqlite") as store:
        assert store.put(rec)
        assert not store.put(rec)  # identical: nothing written
        text = store._db.execute("SELECT record FROM runs").fetchone()[0]
        assert "sample_scores" not in text  # kept out of the record's text
        rows = store.sample_scores("r1")
        assert [(r[1], r[2]) for r in rows] == [("s0", "canny_f1"), ("s1", "canny_f1"), ("s2", "canny_f1"),
                                                ("s0", "id_sim_mean")]
        got = store.records()[0]
        assert got.sample_scores["canny_f1"]["s1"] == 0.75 and math.isnan(got.sample_scores["canny_f1"]["s2"])
        assert store.get("r1", with_scores=True).sample_scores["id_sim_mean"] == {"s0": 0.5}
        assert store.get("r1").sample_scores == {} and store.records(with_scores=False)[0].sample_scores == {}
        # a newer record of the run replaces its per-sample rows in the same transaction
        store.put(make_record("r1", created_at=2.0, metrics={"canny_f1": 0.6}, sample_scores={"canny_f1": {"s9": 1.0}}))
        assert store.records()[0].sample_scores == {"canny_f1": {"s9": 1.0}}
    # the result file form (to_json) carries them, NaN as null
    back = RunRecord.from_json(rec.to_json())
    assert back.sample_scores["canny_f1"]["s0"] == 0.25 and math.isnan(back.sample_scores["canny_f1"]["s2"])


def test_merge_copies_per_sample_scores(tmp_path: Path) -> None:
    with Store(tmp_path / "a.sqlite") as a:
        a.put(make_record("r1", sample_scores={"canny_f1": {"s0": 0.1}}))
    with Store(tmp_path / "out.sqlite") as out:
        assert out.merge_from(tmp_path / "a.sqlite") == 1
        assert out.sample_scores() == [("r1", "s0", "canny_f1", 0.1)]


def _schema2_store(path: Path, records: list[RunRecord]) -> None:
    """A store as schema-2 controlbench wrote it: no sample_scores table, user_version 2."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT, method TEXT, budget_key TEXT, "
                   "record TEXT NOT NULL, updated_at REAL)")
        db.execute("CREATE TABLE claims (run_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, "
                   "claimed_at REAL NOT NULL)")
        for r in records:
            db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                       (r.run_id, r.status, r.method, r.budget_key, r.stored_json(), 1.0))
        db.execute("PRAGMA user_version=2")


def test_schema2_store_still_opens_read_only_and_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _schema2_store(path, [make_record("r1"), make_record("r2", spec={"seed": 1})])
    with Store(path, read_only=True) as store:  # read-only: nothing written, no per-sample rows
        assert [r.run_id for r in store.records()] == ["r1", "r2"]
        assert store.sample_scores() == [] and store.records()[0].sample_scores == {}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    with Store(path) as store:  # for writing: upgraded in place, old rows untouched
        assert len(store) == 2 and store.sample_scores() == []
        store.put(make_record("r3", sample_scores={"canny_f1": {"a": 1.0}}))
        assert store.sample_scores("r3") == [("r3", "a", "canny_f1", 1.0)]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_runner_records_metric_sample_scores_into_the_store(proxy_arch_dir, tmp_path, monkeypatch) -> None:
    """build -> load_data -> train -> evaluate -> record: a metric's per-sample scores
    (BenchMetric.record_samples) reach the record and the store's table."""
    import torch

    from bench.core.registry import METRICS
    from bench.run.builtins import load_builtins
    from bench.run.execute import execute
    from bench.run.spec import apply_overrides, load_config, resolve

    load_builtins()
    cls = METRICS.get("canny_f1")
    original = cls.update

    def update(self, images, batch):  # a per-image value; the flow is what is under test here
        original(self, images, batch)
        self.record_samples(batch.ids, images.mean(dim=(1, 2, 3)))

    monkeypatch.setattr(cls, "update", update)
    (spec,), out = resolve(apply_overrides(load_config(None), [
        ("budget", "smoke"), ("base_model", str(proxy_arch_dir)), ("out_dir", str(tmp_path / "out")),
        ("seeds", [0]), ("methods", ["baseline"]), ("metrics", ["canny_f1", "fd_segnet"])]))
    record = execute(spec, out, progress=False)
    scores = record.sample_scores
    assert set(scores) == {"canny_f1"}  # fd_segnet is pooled: no per-sample values
    assert len(scores["canny_f1"]) == spec.budget.eval_samples and all(0 <= v <= 1 for v in scores["canny_f1"].values())
    with Store(tmp_path / "s.sqlite") as store:
        store.put(record)
        assert store.records()[0].sample_scores == scores
    assert torch.isfinite(torch.tensor(list(scores["canny_f1"].values()))).all()
