"""Running specs: one flat function per run, each run in its own process.

A run process is isolated so that (a) peak RSS on CPU is that run's alone, (b) a crash,
OOM or SIGKILL becomes a FAILED record instead of taking the sweep down. Only the parent
writes the store.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from bench.errors import ConfigError
from bench.spec import RunSpec
from bench.store import RunRecord, Store

EVAL_BATCH = 64
WARMUP_STEPS = 5


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("controlbench", "torch", "diffusers", "transformers", "lightning", "torchmetrics"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_png(image: torch.Tensor, path: Path) -> None:
    """Atomic PNG write: a killed process never leaves a half-written image under the final name."""
    import cv2

    from bench.datasets.conditions import to_uint8

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    if not cv2.imwrite(str(tmp), to_uint8(image[None])[0][..., ::-1]):
        raise OSError(f"cannot write {tmp}")
    os.replace(tmp, path)


class StepTimer(L.Callback):
    """Wall time of each optimisation step (CUDA-synchronised)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


class ConsistencyCurve(L.Callback):
    """Consistency metrics at fixed training steps on one fixed eval subset, so every method's
    curve has the same x positions and the same samples."""

    def __init__(self, steps: tuple[int, ...], measure):
        self.steps, self.measure = set(steps), measure  # measure(method, step) -> None
        self.done: set[int] = set()

    def _maybe(self, step: int, module) -> None:
        if step in self.steps and step not in self.done:
            self.done.add(step)
            module.eval()
            self.measure(module, step)
            module.train()

    def on_train_start(self, trainer, module):
        self._maybe(0, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._maybe(trainer.global_step, module)


def quiet_libraries() -> None:
    """Keep run output to our progress bars: library chatter hides real errors."""
    import logging
    import warnings

    import diffusers
    import transformers

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _refuse_stale_versions(spec: RunSpec) -> None:
    """A run executes the code on disk, in a fresh process; if a method or metric changed version
    since the run was planned, its record would carry the wrong version."""
    from bench.registry import METHODS, METRICS

    now = {spec.method: METHODS.get(spec.method).version, **{n: METRICS.get(n).version for n, _ in spec.metric_versions}}
    planned = {spec.method: spec.method_version, **dict(spec.metric_versions)}
    stale = [f"{n} {planned[n]} -> {now[n]}" for n in planned if planned[n] != now[n]]
    if stale:
        raise ConfigError(f"code changed since this run was planned ({', '.join(stale)}); run the command again "
                          "to plan it with the current versions")


def execute(spec: RunSpec, out_dir: Path, progress: bool = True) -> RunRecord | None:
    """Train, generate and score one run. Raises on failure; the caller records it.
    Returns None on a non-zero rank of a multi-GPU run: only rank 0 evaluates and records."""
    from bench.base_model import BaseModel
    from bench.data import materialize
    from bench.registry import DATASETS, METHODS, METRICS, load_builtins
    from bench.sampler import generate
    from bench.types import collate

    load_builtins()
    quiet_libraries()
    _refuse_stale_versions(spec)
    budget = spec.budget
    L.seed_everything(spec.seed, workers=True, verbose=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = BaseModel.load(spec.base_model)
    method = METHODS.get(spec.method)(base, spec.condition, budget, dict(spec.hparams))
    conds = (spec.condition,) if spec.condition else ()
    build = DATASETS.get(spec.dataset)
    eval_set = materialize(build(split="eval", size=budget.eval_samples, resolution=budget.resolution, conditions=conds), progress)
    trainable = method.trainable_parameters()
    train = bool(trainable) and budget.train_steps > 0
    metrics = {m: METRICS.get(m)() for m in spec.metrics}
    synthesizers = [m for m in metrics.values() if hasattr(m, "synthesize")]
    if train or synthesizers:
        train_set = materialize(build(split="train", size=budget.train_size, resolution=budget.resolution, conditions=conds), progress)

    def sample(batch, show: bool = False):  # the one generation call: eval set, curves, synthesizers
        return generate(base, method, batch, sampler=budget.sampler, steps=budget.inference_steps,
                        guidance_scale=budget.guidance_scale, seed=spec.seed, progress=show)

    curve: list[dict] = []
    curve_metrics = [m for m in spec.metrics if spec.condition and METRICS.get(m).condition == spec.condition
                     and not hasattr(METRICS.get(m), "synthesize")]
    curve_steps = tuple(s for s in budget.curve_steps if s < budget.train_steps) if train and curve_metrics else ()
    if curve_steps:
        curve_batch = collate([eval_set[i] for i in range(min(budget.curve_samples, len(eval_set)))])

    def measure_curve(module, step: int) -> None:
        images = sample(curve_batch)
        for name in curve_metrics:
            metric = METRICS.get(name)().to(images.device)
            metric.update(images, curve_batch.to(images.device))
            curve.append({"step": step, "metric": name, "value": float(metric.compute())})

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = rss_mb()

    timer = StepTimer()
    callbacks = [timer] + ([ConsistencyCurve(curve_steps, measure_curve)] if curve_steps else [])
    if train:
        loader = torch.utils.data.DataLoader(train_set, batch_size=budget.batch_size, shuffle=True, collate_fn=collate,
                                             drop_last=True, generator=torch.Generator().manual_seed(spec.seed))
        opts = dict(spec.trainer)
        trainer = L.Trainer(max_steps=budget.train_steps, precision=budget.precision, accelerator=device,
                            devices=opts.get("devices", 1), strategy=opts.get("strategy", "auto"),
                            logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=progress, callbacks=callbacks, num_sanity_val_steps=0,
                            limit_val_batches=0)
        trainer.fit(method, loader)
        if trainer.global_rank != 0:
            return None
    method.to(device).eval()
    if curve_steps:  # the end point, on the same subset as the others
        measure_curve(method, budget.train_steps)

    image_dir = out_dir / "images" / spec.run_id
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob(".*.tmp*"):  # left by a killed earlier attempt
        stale.unlink(missing_ok=True)
    metrics = {name: m.to(device) for name, m in metrics.items()}
    latencies = []
    loader = torch.utils.data.DataLoader(eval_set, batch_size=EVAL_BATCH, shuffle=False, collate_fn=collate)
    for batch in loader:
        t0 = time.perf_counter()
        images = sample(batch, progress)
        latencies.append((time.perf_counter() - t0) / len(batch))
        batch = batch.to(device)
        for metric in metrics.values():
            metric.update(images, batch)
        for i, image in zip(batch.ids, images):
            save_png(image, image_dir / f"{i}.png")
    for metric in synthesizers:  # e.g. detector_map: generate its own pseudo-layouts, train on them
        metric.synthesize(sample, train_set, spec.seed)

    steps = timer.times[WARMUP_STEPS:] or timer.times
    n_total = sum(p.numel() for n, p in method.named_parameters() if n.startswith("base.")) + method.inference_parameters()
    compute = dict(params_total=float(n_total), params_trainable=float(sum(p.numel() for p in trainable)),
                   params_added=float(method.inference_parameters()),
                   step_time_s=statistics.median(steps) if steps else float("nan"),
                   sample_latency_s=statistics.median(latencies))
    if torch.cuda.is_available():
        compute["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # isolated process: peak RSS of this run, and its rise over the loaded model
        compute["peak_mem_mb"] = peak_rss_mb()
        compute["peak_mem_delta_mb"] = peak_rss_mb() - rss_loaded
    values, meta = {}, {}
    for name, m in metrics.items():
        result = m.compute()  # a tensor, or a dict of named parts recorded as name_part
        parts = result.items() if isinstance(result, dict) else [(None, result)]
        for part, value in parts:
            key = f"{name}_{part}" if part else name
            values[key] = float(value)
            hib = m.part_higher_is_better.get(part, m.higher_is_better) if part else m.higher_is_better
            meta[key] = {"version": m.version, "higher_is_better": bool(hib)}
    return RunRecord(run_id=spec.run_id, spec=spec.to_dict(), status="FINISHED", metrics=values, metric_meta=meta,
                     compute=compute, artifacts={"images": str(image_dir)}, curve=curve, git_sha=git_sha(),
                     versions=package_versions())


def failed(spec: RunSpec, reason: str) -> RunRecord:
    return RunRecord(run_id=spec.run_id, spec=spec.to_dict(), status="FAILED", reason=reason, git_sha=git_sha(),
                     versions=package_versions())


def _child(spec_dict: dict, out_dir: str, result_path: str, progress: bool) -> None:
    try:  # die with the parent: a killed sweep must not leave orphan runs burning CPU
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except OSError:
        pass
    spec = RunSpec.from_dict(spec_dict)
    try:
        record = execute(spec, Path(out_dir), progress)
    except Exception as e:  # noqa: BLE001 - every failure becomes a FAILED record with its reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        record = failed(spec, f"{type(e).__name__}: {first}"[:500])
        traceback.print_exc(file=sys.stderr)
    if record is None:  # a non-zero rank: rank 0 writes the result
        return
    from bench.wandb_mirror import mirror

    record = mirror(record, Path(out_dir))  # never raises: a W&B failure is noted in the record
    tmp = Path(result_path + ".tmp")
    tmp.write_text(record.to_json())
    os.replace(tmp, result_path)


def run_isolated(spec: RunSpec, out_dir: Path, progress: bool = True) -> RunRecord:
    result = out_dir / "records" / f"{spec.run_id}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=_child, args=(spec.to_dict(), str(out_dir), str(result), progress))
    proc.start()
    proc.join()
    if result.exists():
        return RunRecord.from_json(result.read_text())
    code = proc.exitcode
    why = f"killed by signal {-code}" if code and code < 0 else f"run process exited with code {code}"
    return failed(spec, f"{why} before writing a result (out of memory or killed?)")


def run_specs(specs: list[RunSpec], store: Store, out_dir: Path, progress: bool = True) -> list[RunRecord]:
    """Run every spec not already FINISHED in the store; FAILED runs do not stop the rest."""
    from tqdm.auto import tqdm

    records = []
    bar = tqdm(specs, desc="runs", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(f"{spec.method} seed={spec.seed}")
        existing = store.get(spec.run_id)
        if existing is not None and existing.finished:
            records.append(existing)
            continue
        record = run_isolated(spec, out_dir, progress)
        if rank_zero_only.rank == 0:  # a DDP launcher re-runs this command on every rank
            store.put(record)
        records.append(record)
        if record.status != "FINISHED":
            tqdm.write(f"run {spec.run_id} ({spec.method}, seed {spec.seed}) FAILED: {record.reason}")
    return records

