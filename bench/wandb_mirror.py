"""W&B mirror: every run record is copied to a W&B run whose id is the harness run id.

The store stays the record of truth. W&B offline sync can duplicate or skip runs, so the
mirror only copies: a failure here is noted in the record and never fails the run.
Offline by default (WANDB_MODE=offline); WANDB_MODE=online mirrors live; =disabled skips.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from bench.store import STATUSES, RunRecord

PROJECT = "controlbench"
METRIC_PREFIX = "metrics/"
COMPUTE_PREFIX = "compute/"


def _plain(value: Any) -> Any:
    """JSON-plain copy (tuples -> lists): W&B config must be plain dicts to read back cleanly."""
    return json.loads(json.dumps(value, default=str))


def wandb_config(record: RunRecord) -> dict[str, Any]:
    return _plain({"spec": record.spec, "metric_meta": record.metric_meta, "git_sha": record.git_sha,
                   "versions": record.versions, "machine": record.machine})


def wandb_summary(record: RunRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"status": record.status, "reason": record.reason, "created_at": record.created_at}
    out.update({METRIC_PREFIX + k: v for k, v in record.metrics.items()})
    out.update({COMPUTE_PREFIX + k: v for k, v in record.compute.items()})
    if record.curve:
        out["curve"] = record.curve
    return out


SCORES_TABLE = "sample_scores"
SCORES_COLUMNS = ["sample_id", "metric", "value"]


def scores_rows(record: RunRecord) -> list[list[Any]]:
    """The record's per-sample scores as [sample_id, metric, value] rows (value None for NaN),
    the columns of the run's ``sample_scores`` wandb.Table."""
    return [[sid, metric, v if isinstance(v, (int, float)) and math.isfinite(v) else None]
            for metric in sorted(record.sample_scores) for sid, v in sorted(record.sample_scores[metric].items())]


def _scrub(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def _log(record: RunRecord, out_dir: Path, mode: str) -> str:
    import wandb

    if mode == "offline":  # one local dir per run id: a re-run replaces, never adds
        for old in (out_dir / "wandb").glob(f"offline-run-*-{record.run_id}"):
            shutil.rmtree(old, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(id=record.run_id, resume="allow", project=os.environ.get("WANDB_PROJECT", PROJECT),
                     dir=str(out_dir), mode=mode, config=wandb_config(record), job_type="bench-run",
                     name=f"{record.method}-s{record.seed}-{record.run_id[:8]}",
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    try:
        for p in sorted(record.curve, key=lambda p: p["step"]):  # W&B charts: consistency vs train step
            run.log({f"curve/{p['metric']}": p["value"], "train_step": p["step"]})
        run.summary.update(wandb_summary(record))
        rows = scores_rows(record)
        if rows:  # per-sample scores: one row per (sample, metric), for paired analyses in W&B
            run.log({SCORES_TABLE: wandb.Table(columns=SCORES_COLUMNS, data=rows)})
    finally:
        run.finish(exit_code=0 if record.finished else 1)
    return str(Path(run.dir).parent)


def mirror(record: RunRecord, out_dir: Path) -> RunRecord:
    """Copy ``record`` to W&B; returns it with artifacts["wandb"] set to the run dir or the error."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return record
    try:
        note = _log(record, out_dir, mode)
    except Exception as e:  # noqa: BLE001 - the mirror must never fail the run
        first = (str(e).strip().splitlines() or [""])[0]
        note = _scrub(f"mirror failed: {type(e).__name__}: {first}")[:300]
        print(f"warning: W&B {note} (run {record.run_id}; the store has the result)", file=sys.stderr)
    return replace(record, artifacts={**record.artifacts, "wandb": note})


def _floats(summary: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) if v is not None else math.nan
            for k, v in summary.items() if k.startswith(prefix)}


def record_from_wandb(run: Any) -> RunRecord | None:
    """A RunRecord from a `wandb.apis.public.Run` our mirror wrote; None for any other run."""
    config, summary = dict(run.config), dict(run.summary_metrics)
    status = summary.get("status")
    if "spec" not in config or status not in STATUSES:
        return None  # not a controlbench run, or one still running
    from bench.store import upgrade_spec

    spec, run_id = upgrade_spec(config["spec"], run.id)  # runs mirrored while seeds were a budget field
    return RunRecord(run_id=run_id, spec=spec, status=status, reason=summary.get("reason") or "",
                     metrics=_floats(summary, METRIC_PREFIX), metric_meta=config.get("metric_meta") or {},
                     compute=_floats(summary, COMPUTE_PREFIX), artifacts={"wandb": "/".join(run.path)},
                     curve=list(summary.get("curve") or []),
                     git_sha=config.get("git_sha") or "", versions=config.get("versions") or {},
                     machine=config.get("machine") or {},
                     created_at=float(summary.get("created_at") or 0.0))


def records_from_wandb(runs: Iterable[Any]) -> list[RunRecord]:
    return [rec for rec in map(record_from_wandb, runs) if rec is not None]


def fetch_records(path: str) -> list[RunRecord]:
    """Records of every controlbench run in W&B project ENTITY/PROJECT (needs W&B access)."""
    from bench.errors import ConfigError

    if path.count("/") != 1 or not all(path.split("/")):
        raise ConfigError(f"--from-wandb needs ENTITY/PROJECT, got {path!r}")
    import wandb

    try:
        return records_from_wandb(wandb.Api(timeout=60).runs(path))
    except Exception as e:  # noqa: BLE001 - network/auth errors become one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(_scrub(f"cannot read W&B project {path}: {first[:200]}; check `wandb login` "
                                 "and that the machine is online")) from None
