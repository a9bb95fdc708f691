"""`bench profile --estimate`: training memory and FLOPs per step at true scale, without a GPU.

Each method's rig is built exactly as `bench profile` builds it (`bench.profile.measure.build_rig`): for a
full-scale architecture on the meta device, then placed as fake tensors (`FakeTensorMode`: shape,
dtype and storage size, no data), so SD1.5 or SDXL costs no real memory and parameter counts are
exact. The step that runs is `bench.profile.measure.train_step`, the one the timing loop runs (the
method's own `training_loss`, backward, AdamW step), not a copy. Two things are counted during it:

- peak live storage bytes (`StorageTracker`, a TorchDispatchMode): every op output's storage is
  registered once (views share it) and forgotten when the storage dies, which is what
  `torch.cuda.max_memory_allocated` counts. The peak is split by what the bytes are: weights
  (parameters and buffers), gradients, optimizer (AdamW's state, plus the temporaries of its
  step), activations (everything else: saved activations, temporaries, the batch).
- FLOPs (`torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions and attention,
  forward and backward, including the no-grad VAE and text encoders of the step).

The step is measured at steady state: AdamW's state exists (made by its own first step) and so do
the previous step's gradients, alive into the forward because the loop, like Lightning's, zeroes
them after the loss (diffusers' training scripts zero them after the optimizer step: where the
peak is at the end of the forward, theirs is lower by the gradients).

The fake step runs on the CPU device. In torch 2.14 fake CUDA tensors run a forward without a GPU,
but their backward fails on the CUDA primary context. What the CPU device changes:
- the attention kernel: "efficient" selects the CPU's fused kernel (flash attention for the CPU),
  whose saved state (output + logsumexp) is the size of CUDA's memory-efficient kernel's; "math"
  materialises the attention matrix on both; "default" is PyTorch's CPU choice, which may differ
  from its CUDA choice;
- workspaces: cuDNN/cuBLAS workspaces, which CUDA allocates through the caching allocator, are
  not counted, nor is the allocator's rounding of blocks (512 B): a GPU's max_memory_allocated
  sits above the estimate by those (fragmentation shows in max_memory_reserved only);
- outputs are the meta kernels': group norm's returns mean/rstd in bf16 under autocast where the
  real kernels keep fp32 (bytes per call), and the CPU's keeps a channels-last input channels-last
  (so diffusers copies it with `.contiguous()`); tests/test_estimate.py bounds both;
- fp16 loss scaling: GradScaler reads found-inf back with `.item()`, which fake tensors cannot;
  fp16 runs without the scaler (its unscale is in place, its state one element).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import time
import weakref
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from bench.core.errors import ConfigError
from bench.core.store import ESTIMATE_CATEGORIES
from bench.profile.measure import (
    ProfileSetup,
    build_rig,
    convert_input,
    parameter_counts,
    train_step,
)

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
        self.totals = dict.fromkeys(ESTIMATE_CATEGORIES, 0)
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


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode counting totals only, and the CPU's fused attention too.

    - Its registry has the CUDA attention kernels but not the CPU's flash kernel, which the fake
      step runs: without these two entries attention would count 0 FLOPs. Same formulas
      (torch.utils.flop_counter's sdpa counts), so CPU and CUDA kernels count alike.
    - Its per-module breakdown (hooks on every module's forward and backward) doubled the time of
      a fake SD1.5 step, and only the total is used."""
    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward})
    if hasattr(counter, "mod_tracker"):  # the attribute its _count_flops reads parents from
        counter.mod_tracker = _Global()
    return counter


@dataclasses.dataclass
class StepCount:
    peak_bytes: int
    split: dict[str, int]  # ESTIMATE_CATEGORIES -> bytes at the peak
    flops: int
    start: dict[str, int]  # ESTIMATE_CATEGORIES -> bytes live when the step starts (weights, state, batch)


def measure_step(rig, batch) -> StepCount:
    """One `train_step` of `rig` on `batch`, counting the peak of live storages and the FLOPs;
    real or fake tensors alike."""
    tracker = StorageTracker()
    tracker.add_all(live_state(rig, batch))
    start = dict(tracker.totals)
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
    return StepCount(tracker.peak, tracker.at_peak, flops.get_total_flops(), start)


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


class MetaStays(TorchFunctionMode):
    """While a method is built on the meta device, a meta tensor moved to a real device stays on
    meta (a dtype change still applies): the shipped proxy encoders (IP-Adapter, InstantID,
    PhotoMaker) load their weights and call `.to("cpu")`, which meta tensors, having no data,
    refuse. `fakeify` then places everything."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            _, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            return args[0] if dtype is None else func(args[0], dtype)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _on_meta():
    import warnings

    with torch.device("meta"), MetaStays(), warnings.catch_warnings():
        # loading the proxy encoders' weights into meta parameters copies nothing, as intended
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        yield


def warm_up(rig) -> None:
    """Steady state before the measured step: AdamW's state made by its own first step, and a
    gradient on every trainable parameter (alive into the next forward, as the loop zeroes them
    after the loss). A whole warm-up step would make the same tensors and cost a fake step more."""
    for p in rig.method.trainable_parameters():
        p.grad = torch.zeros_like(p)
    rig.optimizer.step()


@functools.lru_cache(maxsize=8)
def _one_sample(dataset: str, resolution: int, condition: str):
    from bench.core.registry import DATASETS

    return DATASETS.get(dataset)("train", 1, resolution, (condition,))[0]


def sample_batch(rig, setup: ProfileSetup, b: int):
    """A batch of `b` with the shapes `bench.profile.measure.sample_batches` draws: the estimate reads
    shapes, not values, so one rendered sample (rendering at 512 px takes seconds) is repeated."""
    from bench.api.types import collate

    return convert_input(collate([_one_sample(type(rig.method).sample_dataset, setup.resolution, rig.condition)] * b),
                         setup.precision)


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
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.variant, self.setup, self.fake, self.warm = variant, setup, fake, False
        # real constants (scheduler tables, token ids) become fake on first use
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        self.within = self.mode if fake else contextlib.nullcontext()
        if fake:
            from bench.core.bases import ARCHS

            # a full-scale architecture is built on the meta device (no memory, no init time); a base
            # directory's weights are read (from_pretrained refuses the meta device) and then dropped.
            # Either way fakeify places it as fake CPU tensors.
            build = (lambda: contextlib.ExitStack()) if setup.base_model not in ARCHS else _on_meta
            with build():
                self.rig = build_rig(variant, setup, "cpu", scaler=False,
                                     place=functools.partial(fakeify, mode=self.mode))
            real_drops(self.rig.method)
        else:
            self.rig = build_rig(variant, setup, "cpu", scaler=False)
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
                    device="cpu-fake" if self.fake else "cpu-real", batch=b, resolution=s.resolution, precision=s.precision,
                    checkpointing=s.checkpointing, attention=s.attention, **self.counts,
                    est_peak_mem_mb=step.peak_bytes / 2**20,
                    **{f"est_{c}_mb": step.split[c] / 2**20 for c in ESTIMATE_CATEGORIES},
                    flops_per_step=float(step.flops), estimate_s=time.perf_counter() - t0)


def estimate_variant(variant: str, setup: ProfileSetup, batches: list[int]) -> list[dict]:
    est = Estimator(variant, setup)
    return [est.row(b) for b in sorted(batches)]


# What a fake tensor cannot do: read a value (a method that branches or indexes on data), make an
# output whose shape depends on values, or run an op with no fake kernel.
def _fake_limits() -> tuple[type, ...]:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    return DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException


def _guarded(variant: str, run) -> list[dict]:
    """`run()`'s rows, or one row saying why the variant cannot be estimated (the others go on)."""
    try:
        return run()
    except _fake_limits() as e:
        why = (f"reads tensor values during its step ({e}); fake tensors have none: time it for real with "
               "`bench profile` (no --estimate)")
    except ValueError as e:
        if "empty parameter list" not in str(e):
            raise
        why = "has no trainable parameters: there is no training step to estimate"
    return [dict(variant=variant, error=why)]


def estimate(variants: list[str], setup: ProfileSetup, batches: list[int], progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    from bench.run.execute import quiet_libraries

    quiet_libraries()
    rows = []
    for v in tqdm(variants, desc="estimate", disable=not progress):
        rows += _guarded(v, lambda: estimate_variant(v, setup, batches))
    return rows


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB', '24000MiB', '2.5e10' -> bytes; a one-line ConfigError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--fit {text!r} is not a size; write it like 24GiB, 80GB or 16000MiB")
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "TIB": 2**40}[(m.group(2) or "B").upper()]
    return int(float(m.group(1)) * scale)
