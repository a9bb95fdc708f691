"""One run, in four steps: each a small function with typed inputs and outputs.

    setup = build(spec)                          base model, method and metrics, built once
    data = load_data(spec, setup)                1. the eval split, and the train split if needed
    trained = train(spec, setup, data)           2. fit for budget.train_steps (+ curve points),
                                                    resuming from the run's resume checkpoint
    checkpoint = save_checkpoint(setup, ...)        the trained weights, in the release layout
    evaluation = evaluate(spec, setup, data)     3. generate, score, write the report's artifacts
    return record(spec, setup, trained, evaluation)   4. the RunRecord

A run whose spec has `source_run` re-scores that run (`bench eval`): it trains nothing and
generates with the checkpoint the source run saved (`spec.weights`).

Importing this module imports no torch: torch, Lightning and the models are imported inside the steps.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.core.artifacts import (
    ARTIFACT_KEYS,
    GRID_SAMPLES,
    SampleManifest,
    file_name,
    run_paths,
)
from bench.core.errors import ConfigError
from bench.core.files import atomic_dir, atomic_path, remove_stale_temps
from bench.core.store import CONSISTENCY, RunRecord
from bench.run.options import apply_options, autocast, peak_mb
from bench.core.provenance import git_sha, machine_identity, package_versions, peak_rss_mb, rank_zero, rss_mb
from bench.run.spec import RunSpec, init_checkpoint

if TYPE_CHECKING:
    from torch import Tensor

    from bench.api.base_model import BaseModel
    from bench.api.method import Method
    from bench.api.types import Batch
    from bench.metrics.base import BenchMetric


WARMUP_STEPS = 5


def save_png(image: Tensor, path: Path) -> None:
    """Atomic PNG write of a [3,H,W] (or [1,H,W]) float image in [0,1]: a killed process never
    leaves a half-written image under the final name."""
    import cv2

    from bench.datasets.conditions import to_uint8

    rgb = to_uint8(image[None].expand(-1, 3, -1, -1))[0]
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), rgb[..., ::-1]):
            raise OSError(f"cannot write {tmp}")


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


def _refuse_stale_versions(spec: RunSpec, method_cls: type, metric_classes: dict[str, type]) -> None:
    """A run executes the code on disk, in a fresh process; if a method or metric changed version
    since the run was planned, its record would carry the wrong version."""
    from bench.core.bases import base_family

    now = {spec.method: method_cls.version, **{n: cls.version for n, cls in metric_classes.items()}}
    planned = {spec.method: spec.method_version, **dict(spec.metric_versions)}
    stale = [f"{n} {planned[n]} -> {now.get(n)}" for n in planned if planned[n] != now.get(n)]
    recipe = method_cls.make_recipe(dict(spec.hparams), base_family(spec.base_model)).as_dict()
    if spec.recipe and recipe != dict(spec.recipe):
        changed = sorted(k for k in recipe.keys() | dict(spec.recipe).keys() if recipe.get(k) != dict(spec.recipe).get(k))
        stale.append(f"{spec.method} recipe fields {', '.join(changed)}")
    if stale:
        raise ConfigError(f"code changed since this run was planned ({', '.join(stale)}); run the command again "
                          "to plan it with the current versions")


# ---- one run: build, then data -> train -> evaluate -> record --------------------------------


@dataclass(frozen=True)
class Setup:
    """The run's models and metrics, each built once, and whether it trains."""

    spec: RunSpec
    device: str
    base: BaseModel  # the method's own bundle (method.base), which the sampler uses
    method: Method
    metrics: dict[str, BenchMetric]  # by name, in spec order
    trains: bool  # trainable parameters, budget.train_steps > 0, and not a re-scoring (spec.source_run)

    def generate(self, batch: Batch, progress: bool = False) -> Tensor:
        """The one generation call (eval set, curves, synthesizing metrics): the shared sampler
        with the budget's settings and per-sample noise from (seed, sample id)."""
        from bench.api.sampler import generate

        b = self.spec.budget
        with autocast(b.precision, self.device):  # as training ran: the frozen weights are in its dtype
            return generate(self.base, self.method, batch, sampler=b.sampler, steps=b.inference_steps,
                            guidance_scale=b.guidance_scale, seed=self.spec.seed, progress=progress,
                            negative_prompt=b.negative_prompt)


@dataclass(frozen=True)
class RunData:
    """Step 1's output. `train_set` is None when neither training nor a synthesizing metric needs it."""

    eval_set: Any  # indexable single-sample Batches
    train_set: Any | None


@dataclass(frozen=True)
class Trained:
    """Step 2's output: step wall times, curve points, and the RSS before training (CPU memory)."""

    step_times: list[float]
    curve: list[dict]
    rss_loaded_mb: float
    peak_mem_mb: float = float("nan")  # training's peak, read right after fit (CUDA allocator, or RSS on CPU)
    world_size: int = 1  # training processes (DDP); only rank 0 gets here
    resumed_from: int = 0  # the step a resumed run continued from (0: trained from scratch)


@dataclass(frozen=True)
class Evaluation:
    """Step 3's output: metric values (a dict result becomes name_part) with their meta,
    per-sample sampling latencies, the artifact paths for RunRecord.artifacts, and the per-sample
    scores {metric key: {sample id: value}} of the metrics that have them (BenchMetric.sample_scores)."""

    metrics: dict[str, float]
    metric_meta: dict[str, dict]
    latencies: list[float]
    artifacts: dict[str, str]
    sample_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_s: float = 0.0  # wall seconds spent generating the eval set


class PhaseClock:
    """Wall seconds of each named step of a run, as `phase_<name>_s` compute figures: where a
    run's time goes (`python -m bench.profile.benchmarks --quickstart` sums them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[f"phase_{name}_s"] = now - self._last
        self.seconds[f"phase_{name}_rss_mb"] = peak_rss_mb()  # the high-water mark by this phase's end
        self._last = now


def execute(spec: RunSpec, out_dir: Path, progress: bool = True, live: Any = None) -> RunRecord | None:
    """Train, generate and score one run. Raises on failure; the caller records it.
    Returns None on a non-zero rank of a multi-GPU run: only rank 0 evaluates and records.
    ``live`` (bench.run.wandb_mirror.LiveRun) logs training to W&B as it happens."""
    clock = PhaseClock()
    setup = build(spec, out_dir)
    clock.lap("build")  # imports, base model, method, metrics
    data = load_data(setup, progress)
    clock.lap("data")
    paths = run_paths(out_dir, spec.run_id)
    trained = train(setup, data, progress, live, paths["resume"])
    if trained is None:
        return None
    clock.lap("train")  # with the curve points measured while training
    checkpoint = save_checkpoint(setup, paths["checkpoint"])
    clock.lap("checkpoint")
    evaluation = evaluate(setup, data, Path(out_dir), progress)
    clock.lap("evaluate")
    result = record(setup, trained, evaluation, checkpoint)
    result.compute.update(clock.seconds)
    result.compute["phase_sample_s"] = evaluation.sample_s  # the generation part of evaluate
    paths["resume"].unlink(missing_ok=True)  # finished: nothing left to resume
    return result


def build(spec: RunSpec, out_dir: Path | None = None) -> Setup:
    """Base model, method and metrics, in that order: their random inits draw from the RNG
    seeded here, so the order is part of what a run id reproduces. The method then loads
    `spec.weights`, or the checkpoint of its `init_run` under ``out_dir``."""
    import lightning as L
    import torch

    from bench.api.base_model import BaseModel
    from bench.core.registry import METHODS, METRICS
    from bench.run.builtins import load_builtins

    load_builtins()
    quiet_libraries()
    method_cls, metric_classes = METHODS.get(spec.method), {name: METRICS.get(name) for name in spec.metrics}
    _refuse_stale_versions(spec, method_cls, metric_classes)
    L.seed_everything(spec.seed, workers=True, verbose=False)
    # transformers' hub kernels would replace layers by downloaded ones on a GPU (and query it at every train())
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    base = BaseModel.load(spec.base_model)
    method = method_cls(base, spec.condition, spec.budget, dict(spec.hparams))
    if spec.weights:
        method.load_weights(Path(spec.weights))
    elif init := init_checkpoint(spec, out_dir):
        method.load_init(Path(init))
    apply_options(spec.options, spec.budget.precision, method)
    # only rank 0 evaluates (DDP's other ranks train and return), so it alone builds metrics, which never sync
    metrics = {name: cls() for name, cls in metric_classes.items()} if rank_zero() else {}
    for metric in metrics.values():
        metric.sync_on_compute = False
    trains = bool(method.trainable_parameters()) and spec.budget.train_steps > 0 and not spec.source_run
    # the method's own bundle: where it tunes a private UNet copy (finetune, controlnext, photomaker, odgen after
    # stage 1) the loaded UNet is then referenced by nothing and freed (3.4 GB at SD1.5 in fp32) before training
    del base
    return Setup(spec, "cuda" if torch.cuda.is_available() else "cpu", method.base, method, metrics, trains)


def load_data(setup: Setup, progress: bool = True) -> RunData:
    """Step 1: the eval split, and the train split for training or a synthesizing metric
    (bench.run.data.load_split: generated worlds materialized, folder datasets streamed)."""
    from bench.core.registry import DATASETS
    from bench.run.data import load_split

    spec, budget = setup.spec, setup.spec.budget
    dataset = DATASETS.get(spec.dataset)
    conds = (spec.condition,) if spec.condition else ()

    def split(name: str, size: int):
        return load_split(dataset(split=name, size=size, resolution=budget.resolution, conditions=conds), progress)

    needs_train = setup.trains or any(m.synthesizes for m in setup.metrics.values())
    return RunData(split("eval", budget.eval_samples), split("train", budget.train_size) if needs_train else None)


# Long (about 70 lines) on purpose: the Trainer's set-up, its callbacks (timer, EMA, curve, resume) and the
# fit read in the order Lightning runs them; split up, the order that the resume rule depends on is lost.
def train(setup: Setup, data: RunData, progress: bool = True, live: Any = None,
          resume: Path | None = None) -> Trained | None:
    """Step 2: fit for budget.train_steps, measuring the consistency curve at the budget's
    curve steps (and at the end). None on a non-zero rank of a multi-GPU run. With ``live``
    (rank 0's W&B run), Lightning logs loss, lr, step time and memory, and each curve point is
    logged as it is measured. ``resume``: the run's resume checkpoint, written every
    spec.checkpoint_every steps and, where a killed earlier attempt left one, continued from
    (bench.run.callbacks: the data-order rule)."""
    import torch

    from bench.api.types import collate
    from bench.run.callbacks import ConsistencyCurve, EMAWeights, ResumeCheckpoint, StepTimer

    spec, budget, method = setup.spec, setup.spec.budget, setup.method
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = rss_mb()
    curve_metrics = {n: m for n, m in setup.metrics.items() if m.on_curve(spec.condition)}
    curve_steps = tuple(s for s in budget.curve_steps if s < budget.train_steps) if setup.trains and curve_metrics else ()
    curve: list[dict] = []
    if curve_steps:
        curve_batch = collate([data.eval_set[i] for i in range(min(budget.curve_samples, len(data.eval_set)))])

    def measure_curve(module, step: int) -> None:
        with torch.random.fork_rng():  # measuring must not change what training draws next
            images = setup.generate(curve_batch)
            for name, metric in curve_metrics.items():  # the run's own metrics, reset around each point
                metric.reset()
                metric.to(images.device).update(images, curve_batch.to(images.device))
                curve.append({"step": step, "metric": name, "value": float(metric.compute())})
                metric.reset()
                if live is not None:
                    live.log_curve(step, name, curve[-1]["value"])

    timer = StepTimer()
    world, checkpoints = 1, None
    if setup.trains:
        callbacks = [timer] + ([ConsistencyCurve(curve_steps, measure_curve, curve)] if curve_steps else [])
        if method.recipe.ema_decay > 0:
            callbacks.append(EMAWeights(method.recipe.ema_decay, method.ema_start_step()))
        resumes = resume is not None and resume.is_file()
        if resume is not None:
            checkpoints = ResumeCheckpoint(resume, spec.checkpoint_every)
            remove_stale_temps(resume.parent)  # a half-written checkpoint of a killed attempt
            callbacks.append(checkpoints)  # after the callbacks whose state it saves
            method.strict_loading = not resumes  # the checkpoint leaves out the frozen base
        every = max(1, min(50, budget.train_steps // 20))  # about 20 points per curve, at least
        if live is not None:
            from bench.run.wandb_mirror import live_callbacks

            callbacks += live_callbacks(live, timer, every)
        trainer = _fit(setup, data, callbacks, live.logger if live is not None else False, every, progress,
                       resume if resumes else None)
        world, peak = trainer.world_size, peak_mb()  # training's peak, before curves and evaluation allocate theirs
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # evaluation is rank 0's alone: without the group, torchmetrics computes locally instead of
            # waiting in a barrier for ranks that have finished
            torch.distributed.destroy_process_group()
        if trainer.global_rank != 0:
            return None
    else:
        peak = peak_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the evaluation's peak is its own figure
    method.to(setup.device).eval()
    if curve_steps:  # the end point, on the same subset as the others
        measure_curve(method, budget.train_steps)
    return Trained(timer.times, curve, rss_loaded, peak, world, checkpoints.resumed_from if checkpoints else 0)


def _fit(setup: Setup, data: RunData, callbacks: list, logger: Any, every: int, progress: bool, resume: Path | None):
    """Lightning's fit (from `resume` when given) of the budget's steps; returns the trainer. The budget's batch
    size is the global, effective batch: each of `world` processes (DDP) loads its share, in options.accumulate
    micro-batches, so one optimiser step sees budget.batch_size samples however the work is split."""
    import lightning as L

    from bench.api.types import collate
    from bench.run.callbacks import ResumableLoader
    from bench.run.data import loader_options

    spec, budget, opts, accumulate = setup.spec, setup.spec.budget, dict(setup.spec.trainer), setup.spec.options.accumulate
    trainer = L.Trainer(max_steps=budget.train_steps, precision=budget.precision, accelerator=setup.device,
                        devices=opts.get("devices", 1), strategy=opts.get("strategy", "auto"),
                        accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=every,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    world = trainer.world_size
    if budget.batch_size % (world * accumulate):
        raise ConfigError(f"budget batch_size {budget.batch_size} does not split over {world} processes x {accumulate} "
                          f"micro-batches; choose a multiple of {world * accumulate} (it is the global batch)")
    loader = ResumableLoader.shuffled(data.train_set, budget.batch_size // (world * accumulate), spec.seed, collate,
                                      **loader_options(data.train_set))
    trainer.fit(setup.method, loader, ckpt_path=str(resume) if resume is not None else None)
    return trainer


def save_checkpoint(setup: Setup, directory: Path) -> Path | None:
    """The trained weights under ``directory``, in the layout the method's `load_weights` reads
    (written whole or not at all); None when the run trained nothing or the method has no
    checkpoint layout."""
    if not (setup.trains and type(setup.method).weights_layout):
        return None
    with atomic_dir(directory) as tmp:
        setup.method.save_weights(tmp)
    return directory


def evaluate(setup: Setup, data: RunData, out_dir: Path, progress: bool = True) -> Evaluation:
    """Step 3: generate every eval sample, score it with every metric, let synthesizing metrics
    generate their own data, and write what the report shows: every generated PNG and, for the
    first GRID_SAMPLES samples, the input condition and its re-extraction (see bench.core.artifacts)."""
    import torch

    from bench.api.types import collate
    from bench.run.data import loader_options

    spec, metrics = setup.spec, {n: m.to(setup.device) for n, m in setup.metrics.items()}
    paths = run_paths(out_dir, spec.run_id)
    for key in ("images", "conditions", "reextracted"):
        paths[key].mkdir(parents=True, exist_ok=True)
        remove_stale_temps(paths[key])  # left by a killed earlier attempt
    grid = SampleManifest(spec.condition, None)
    latencies, seen, sample_s = [], 0, 0.0
    chunk = spec.budget.eval_batch_size  # CFG doubles the UNet's batch; the VAE decodes one sample at a time
    for batch in torch.utils.data.DataLoader(data.eval_set, batch_size=chunk, shuffle=False, collate_fn=collate,
                                             **loader_options(data.eval_set)):
        t0 = time.perf_counter()
        images = setup.generate(batch, progress)
        latencies.append((time.perf_counter() - t0) / len(batch))
        sample_s += time.perf_counter() - t0
        batch = batch.to(setup.device)
        for metric in metrics.values():
            metric.update(images, batch)
        for i, image in zip(batch.ids, images):
            save_png(image, paths["images"] / file_name(i))
        if seen < GRID_SAMPLES:
            grid = _write_grid_samples(grid, images, batch.subset(slice(0, GRID_SAMPLES - seen)), metrics, paths)
        seen += len(batch)
    grid.write(paths["samples"])
    for metric in metrics.values():
        if metric.synthesizes:  # e.g. detector_map: generates its own pseudo-layouts and trains on them
            metric.synthesize(setup.generate, data.train_set, spec.seed)
    values, meta, per_sample = {}, {}, {}
    for name, m in metrics.items():
        # keyed like the record's values (name, or name_part); pooled metrics (FID, mIoU) have none
        per_sample.update({(name + key[len(m.name):]) if key.startswith(m.name) else key: scores
                           for key, scores in m.all_sample_scores().items() if scores})
        result = m.compute()  # a tensor, or a dict of named parts recorded as name_part
        parts = result.items() if isinstance(result, dict) else [(None, result)]
        for part, value in parts:
            key = f"{name}_{part}" if part else name
            values[key] = float(value)
            hib = m.part_higher_is_better.get(part, m.higher_is_better) if part else m.higher_is_better
            meta[key] = {"version": m.version, "higher_is_better": bool(hib)}
            if part is None and m.on_curve(spec.condition):  # read by bench.analysis.compare.consistency_metric
                meta[key][CONSISTENCY] = True
    per_sample = {k: v for k, v in per_sample.items() if k in values}  # only values the record holds
    return Evaluation(values, meta, latencies, {k: str(paths[k]) for k in ARTIFACT_KEYS}, per_sample, sample_s)


def _picture(t: Any) -> Tensor | None:
    """A condition tensor [C,H,W] with 1 or 3 channels as a [3,H,W] picture; None otherwise
    (e.g. keypoint coordinates)."""
    import torch

    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] not in (1, 3):
        return None
    return t.detach().float().cpu().expand(3, -1, -1)


def _write_grid_samples(grid: SampleManifest, images: Tensor, batch: Batch, metrics: dict[str, BenchMetric],
                        paths: dict[str, Path]) -> SampleManifest:
    """For the first len(batch) samples of `images`: the input condition's PNG, the PNG of the
    condition re-extracted by the first metric of the run's condition that re-extracts, and the
    prompt; returns the manifest with them added."""
    images, condition = images[: len(batch)], grid.condition
    by, redrawn = grid.reextracted_by, None
    for name, metric in metrics.items():
        if condition and metric.condition is not None and metric.scores(condition) and by in (None, name):
            redrawn = metric.reextract(images, batch)
            if redrawn is not None:
                by = name
                break
    inputs = batch.conditions.get(condition) if condition else None
    for k, sid in enumerate(batch.ids):
        name = file_name(sid)
        if inputs is not None and (picture := _picture(inputs[k])) is not None:
            save_png(picture, paths["conditions"] / name)
        if redrawn is not None:
            save_png(redrawn[k].detach().float().cpu(), paths["reextracted"] / name)
    return SampleManifest(condition, by, grid.ids + list(batch.ids), {**grid.files, **{i: file_name(i) for i in batch.ids}},
                          {**grid.prompts, **{i: str(p) for i, p in zip(batch.ids, batch.prompts)}})


def record(setup: Setup, trained: Trained, evaluation: Evaluation, checkpoint: Path | None = None) -> RunRecord:
    """Step 4: the RunRecord, with compute figures (params, median step time after warm-up,
    sampling latency, peak memory (`_peak_memory`; not for a re-scoring), `resumed_from_step` for
    a resumed run). Its artifacts name the checkpoint the images were generated with: the one this
    run saved, or the one it loaded without training."""
    method, spec = setup.method, setup.spec
    scored = checkpoint or (spec.weights if not setup.trains else None)
    artifacts = {**evaluation.artifacts, **({"checkpoint": str(scored)} if scored else {})}
    steps = trained.step_times[WARMUP_STEPS:] or trained.step_times
    added = method.inference_parameters()
    compute = dict(params_total=float(sum(p.numel() for n, p in method.named_parameters() if n.startswith("base.")) + added),
                   params_trainable=float(sum(p.numel() for p in method.trainable_parameters())),
                   params_added=float(added),
                   step_time_s=statistics.median(steps) if steps else float("nan"),
                   sample_latency_s=statistics.median(evaluation.latencies))
    if not spec.source_run:  # a re-scoring trains nothing: its peak is no run's training memory (claims read it so)
        compute.update(_peak_memory(trained))
    if trained.resumed_from:
        compute["resumed_from_step"] = float(trained.resumed_from)
    return RunRecord(run_id=spec.run_id, spec=spec.to_dict(), status="FINISHED",
                     metrics=evaluation.metrics, metric_meta=evaluation.metric_meta, compute=compute,
                     artifacts=artifacts, curve=trained.curve, git_sha=git_sha(), versions=package_versions(),
                     sample_scores=evaluation.sample_scores,
                     machine={**machine_identity(), "world_size": trained.world_size})


def _peak_memory(trained: Trained) -> dict[str, float]:
    """Training's peak (`peak_mem_mb`, read right after fit) and evaluation's (`peak_eval_mem_mb`, read now),
    as separate figures: CUDA allocator peaks (reset between the two), or on CPU this isolated process's peak
    RSS (which never resets, so the evaluation's is the whole run's) and training's rise over the loaded model."""
    import torch

    out = {"peak_mem_mb": trained.peak_mem_mb, "peak_eval_mem_mb": peak_mb()}
    if not torch.cuda.is_available():
        out["peak_mem_delta_mb"] = trained.peak_mem_mb - trained.rss_loaded_mb
    return out


def failed(spec: RunSpec, reason: str) -> RunRecord:
    return RunRecord(run_id=spec.run_id, spec=spec.to_dict(), status="FAILED", reason=reason, git_sha=git_sha(),
                     versions=package_versions())


# ---- the run process ----------------------------------------------------------------------------
# `python -m bench.run.process RUN_ID OUT_DIR RESULT_PATH PROGRESS SPEC_JSON`: a fresh interpreter per run.
# It can never outlive the process that started it, not even during its own start-up:
#   1. the launcher sets PR_SET_PDEATHSIG=SIGKILL in the forked child before exec (preexec_fn);
#      the setting survives execve, so it holds from the interpreter's first instruction;
#   2. the child checks os.getppid() against the launcher's pid (passed in PARENT_ENV): a launcher
#      that died between fork and prctl has already reparented the child, which exits at once;
#   3. where prctl does not exist (not Linux), a watchdog thread polls os.getppid() instead.
# The run id and out dir are on the command line, so /proc (and Store's claim liveness check,
# which must never take over a run whose process still lives) can see which run a process is.
# The death signal follows the thread that started the child: call run_isolated from a thread
# that lives as long as the run (the commands call it from the main thread).
