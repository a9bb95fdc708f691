"""Estimates of a whole run on one card, and the budget options that fit it
(`bench profile --estimate --fit 24GiB,40GiB,80GiB`).

Three peaks, each counted on fake tensors by bench.profile.estimate's StorageTracker:
- training: the method's own step (loss, backward, AdamW) at a micro-batch, with or without gradient
  checkpointing (diffusers' `enable_gradient_checkpointing()` in every diffusers model of the method,
  the frozen UNet too: bench.profile.measure.build_rig). Gradient accumulation (`options.accumulate`)
  splits the budget's effective batch into micro-batches; its peak is the micro-batch's, because the
  steady-state step already holds a full set of gradients (the accumulator).
- evaluation: one `generate` call of the shared sampler (bench.api.sampler) at `eval_batch_size`
  with CFG on (the UNet sees 2 x eval_batch_size) and its VAE decode, one sampler step (every step
  has the same shapes), over the method's weights alone (training's gradients and optimizer state
  are not counted: a run that keeps them alive while sampling adds est_gradients + est_optimizer).
- the data pipeline's host RAM (bench.run.data streams folder splits): the batches in flight,
  (workers x prefetch_factor + 2) x batch bytes, plus each worker's own memory (WORKER_MB, measured:
  `python -m bench.profile.rehearse --data-rss`).

Memory is affine in the batch (weights and optimizer state are fixed, activations scale), so each
peak is counted at sizes 1 and 2 and the line through them gives every other size: a plan costs
4-6 fake steps per method, not a search per card. Frozen modules are held in the weight dtype under
mixed precision, as diffusers' train_controlnet.py casts vae/unet/text_encoder to weight_dtype
(the SDXL VAE stays fp32, train_controlnet_sdxl.py); trained weights stay fp32.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from bench.profile.estimate import Estimator, StorageTracker, fake_batch, sample_batch
from bench.profile.measure import ProfileSetup

GIB = 2**30
EVAL_SIZES = (1, 2, 4, 8, 16, 32, 64)  # eval_batch_size candidates
WORKER_MB = 300  # one DataLoader worker's own RSS beyond what it shares (data-rss: 1243 MB worker vs 973 MB main)


@dataclasses.dataclass(frozen=True)
class Line:
    """Peak bytes as a function of a size n >= 1, through the counts at n = 1 and n = 2."""

    at1: float
    slope: float

    @classmethod
    def through(cls, p1: float, p2: float) -> "Line":
        return cls(p1, max(p2 - p1, 0.0))

    def __call__(self, n: int) -> float:
        return self.at1 + self.slope * (n - 1)

    def largest(self, limit: float, among) -> int:
        """The largest of `among` whose peak fits in `limit` (0: none does)."""
        return max((n for n in among if self(n) <= limit), default=0)


def frozen_in_weight_dtype(est: Estimator) -> None:
    """Cast the method's frozen floating parameters to the autocast dtype (fake tensors: no data)."""
    from bench.core.budget import PROFILE_PRECISIONS

    dtype = PROFILE_PRECISIONS[est.setup.precision].autocast
    if dtype is None:
        return
    method, dtype = est.rig.method, getattr(torch, dtype)
    trained = {id(p) for p in method.trainable_parameters()}
    vae = getattr(method.base, "vae", None)
    keep = {id(p) for p in vae.parameters()} if vae is not None and getattr(method.base, "is_sdxl", False) else set()
    for m in method.modules():
        for name, p in list(m._parameters.items()):
            if p is None or id(p) in trained or id(p) in keep or not p.is_floating_point():
                continue
            with est.mode:
                m._parameters[name] = torch.nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=dtype),
                                                         requires_grad=False)


def eval_peak(est: Estimator, n: int, guidance: float = 7.5, sampler: str = "ddim") -> int:
    """Peak bytes of one sampler step and the decode at eval batch `n` (module docstring)."""
    from bench.api import sampler as loop

    rig, method = est.rig, est.rig.method
    batch = sample_batch(rig, est.setup, n)
    tracker = StorageTracker()
    with est.within:  # fake tensors, or real ones (Estimator(fake=False): the equality test's reference)
        batch = fake_batch(est.mode, batch) if est.fake else batch
        tracker.add_all([(t, "weights") for t in (*method.parameters(), *method.buffers())]
                        + [(t, "activations") for t in (batch.image, *batch.conditions.values())])
        method.eval()
        try:
            with tracker, rig.attention(), autocast_of(est), real_timesteps(loop):
                loop.generate(method.base, method, batch, sampler=sampler, steps=1, guidance_scale=guidance, seed=0)
        finally:
            method.train()
    return tracker.peak


@contextlib.contextmanager
def real_timesteps(loop):
    """The sampler's scheduler keeps its tables and timesteps real (the UNet and the method hooks get
    real 0-d timesteps) and steps with a Python int: a step indexes its alphas with the timestep and
    compares it (`prev_timestep >= 0`), which fake tensors cannot (DDIM, the estimate's sampler: its
    step has every sampler's shapes)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    make = loop.make_scheduler

    def real_tables(base_scheduler, name):
        with unset_fake_temporarily():  # its alphas too
            scheduler = make(base_scheduler, name)
        set_timesteps = scheduler.set_timesteps

        def set_real(*args, **kwargs):
            with unset_fake_temporarily():
                set_timesteps(*args, **kwargs)
                # real 0-d tensors: iterating the table under the fake mode would make them fake
                scheduler.timesteps = list(scheduler.timesteps)

        step = scheduler.step

        def step_at(pred, t, *args, **kwargs):  # a Python int: a step indexes with it and compares it
            with unset_fake_temporarily():
                t = int(t)
            return step(pred, t, *args, **kwargs)

        scheduler.set_timesteps, scheduler.step = set_real, step_at
        return scheduler

    loop.make_scheduler = real_tables
    try:
        yield
    finally:
        loop.make_scheduler = make


def autocast_of(est: Estimator):
    from bench.core.budget import PROFILE_PRECISIONS

    dtype = PROFILE_PRECISIONS[est.setup.precision].autocast
    return torch.autocast("cpu", dtype=getattr(torch, dtype)) if dtype else torch.autocast("cpu", enabled=False)


def data_host_bytes(setup: ProfileSetup, micro_batch: int, conditions: int = 1, refs: int = 0, workers: int = 1,
                    prefetch: int = 2) -> float:
    """Host RAM of the streamed data pipeline (module docstring): float32 images, condition maps and
    reference images of the batches in flight, plus the workers' own memory."""
    sample = (3 + 3 * conditions + 3 * refs) * setup.resolution ** 2 * 4
    return (workers * prefetch + 2) * micro_batch * sample + workers * WORKER_MB * 2**20


@dataclasses.dataclass
class MethodPeaks:
    """One variant's peak lines: training without / with checkpointing (None: not counted), evaluation."""

    variant: str
    train: Line
    train_ckpt: Line | None
    evaluate: Line
    params_trainable: float


def _train_line(est: Estimator) -> Line:
    return Line.through(est.step(1).peak_bytes, est.step(2).peak_bytes)


def method_peaks(variant: str, setup: ProfileSetup, smallest_card: float) -> MethodPeaks:
    """Count the lines of `variant`: checkpointing only when micro-batch 1 does not fit the smallest card."""
    est = Estimator(variant, dataclasses.replace(setup, checkpointing=False))
    frozen_in_weight_dtype(est)
    train = _train_line(est)
    evaluate = Line.through(eval_peak(est, 1), eval_peak(est, 2))
    ckpt = None
    if train(1) > smallest_card:
        est_ckpt = Estimator(variant, dataclasses.replace(setup, checkpointing=True))
        frozen_in_weight_dtype(est_ckpt)
        ckpt = _train_line(est_ckpt)
    return MethodPeaks(variant, train, ckpt, evaluate, est.counts["params_trainable"])


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_card(peaks: MethodPeaks, card: float, effective_batch: int, setup: ProfileSetup) -> dict:
    """The budget options for one card: no checkpointing where a micro-batch fits, the largest
    micro-batch that divides the effective batch (accumulate = the rest), the largest eval batch."""
    row = dict(variant=peaks.variant, card_gib=card / GIB, effective_batch=effective_batch,
               resolution=setup.resolution, precision=setup.precision)
    for ckpt, line in ((False, peaks.train), (True, peaks.train_ckpt)):
        micro = line.largest(card, divisors(effective_batch)) if line is not None else 0
        if micro:
            row.update(checkpointing=ckpt, micro_batch=micro, accumulate=effective_batch // micro,
                       train_peak_gib=line(micro) / GIB)
            break
    else:
        row.update(checkpointing=None, micro_batch=0, accumulate=0,
                   train_peak_gib=(peaks.train_ckpt or peaks.train)(1) / GIB)
    e = peaks.evaluate.largest(card, EVAL_SIZES)
    row.update(eval_batch_size=e, eval_peak_gib=peaks.evaluate(max(e, 1)) / GIB,
               host_gib=data_host_bytes(setup, max(row["micro_batch"], 1)) / GIB)
    return row


def plan_all(variants: list[str], setup: ProfileSetup, cards: list[int], effective_batch: int,
             progress: bool = True) -> list[dict]:
    """`plan_card` rows per variant and card; a variant that cannot be estimated gets one error row."""
    from tqdm.auto import tqdm

    from bench.profile.estimate import _guarded

    rows = []
    for v in tqdm(variants, desc="fit", disable=not progress):
        rows += _guarded(v, lambda: [plan_card(p, c, effective_batch, setup)
                                     for p in [method_peaks(v, setup, min(cards))] for c in cards])
    return rows


def format_plan(rows: list[dict]) -> str:
    """The --fit table: per method and card, the options that fit and the three peaks."""
    lines = [f"{'variant':14s} {'card':>5s} {'ckpt':>4s} {'micro x acc':>11s} {'train GiB':>9s} {'eval bs':>7s} "
             f"{'eval GiB':>8s} {'host GiB':>8s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']}: not estimated: {r['error']}")
            continue
        fits = f"{r['micro_batch']} x {r['accumulate']}" if r["micro_batch"] else "no fit"
        ckpt = "-" if r["checkpointing"] is None else ("on" if r["checkpointing"] else "off")
        lines.append(f"{r['variant'][:14]:14s} {r['card_gib']:4.0f}G {ckpt:>4s} {fits:>11s} {r['train_peak_gib']:9.2f} "
                     f"{r['eval_batch_size']:7d} {r['eval_peak_gib']:8.2f} {r['host_gib']:8.2f}")
    head = (f"budget per card ({rows[0].get('resolution', '?')}px, {rows[0].get('precision', '?')}, effective batch "
            f"{rows[0].get('effective_batch', '?')}; frozen modules in the weight dtype; micro x acc = options."
            "accumulate; eval at eval_batch_size with CFG and the VAE decode)") if rows else ""
    return "\n".join([head, *lines])
