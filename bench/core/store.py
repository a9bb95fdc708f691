"""RunRecord (one frozen record per run) and Store (SQLite, WAL, one transaction per record).

The store is the single source of truth for finished work: a run whose id is already
FINISHED here is skipped on re-run, so sweeps are resumable and idempotent.
How the file is opened without changing it (checks, read-only access, creation) is
bench/core/storefile.py. Over 500 lines: the record's JSON rules and the store's upsert rules
read each other, and splitting them would leave each half needing the other.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bench.core.budget import Budget
from bench.core.storefile import (BUSY_TIMEOUT_S, StoreError, connect_reader, connect_writer, enable_wal,  # noqa: F401
                                     os_store_error, store_error)  # StoreError, BUSY_TIMEOUT_S: re-exported

STATUSES = ("FINISHED", "FAILED", "KILLED")
# 2: seeds left the budget; schema-1 records are upgraded when a store is opened for writing
# (rows rewritten under their new run ids) and on every read (so read-only stores work too).
# 3: per-sample scores in their own table (run_id, metric, sample_id, value); a schema-2 store
# opens as is (read-only too) and simply has no per-sample rows.
SCHEMA_VERSION = 3
# A claim from another host cannot be probed for liveness; after this long it is presumed dead.
CLAIM_LEASE_S = 12 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    status     TEXT,
    method     TEXT,
    budget_key TEXT,
    record     TEXT NOT NULL,
    updated_at REAL
)
"""
# Per-sample scores of a run's metrics (BenchMetric.sample_scores), written in the record's
# transaction; value NULL = no value for that sample (e.g. no face found).
_SAMPLES_SCHEMA = """
CREATE TABLE IF NOT EXISTS sample_scores (
    run_id    TEXT NOT NULL,
    metric    TEXT NOT NULL,
    sample_id TEXT NOT NULL,
    value     REAL,
    PRIMARY KEY (run_id, metric, sample_id)
)
"""
# Who is running which run_id right now: lets several sweep processes share one store.
_CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    run_id     TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    claimed_at REAL NOT NULL
)
"""


def _claimant() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def _claim_is_live(run_id: str, host: str, pid: int, claimed_at: float) -> bool:
    """A claim is live while its process lives, or a run process of its run id does (an orphan,
    which the runner's death signal should make impossible, must never be run twice); on another
    host, which cannot be probed, until its lease runs out."""
    if host != socket.gethostname():
        return time.time() - claimed_at < CLAIM_LEASE_S
    return _pid_is_live(pid) or _run_process_is_live(run_id)


def _pid_is_live(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


# A run process's command line is `python ... -m bench.run.process RUN_ID ...`; a run
# forked by bench.run.forkserver reads the same, as one space-separated title.
RUN_PROCESS_MODULE = "bench.run.process"  # bench.run.process imports this name; a test checks it runs


def _run_process_is_live(run_id: str) -> bool:
    """Whether a process on this host is running ``run_id``: Linux /proc; elsewhere none can be
    seen (there the runner's watchdog ends a run process whose parent died)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    want = run_id.encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if RUN_PROCESS_MODULE.encode() in args and want in args:
            return True
    return False


def spec_hash(spec: dict) -> str:
    """A run's id: the hash of its resolved spec without the budget's name, a label (renaming a
    budget must not re-run identical work)."""
    d = {k: v for k, v in spec.items() if k != "budget"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


def upgrade_spec(spec: dict, run_id: str) -> tuple[dict, str]:
    """A record from before seeds left the budget (store schema 1) -> today's form: `seeds` leaves
    its budget fields, its budget key is recomputed, and so is its run id when that was the spec's
    hash. The same run planned today then has the same id, so it is found and skipped."""
    fields = spec.get("budget_fields")
    if not isinstance(fields, dict) or "seeds" not in fields:
        return spec, run_id
    new = dict(spec, budget_fields={k: v for k, v in fields.items() if k != "seeds"})
    new["budget_key"] = Budget.from_fields(str(spec.get("budget", "")), new["budget_fields"]).key()
    return new, (spec_hash(new) if spec_hash(spec) == run_id else run_id)


def _sqlite_errors(method):
    """Store methods raise StoreError (one line, see bench.core.storefile.store_error), never a raw sqlite3.Error."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
    return wrapper


@dataclass(frozen=True)
class RunRecord:
    """Everything needed to compare, reproduce and audit one run.

    ``spec`` is the resolved run spec (method, method_version, dataset, dataset_version,
    condition, budget, budget_key, seed, base_model, hparams); ``metric_meta`` holds per
    metric {"version": str, "higher_is_better": bool} so reports never merge versions.

    The JSON form (the store's text, the runner's result files) is strict JSON: a NaN or an
    infinity anywhere is written as ``null``, and reading maps ``null`` back to NaN in the
    numeric fields (``metrics``, ``compute`` and the curve's ``value``), so a non-finite
    number reads back as NaN. Text with bare ``NaN`` (older stores) still reads.

    ``sample_scores`` ({metric: {sample id: value}}, the metrics with a per-sample value) travels
    with the record (result files, W&B), but the store keeps it in its own table, not in the
    record's text; `Store.records()` attaches it again.
    """

    run_id: str
    spec: dict[str, Any]
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    metric_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)  # [{step, metric, value}] during training
    git_sha: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    sample_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    # where it ran (bench.core.provenance.machine_identity): device, CUDA, driver, CPU, torch build, host hash
    machine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("RunRecord.run_id must be a non-empty string")
        if self.status not in STATUSES:
            raise ValueError(f"RunRecord.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def consistency_metric(self) -> str | None:
        """The run's condition-consistency metric: of the metrics its metric_meta marks CONSISTENCY (the
        runner marks a metric whose `condition` is the run's and that scores eval batches, not data it
        synthesizes), the first by name. The one rule for the report's curves, `bench check` and claims;
        records from before the flag have none."""
        return next((m for m in sorted(self.metrics) if self.metric_meta.get(m, {}).get(CONSISTENCY)), None)

    @property
    def method(self) -> str:
        return self.spec.get("method", "")

    @property
    def budget_key(self) -> str:
        return self.spec.get("budget_key", "")

    @property
    def seed(self) -> int | None:
        return self.spec.get("seed")

    @property
    def dataset(self) -> str:
        return self.spec.get("dataset", "")

    @property
    def condition(self) -> str:
        return self.spec.get("condition", "")

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def machine_key(self) -> str:
        return machine_key(self.machine)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["machine"]:  # records without one keep the text they had before the field existed
            data.pop("machine")
        return data

    def to_json(self) -> str:
        # sort_keys makes the stored text canonical, so identical records compare equal as text.
        return json.dumps(_finite(self.to_dict()), sort_keys=True, allow_nan=False)

    def stored_json(self) -> str:
        """The store's text of the record: ``to_json`` without ``sample_scores``, which the store
        keeps in its own table (so a schema-2 record's text is unchanged)."""
        data = self.to_dict()
        data.pop("sample_scores")
        return json.dumps(_finite(data), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RunRecord has unknown fields {unknown} (written by a newer version?)")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text)
        if isinstance(data, dict):  # null -> NaN in the numeric fields (see the class docstring)
            for key in ("metrics", "compute"):
                if isinstance(data.get(key), dict):
                    data[key] = {k: math.nan if v is None else v for k, v in data[key].items()}
            if isinstance(data.get("sample_scores"), dict):
                data["sample_scores"] = {m: {i: math.nan if v is None else v for i, v in per.items()}
                                         for m, per in data["sample_scores"].items() if isinstance(per, dict)}
            if isinstance(data.get("curve"), list):
                data["curve"] = [{**p, "value": math.nan} if isinstance(p, dict) and "value" in p and p["value"] is None
                                 else p for p in data["curve"]]
        return cls.from_dict(data)


# Identity fields that compute figures depend on; the hostname hash is not one of them, so two
# identical machines share a key (their step times may be averaged), two different ones never do.
MACHINE_KEY_FIELDS = ("device", "device_name", "device_count", "cuda", "driver", "cpu", "cpu_cores",
                      "torch_threads", "torch", "world_size", "concurrent_runs", "run_process")
UNKNOWN_MACHINE = "unknown"


# Figures that depend on the machine (parameter counts do not): never averaged or compared across machines.
CONSISTENCY = "consistency"  # metric_meta flag: the metric re-extracts the run's own condition
MACHINE_COMPUTE = ("step_time_s", "peak_mem_mb", "peak_eval_mem_mb", "sample_latency_s")
# What an estimate record splits its peak memory into: est_<category>_mb (bench.profile.estimate writes them)
ESTIMATE_CATEGORIES = ("weights", "gradients", "optimizer", "activations")


def machine_key(machine: dict[str, Any]) -> str:
    """A short id of a record's machine (see MACHINE_KEY_FIELDS); "unknown" for records without one."""
    if not machine:
        return UNKNOWN_MACHINE
    ident = {k: machine.get(k) for k in MACHINE_KEY_FIELDS if machine.get(k) is not None}
    for field_, default in (("world_size", 1), ("concurrent_runs", 1), ("run_process", "interpreter")):
        if ident.get(field_) == default:  # the default: as records from before the field, whose keys stay
            del ident[field_]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def machine_label(machine: dict[str, Any]) -> str:
    """One line naming a machine for a reader, e.g. "2× NVIDIA H200 (CUDA 12.4, driver 550.54) · AMD EPYC ..."."""
    if not machine:
        return "unknown machine (record predates machine identity)"
    parts = []
    if machine.get("device_name"):
        gpu = f"{machine.get('device_count') or 1}× {machine['device_name']}"
        extra = ", ".join(f"{n} {machine[k]}" for k, n in (("cuda", "CUDA"), ("driver", "driver")) if machine.get(k))
        parts.append(gpu + (f" ({extra})" if extra else ""))
    else:
        parts.append("CPU")
    cpu = str(machine.get("cpu") or "?")
    if machine.get("cpu_cores"):
        cpu += f", {machine['cpu_cores']} cores"
    if machine.get("torch_threads"):
        cpu += f", {machine['torch_threads']} torch threads"
    parts.append(cpu)
    if machine.get("world_size", 1) not in (None, 1):
        parts.append(f"{machine['world_size']} processes")
    parts.append(f"torch {machine.get('torch', '?')}")
    return " · ".join(parts)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Store:
    """SQLite store of RunRecords; safe for several processes writing at once (WAL)."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        """Open (``read_only``: only read) or create the store at ``path``. An existing file is
        checked before anything is written to it: a 0-byte, foreign, newer-schema or damaged file
        is refused with its bytes unchanged (bench.core.storefile says how)."""
        self.path = Path(path)
        self.read_only = read_only
        self._conn: sqlite3.Connection | None = None
        try:
            if read_only:
                self._conn = connect_reader(self.path)
            else:
                self._conn = connect_writer(self.path, (_SCHEMA, _CLAIMS_SCHEMA, _SAMPLES_SCHEMA), SCHEMA_VERSION)
            self._init_schema()
        except (sqlite3.Error, StoreError, OSError) as e:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            if isinstance(e, StoreError):
                raise e from None  # one line: no chained traceback
            raise (os_store_error(self.path, e) if isinstance(e, OSError) else store_error(self.path, e)) from None

    def _init_schema(self) -> None:
        """Check the file, then (for writing) switch it to WAL and create or upgrade the schema. Every
        check only reads, so a damaged, foreign or newer file is refused before anything is written
        to it (switching to WAL rewrites header bytes 18-19), and an up-to-date store is not written."""
        conn = self._db
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(2)").fetchall() if not r[0].startswith("***")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {problems[0] if problems else '?'}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema {version}, newer than this controlbench "
                f"({SCHEMA_VERSION}); it was left untouched: upgrade controlbench or pass --store with another path"
            )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "runs" not in tables:
            raise StoreError(
                f"{self.path} is an SQLite database but not a controlbench store; it was left untouched: "
                "move it aside or pass --store with another path"
            )
        if self.read_only:
            if "runs" not in tables:
                raise StoreError(f"store {self.path} is empty (no runs table); check the path")
            return
        mode = enable_wal(conn)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"could not enable WAL (journal_mode={mode})")
        with self._transaction():
            conn.execute(_SCHEMA)
            conn.execute(_CLAIMS_SCHEMA)
            conn.execute(_SAMPLES_SCHEMA)
            if version < 2 and "runs" in tables:
                self._upgrade_rows(conn)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _upgrade_rows(self, conn: sqlite3.Connection) -> None:
        """Rewrite schema-1 records in today's form, inside the caller's transaction."""
        for run_id, text in conn.execute("SELECT run_id, record FROM runs").fetchall():
            record = self._decode(run_id, text)
            if record.run_id != run_id or record.stored_json() != text:
                conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
                self._upsert(conn, record, merge=True)

    @contextmanager
    def _transaction(self):
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (see storefile._open)."""
        if self.read_only:
            raise StoreError(f"store {self.path} was opened read-only")
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:  # SQLite already rolled back (e.g. on a damaged page): keep the first error
                pass
            raise

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        return self._conn

    @property
    @_sqlite_errors
    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    def _decode(self, run_id: str, text: str) -> RunRecord:
        try:
            record = RunRecord.from_json(text)
            spec, new_id = upgrade_spec(record.spec, record.run_id)
            return record if spec is record.spec else replace(record, spec=spec, run_id=new_id)
        except (ValueError, TypeError) as e:
            raise StoreError(
                f"store {self.path}: record {run_id!r} cannot be read ({e}); "
                "move the store aside or pass --store"
            ) from None

    @_sqlite_errors
    def _write(self, record: RunRecord, merge: bool) -> bool:
        """Upsert one record in its own transaction; see put/merge_from for the rules."""
        with self._transaction() as conn:
            if record.finished:  # in the same transaction: a process killed after the put leaves no claim behind
                conn.execute("DELETE FROM claims WHERE run_id = ?", (record.run_id,))
            return self._upsert(conn, record, merge)

    def _upsert(self, conn: sqlite3.Connection, record: RunRecord, merge: bool) -> bool:
        text = record.stored_json()
        row = conn.execute("SELECT status, record FROM runs WHERE run_id = ?", (record.run_id,)).fetchone()
        write = True
        if row is not None:
            old_status, old_text = row
            if old_text == text:
                write = bool(record.sample_scores) and not conn.execute(
                    "SELECT 1 FROM sample_scores WHERE run_id = ? LIMIT 1", (record.run_id,)).fetchone()
            elif old_status == "FINISHED" and not record.finished:
                write = False  # a finished result is never lost to a later failure
            elif merge and (old_status == "FINISHED") == record.finished:
                # same rank: the newer record wins, so merging is order-independent
                write = record.created_at > self._decode(record.run_id, old_text).created_at
        if write:
            conn.execute(
                "INSERT OR REPLACE INTO runs (run_id, status, method, budget_key, record, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record.run_id, record.status, record.method, record.budget_key, text, time.time()),
            )
            # the per-sample rows belong to the record: replaced with it, in the same transaction
            conn.execute("DELETE FROM sample_scores WHERE run_id = ?", (record.run_id,))
            conn.executemany(
                "INSERT INTO sample_scores (run_id, metric, sample_id, value) VALUES (?, ?, ?, ?)",
                [(record.run_id, str(m), str(i), _finite(float(v))) for m, per in record.sample_scores.items()
                 for i, v in per.items()])
        return write

    def put(self, record: RunRecord) -> bool:
        """Insert or replace ``record``; a FINISHED record is never overwritten by a
        non-FINISHED one. Returns whether anything was written."""
        return self._write(record, merge=False)

    @_sqlite_errors
    def get(self, run_id: str, *, with_scores: bool = False) -> RunRecord | None:
        row = self._db.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        record = self._decode(run_id, row[0])
        return self._with_scores([record], [run_id])[0] if with_scores else record

    def _has_samples_table(self) -> bool:
        return self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='sample_scores'").fetchone() is not None

    @_sqlite_errors
    def sample_scores(self, run_id: str | None = None) -> list[tuple[str, str, str, float]]:
        """Per-sample rows (run_id, sample_id, metric, value), NaN for a stored NULL; all runs'
        or one run's. A store from before schema 3 has none."""
        if not self._has_samples_table():
            return []
        sql = "SELECT run_id, sample_id, metric, value FROM sample_scores"
        rows = (self._db.execute(sql + " WHERE run_id = ? ORDER BY metric, sample_id", (run_id,)) if run_id
                else self._db.execute(sql + " ORDER BY run_id, metric, sample_id"))
        return [(r, i, m, math.nan if v is None else float(v)) for r, i, m, v in rows.fetchall()]

    def _with_scores(self, records: list[RunRecord], stored_ids: list[str]) -> list[RunRecord]:
        """Attach each record's per-sample rows (looked up under the id it is stored as)."""
        if not records or not self._has_samples_table():
            return records
        per_run: dict[str, dict[str, dict[str, float]]] = {}
        for run_id, sample_id, metric, value in self.sample_scores():
            per_run.setdefault(run_id, {}).setdefault(metric, {})[sample_id] = value
        return [replace(rec, sample_scores=per_run[sid]) if sid in per_run else rec
                for rec, sid in zip(records, stored_ids)]

    @_sqlite_errors
    def is_finished(self, run_id: str) -> bool:
        row = self._db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row is not None and row[0] == "FINISHED"

    @_sqlite_errors
    def records(self, status: str | None = None, *, with_scores: bool = True) -> list[RunRecord]:
        """All records (optionally of one status), oldest first, with their per-sample scores
        (``with_scores=False`` skips reading them)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if status is None:
            rows = self._db.execute("SELECT run_id, record FROM runs").fetchall()
        else:
            rows = self._db.execute(
                "SELECT run_id, record FROM runs WHERE status = ?", (status,)
            ).fetchall()
        recs = [self._decode(rid, text) for rid, text in rows]
        if with_scores:
            recs = self._with_scores(recs, [rid for rid, _ in rows])
        return sorted(recs, key=lambda r: (r.created_at, r.run_id))

    @_sqlite_errors
    def claim(self, run_id: str) -> bool:
        """Take the right to run ``run_id`` in this process. False when it is already FINISHED
        or a live process holds the claim; a stale claim (see _claim_is_live) is taken over."""
        me = _claimant()
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ? AND status = 'FINISHED'", (run_id,)).fetchone():
                return False
            row = conn.execute("SELECT host, pid, claimed_at FROM claims WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None and tuple(row[:2]) != me and _claim_is_live(run_id, *row):
                return False
            conn.execute("INSERT OR REPLACE INTO claims (run_id, host, pid, claimed_at) VALUES (?, ?, ?, ?)",
                         (run_id, *me, time.time()))
        return True

    @_sqlite_errors
    def release(self, run_id: str) -> None:
        """Drop this process's claim on ``run_id`` (after its record is stored)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM claims WHERE run_id = ? AND host = ? AND pid = ?", (run_id, *_claimant()))

    @_sqlite_errors
    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def merge_from(self, other_path: str | Path) -> int:
        """Copy records from another store (e.g. one per sweep worker); returns how many were
        written. FINISHED beats non-FINISHED; between equals the newer ``created_at`` wins,
        so merging the same store twice writes nothing the second time."""
        with Store(other_path, read_only=True) as other:
            incoming = other.records()
        return sum(self._write(rec, merge=True) for rec in incoming)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"


def merge_stores(into: str | Path, sources: list[str | Path]) -> tuple[list[tuple[str, int]], int]:
    """`bench store merge`: every source is opened read-only and checked before ``into`` is created
    or written, so a missing or unusable source leaves every file as it was. Returns (source,
    records written) per source and the merged store's size."""
    for source in sources:
        Store(source, read_only=True).close()
    with Store(into) as dest:
        return [(str(source), dest.merge_from(source)) for source in sources], len(dest)
