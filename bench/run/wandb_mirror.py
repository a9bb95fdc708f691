"""W&B mirror: every run record is copied to a W&B run whose id is the harness run id.

The store stays the record of truth. W&B offline sync can duplicate or skip runs, so the
mirror only copies: a failure here is noted in the record and never fails the run.
Offline by default (WANDB_MODE=offline); WANDB_MODE=online mirrors live; =disabled skips.

The run process opens the W&B run before training (`start`), so Lightning's WandbLogger logs
the loss, learning rate, step time and memory while it trains and the consistency-curve points
as they are measured; `mirror` then writes the record's summary into that same run.

Agent mode (WANDB_SWEEP_ID set, as `wandb agent` does): one `bench run` is one W&B run, whose
id is the agent's (WANDB_RUN_ID; wandb ignores `id=` inside a sweep anyway); the harness run
id goes into its config as `harness_run_id`; online unless WANDB_MODE says otherwise.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from bench.core.store import STATUSES, RunRecord

PROJECT = "controlbench"
METRIC_PREFIX = "metrics/"
COMPUTE_PREFIX = "compute/"


def _plain(value: Any) -> Any:
    """JSON-plain copy (tuples -> lists): W&B config must be plain dicts to read back cleanly."""
    return json.loads(json.dumps(value, default=str))


HARNESS_ID_KEY = "harness_run_id"


def agent_mode() -> bool:
    """Whether this process runs under a W&B sweep agent."""
    return bool(os.environ.get("WANDB_SWEEP_ID"))


def wandb_mode() -> str:
    """WANDB_MODE if set; else online under an agent (the sweep server must see the metric), offline otherwise."""
    return os.environ.get("WANDB_MODE") or ("online" if agent_mode() else "offline")


def wandb_run_id(harness_run_id: str) -> str | None:
    """The W&B run id: the agent's under a sweep, else the harness run id."""
    return (os.environ.get("WANDB_RUN_ID") or None) if agent_mode() else harness_run_id


def wandb_config(record: RunRecord) -> dict[str, Any]:
    return _plain({"spec": record.spec, "metric_meta": record.metric_meta, "git_sha": record.git_sha,
                   "versions": record.versions, "machine": record.machine, HARNESS_ID_KEY: record.run_id})


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


STEP_KEY = "trainer/global_step"  # the x axis of every logged value (Lightning's WandbLogger uses it too)


def _init(run_id: str, spec: dict[str, Any], out_dir: Path, mode: str, config: dict[str, Any]):
    """Open the W&B run of harness run ``run_id``: in an agent, the agent's run (see module doc)."""
    import wandb

    wid = wandb_run_id(run_id)
    # an agent's (or user's) WANDB_DIR wins; else beside the run's outputs
    out_dir = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else out_dir
    if mode == "offline" and wid:  # one local dir per run id: a re-run replaces, never adds
        for old in (out_dir / "wandb").glob(f"offline-run-*-{wid}"):
            shutil.rmtree(old, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    agent = agent_mode()
    project = os.environ.get("WANDB_PROJECT") or (None if agent else PROJECT)  # an agent's sweep names its project
    run = wandb.init(id=wid, resume="allow", project=project, dir=str(out_dir), mode=mode, config=config,
                     job_type="bench-run", name=f"{spec.get('method')}-s{spec.get('seed')}-{run_id[:8]}",
                     # system stats (GPU memory, utilisation over time) for sweep users; off otherwise, so a
                     # local CPU run's step time does not share its cores with a sampler
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=not agent))
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
    return run


@dataclass
class LiveRun:
    """The W&B run a run process logs into while it trains (see `start`)."""

    run: Any
    logger: Any  # lightning WandbLogger on `run`

    def log_curve(self, step: int, metric: str, value: float) -> None:
        self.run.log({f"curve/{metric}": value, STEP_KEY: step})


def start(run_id: str, spec: dict[str, Any], out_dir: Path) -> LiveRun | None:
    """Open the run's W&B run before training, for live logging; None when W&B is disabled or
    fails (noted on stderr; `mirror` then tries again at the end)."""
    mode = wandb_mode()
    if mode == "disabled":
        return None
    try:
        from lightning.pytorch.loggers import WandbLogger

        run = _init(run_id, spec, Path(out_dir), mode, _plain({"spec": spec, HARNESS_ID_KEY: run_id}))
        return LiveRun(run, WandbLogger(experiment=run, log_model=False))
    except Exception as e:  # noqa: BLE001 - W&B must never fail the run
        first = (str(e).strip().splitlines() or [""])[0]
        print(_scrub(f"warning: W&B live logging off ({type(e).__name__}: {first[:200]}); the run goes on"),
              file=sys.stderr)
        return None


def _log(record: RunRecord, out_dir: Path, mode: str, live: LiveRun | None = None) -> str:
    import wandb

    run = live.run if live is not None else _init(record.run_id, record.spec, out_dir, mode, wandb_config(record))
    try:
        if live is None:  # a live run logged its curve as it was measured
            for p in sorted(record.curve, key=lambda p: p["step"]):  # W&B charts: consistency vs train step
                run.log({f"curve/{p['metric']}": p["value"], STEP_KEY: p["step"]})
        else:
            run.config.update(wandb_config(record), allow_val_change=True)
        summary = wandb_summary(record)
        final = {k: v for k, v in summary.items() if k.startswith((METRIC_PREFIX, COMPUTE_PREFIX))}
        if final:  # in the history too, at the last step: sweep controllers and charts read either
            run.log({**final, STEP_KEY: int((record.spec.get("budget_fields") or {}).get("train_steps") or 0)})
        run.summary.update(summary)
        rows = scores_rows(record)
        if rows:  # per-sample scores: one row per (sample, metric), for paired analyses in W&B
            run.log({SCORES_TABLE: wandb.Table(columns=SCORES_COLUMNS, data=rows)})
    finally:
        run.finish(exit_code=0 if record.finished else 1)
    return str(Path(run.dir).parent)


def mirror(record: RunRecord, out_dir: Path, live: LiveRun | None = None) -> RunRecord:
    """Copy ``record`` to W&B (into ``live``, the run opened for training, if any); returns it with
    artifacts["wandb"] set to the run dir or the error."""
    mode = wandb_mode()
    if mode == "disabled":
        return record
    try:
        note = _log(record, Path(out_dir), mode, live)
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
    from bench.core.store import upgrade_spec

    # the harness id: in the config since agent mode (whose W&B id is the agent's), else the W&B id
    spec, run_id = upgrade_spec(config["spec"], str(config.get(HARNESS_ID_KEY) or run.id))
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
    from bench.core.errors import ConfigError

    if path.count("/") != 1 or not all(path.split("/")):
        raise ConfigError(f"--from-wandb needs ENTITY/PROJECT, got {path!r}")
    import wandb

    try:
        return records_from_wandb(wandb.Api(timeout=60).runs(path))
    except Exception as e:  # noqa: BLE001 - network/auth errors become one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(_scrub(f"cannot read W&B project {path}: {first[:200]}; check `wandb login` "
                                 "and that the machine is online")) from None


def live_callbacks(live: LiveRun, timer: Any, every: int) -> list:
    """Lightning callbacks that log, every ``every`` steps: the learning rate (LearningRateMonitor),
    the step's wall time (from the runner's StepTimer) and memory: DeviceStatsMonitor on GPU, this
    process's RSS on CPU (DeviceStatsMonitor's CPU stats need psutil and report the whole machine)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor

    from bench.core.provenance import rss_mb

    class StepStats(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = trainer.global_step
            if timer.times and (step - 1) % every == 0:
                stats = {"train/step_time_s": timer.times[-1]}
                if not torch.cuda.is_available():
                    stats["train/rss_mb"] = rss_mb()
                live.logger.log_metrics(stats, step=step - 1)

    callbacks = [LearningRateMonitor(logging_interval="step"), StepStats()]
    if torch.cuda.is_available():
        callbacks.append(DeviceStatsMonitor(cpu_stats=False))
    return callbacks
