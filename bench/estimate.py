"""`bench profile --estimate`: training memory and FLOPs per step at true scale, without a GPU.

Each method's rig is built exactly as `bench profile` builds it (`bench.profile.build_rig`), but
under `FakeTensorMode`: every parameter, activation and optimizer state is a fake tensor with a
shape, dtype and storage size and no data, so SD1.5 or SDXL costs no real memory. The step that
runs is `bench.profile.train_step`, the one the timing loop runs (the method's own
`training_loss`, backward, AdamW step), not a copy. Two things are counted during it:

- peak live storage bytes (`StorageTracker`, a TorchDispatchMode): every op output's storage is
  registered once (views share it) and forgotten when the storage dies, which is what
  `torch.cuda.max_memory_allocated` counts. The peak is split by what the bytes are: weights
  (parameters and buffers), gradients, optimizer (AdamW's state, plus the temporaries of its
  step), activations (everything else: saved activations, temporaries, the batch).
- FLOPs (`torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions and attention,
  forward and backward, including the no-grad VAE and text encoders of the step).

The step is measured at steady state: one untracked warm-up step first creates AdamW's state and
leaves gradients alive into the next forward (the loop zeroes them after the loss), as every step
after the first on a GPU does.

The fake step runs on the CPU device. In torch 2.14 fake CUDA tensors run a forward without a GPU,
but their backward fails on the CUDA primary context. What the CPU device changes:
- the attention kernel: "efficient" selects the CPU's fused kernel (flash attention for the CPU),
  whose saved state (output + logsumexp) is the size of CUDA's memory-efficient kernel's; "math"
  materialises the attention matrix on both; "default" is PyTorch's CPU choice, which may differ
  from its CUDA choice;
- workspaces: cuDNN/cuBLAS workspaces, which CUDA allocates through the caching allocator, are
  not counted, and neither is the allocator's rounding of blocks (512 B) nor fragmentation
  (reserved > allocated). Expect a GPU's max_memory_allocated a few percent above the estimate;
- fp16 loss scaling: GradScaler reads found-inf back with `.item()`, which fake tensors cannot;
  fp16 runs without the scaler (its unscale is in place, its state one element).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from bench.errors import ConfigError
from bench.profile import ProfileSetup, build_rig, parameter_counts, train_step

CATEGORIES = ("weights", "gradients", "optimizer", "activations")
GIB = 2**30


class StorageTracker(TorchDispatchMode):
    """Live tensor storages, by category, and the peak of their sum.

    Each storage counts once (keyed by its StorageImpl, so views and in-place results add nothing)
    with its `nbytes`, from the op that first returns it until it dies (a weakref finalizer on the
    storage's Python object, which torch keeps alive as long as the storage). Works the same on
    real and on fake tensors, which is what the equality test relies on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list] = {}  # storage key -> [nbytes, category]
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.category = "activations"  # what storages new op outputs are
        self.peak, self.at_peak = 0, dict(self.totals)

    def add(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count `tensor`'s storage (or move it to `category` when it is counted already)."""
        try:
            st = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or nested: no single storage
            return
        key, n = st._cdata, st.nbytes()
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [n, category or self.category]
            self.totals[category or self.category] += n
            weakref.finalize(st, self._free, key)
            return
        old_n, old_cat = entry
        self.totals[old_cat] -= old_n
        entry[:] = [n, category or old_cat]  # n differs after a resize_
        self.totals[entry[1]] += n

    def add_all(self, tensors: Iterable[tuple[torch.Tensor, str]]) -> None:
        """Count (tensor, category) pairs; holds no reference once it returns (a list of the old
        gradients kept past `zero_grad` would double them)."""
        for t, cat in tensors:
            self.add(t, cat)
        self.mark()

    def _free(self, key: int) -> None:
        n, cat = self.live.pop(key)
        self.totals[cat] -= n

    @property
    def current(self) -> int:
        return sum(self.totals.values())

    def mark(self) -> None:
        total = self.current
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.totals)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        self.mark()
        return out


class _Global:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to "Global"."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode counting totals only: its per-module breakdown (hooks on every module's
    forward and backward) doubled the time of a fake SD1.5 step, and only the total is used."""
    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):  # the attribute its _count_flops reads parents from
        counter.mod_tracker = _Global()
    return counter


@dataclasses.dataclass
class StepCount:
    peak_bytes: int
    split: dict[str, int]  # CATEGORIES -> bytes at the peak
    flops: int


def measure_step(rig, batch) -> StepCount:
    """One `train_step` of `rig` on `batch`, counting the peak of live storages and the FLOPs;
    real or fake tensors alike."""
    tracker = StorageTracker()
    tracker.add_all(live_state(rig, batch))
    params = rig.method.trainable_parameters()
    # a gradient is created by the op that computes it (counted as an activation); its leaf's
    # accumulation hook names it a gradient
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.add(p.grad, "gradients")) for p in params]
    hooks.append(rig.optimizer.register_step_pre_hook(lambda *a: setattr(tracker, "category", "optimizer")))
    hooks.append(rig.optimizer.register_step_post_hook(lambda *a: setattr(tracker, "category", "activations")))
    try:
        with flop_counter() as flops, tracker:
            train_step(rig, batch)
    finally:
        for h in hooks:
            h.remove()
    return StepCount(tracker.peak, tracker.at_peak, flops.get_total_flops())


def live_state(rig, batch) -> list[tuple[torch.Tensor, str]]:
    """Everything a step starts with on the device: the method's weights and buffers, gradients
    and AdamW state left by the previous step, and the batch."""
    m, opt = rig.method, rig.optimizer
    out = [(t, "weights") for t in (*m.parameters(), *m.buffers())]
    out += [(p.grad, "gradients") for p in m.parameters() if p.grad is not None]
    out += [(t, "optimizer") for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    out += [(t, "activations") for t in tree_leaves((batch.image, batch.conditions, batch.refs)) if torch.is_tensor(t)]
    return out


def fake_batch(mode, batch):
    """The batch's tensors as fake tensors of `mode` (the data is drawn on real tensors: the
    shapes world renders with OpenCV)."""
    f = lambda v: mode.from_tensor(v) if torch.is_tensor(v) else v  # noqa: E731
    return dataclasses.replace(batch, image=f(batch.image), conditions={k: f(v) for k, v in batch.conditions.items()},
                               refs={k: f(v) for k, v in batch.refs.items()})


def warm_up(rig) -> None:
    """Steady state before the measured step: AdamW's state made by its own first step, and a
    gradient on every trainable parameter (alive into the next forward, as the loop zeroes them
    after the loss). A whole warm-up step would make the same tensors and cost a fake step more."""
    for p in rig.method.trainable_parameters():
        p.grad = torch.zeros_like(p)
    rig.optimizer.step()


@functools.lru_cache(maxsize=8)
def _one_sample(dataset: str, resolution: int, condition: str):
    from bench.registry import DATASETS

    return DATASETS.get(dataset)("train", 1, resolution, (condition,))[0]


def sample_batch(rig, setup: ProfileSetup, b: int):
    """A batch of `b` with the shapes `bench.profile.sample_batches` draws: the estimate reads
    shapes, not values, so one rendered sample (rendering at 512 px takes seconds) is repeated."""
    from bench.types import collate

    return collate([_one_sample(type(rig.method).sample_dataset, setup.resolution, rig.condition)] * b)


def fakeify(module: torch.nn.Module, device: str, dtype: torch.dtype | None, mode) -> torch.nn.Module:
    """`module`'s parameters and buffers (on the meta device) replaced by fake tensors of `mode` on
    `device`, floating ones cast to `dtype` when given: what `module.to(device, dtype)` does to real
    ones (which would try to swap fake tensors in place, and fails)."""
    made: dict[int, torch.Tensor] = {}  # tied tensors stay tied

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            with mode:
                new = torch.empty_strided(t.shape, t.stride(), device=device,
                                          dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            made[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(
                t, torch.nn.Parameter) else new
        return made[id(t)]

    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None:
                    store[name] = fake(t)
    return module


def real_drops(method) -> None:
    """The method draws its prompt/image drops and reads them back (`.tolist()`) to pick the
    prompts; a fake tensor has no values, so the draw runs on real tensors: they are CPU tensors
    in training too."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    draw = method.draw_drops

    @functools.wraps(draw)
    def drops(n):
        with unset_fake_temporarily():
            return draw(n)

    method.draw_drops = drops


class Estimator:
    """One method variant's rig at `setup`'s resolution and precision, built once, stepped at any
    batch size. `fake=False` runs the identical procedure on real CPU tensors (the equality test's
    reference)."""

    def __init__(self, variant: str, setup: ProfileSetup, fake: bool = True):
        from contextlib import nullcontext

        from torch._subclasses.fake_tensor import FakeTensorMode

        self.variant, self.setup, self.fake, self.warm = variant, setup, fake, False
        # real constants (scheduler tables, token ids) become fake on first use
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        self.within = self.mode if fake else nullcontext()
        if fake:  # built on the meta device (no memory, no init time), then placed as fake CPU tensors
            with torch.device("meta"):
                self.rig = build_rig(variant, setup, "cpu", scaler=False,
                                     place=functools.partial(fakeify, mode=self.mode))
        else:
            self.rig = build_rig(variant, setup, "cpu", scaler=False)
        if fake:
            real_drops(self.rig.method)
        self.counts = parameter_counts(self.rig)

    def step(self, b: int) -> StepCount:
        batch = sample_batch(self.rig, self.setup, b)
        with self.within:
            if self.fake:
                batch = fake_batch(self.mode, batch)
            if not self.warm:
                warm_up(self.rig)
                self.warm = True
            return measure_step(self.rig, batch)

    def row(self, b: int) -> dict:
        t0 = time.perf_counter()
        step, s = self.step(b), self.setup
        return dict(variant=self.variant, method=self.rig.name, hparams=self.rig.hparams,
                    device="estimate-cpu-fake", batch=b, resolution=s.resolution, precision=s.precision,
                    checkpointing=s.checkpointing, attention=s.attention, **self.counts,
                    est_peak_mem_mb=step.peak_bytes / 2**20,
                    **{f"est_{c}_mb": step.split[c] / 2**20 for c in CATEGORIES},
                    flops_per_step=float(step.flops), estimate_s=time.perf_counter() - t0)


def estimate_variant(variant: str, setup: ProfileSetup, batches: list[int]) -> list[dict]:
    est = Estimator(variant, setup)
    return [est.row(b) for b in sorted(batches)]


def estimate(variants: list[str], setup: ProfileSetup, batches: list[int], progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    for v in tqdm(variants, desc="estimate", disable=not progress):
        rows += estimate_variant(v, setup, batches)
    return rows


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB', '24000MiB', '2.5e10' -> bytes; a one-line ConfigError otherwise."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--fit {text!r} is not a size; write it like 24GiB, 80GB or 16000MiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def fit(variant: str, setup: ProfileSetup, budget_bytes: int, limit: int = 4096) -> dict:
    """The largest batch whose estimated peak fits in `budget_bytes`, with its row (FLOPs per step);
    peak memory grows with the batch, so a doubling search then a bisection. `batch` is 0 when even
    batch 1 does not fit."""
    est, cache = Estimator(variant, setup), {}

    def row(b: int) -> dict:
        if b not in cache:
            cache[b] = est.row(b)
        return cache[b]

    def fits(b: int) -> bool:
        return row(b)["est_peak_mem_mb"] * 2**20 <= budget_bytes

    if not fits(1):
        return {**row(1), "fit_batch": 0, "fit_bytes": budget_bytes}
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {**row(lo), "fit_batch": lo, "fit_bytes": budget_bytes}


# ---- tables -------------------------------------------------------------------------------------

def _refs(rows: list[dict], key: tuple) -> dict[str, dict]:
    return {r["variant"]: r for r in rows if r["variant"] in ("finetune", "frozen") and _setting(r) == key}


def _setting(r: dict) -> tuple:
    return (r["resolution"], r["batch"], r["precision"], r["checkpointing"], r["attention"])


def format_estimate(rows: list[dict]) -> str:
    """Per setting and method: parameters, the peak split, FLOPs, and ratios against finetune and
    frozen at the same setting. FLOP ratios are the hardware-independent reading of step time."""
    lines = ["kind: estimate (fake tensors on the CPU; peak = live tensor storage, no workspace or allocator "
             "rounding). FLOP ratios are the hardware-independent reading of 'time'.",
             f"{'variant':14s} {'res':>4s} {'bs':>3s} {'prec':>9s} {'train M':>8s} {'peak GiB':>8s} {'weights':>7s} "
             f"{'grads':>7s} {'optim':>7s} {'activ':>7s} {'TFLOP':>7s} {'mem/ft':>6s} {'mem/fz':>6s} {'flop/ft':>7s} "
             f"{'flop/fz':>7s}"]
    for r in rows:
        refs = _refs(rows, _setting(r))
        ratio = lambda key, ref: (f"{r[key] / refs[ref][key]:.3f}" if ref in refs and refs[ref][key] else "-")  # noqa: E731
        prec = r["precision"] + ("+ck" if r["checkpointing"] else "")
        lines.append(f"{r['variant'][:14]:14s} {r['resolution']:4d} {r['batch']:3d} {prec:>9s} "
                     f"{r['params_trainable'] / 1e6:8.1f} {r['est_peak_mem_mb'] / 1024:8.2f} "
                     + " ".join(f"{r[f'est_{c}_mb'] / 1024:7.2f}" for c in CATEGORIES)
                     + f" {r['flops_per_step'] / 1e12:7.2f} {ratio('est_peak_mem_mb', 'finetune'):>6s} "
                     f"{ratio('est_peak_mem_mb', 'frozen'):>6s} {ratio('flops_per_step', 'finetune'):>7s} "
                     f"{ratio('flops_per_step', 'frozen'):>7s}")
    return "\n".join(lines)


def format_fit(rows: list[dict]) -> str:
    head = f"{'variant':14s} {'fits in':>8s} {'max batch':>9s} {'peak GiB':>8s} {'TFLOP/step':>10s} {'TFLOP/sample':>12s}"
    lines = [head]
    for r in rows:
        b = r["fit_batch"]
        lines.append(f"{r['variant'][:14]:14s} {r['fit_bytes'] / GIB:7.1f}G {b:9d} "
                     + (f"{r['est_peak_mem_mb'] / 1024:8.2f} {r['flops_per_step'] / 1e12:10.2f} "
                        f"{r['flops_per_step'] / 1e12 / b:12.3f}" if b else f"{'(batch 1 needs ' + format(r['est_peak_mem_mb'] / 1024, '.1f') + ' GiB)':>32s}"))
    return "\n".join(lines)
