"""Lightning callbacks the runner trains with: step timing, in-run convergence curves, the
exponential moving average of the trained weights that some recipes evaluate, and the resume
checkpoint with the training DataLoader whose place in its shuffled order survives a resume.

The data-order rule of a resumed run: it sees exactly the batches an uninterrupted run would.
The loader's order is a function of the run seed alone (DataLoader(shuffle=True) with a
generator seeded from it, as runs have always drawn it); on resume, `ResumableLoader` restores
the generator's state at the start of the interrupted epoch, draws that epoch's order again and
skips its batches already trained (no data is loaded for them), and `ResumeCheckpoint` restores
the global RNG states (noise, timesteps, prompt drops). So on one device a resumed run repeats the uninterrupted run's
computation. Under DDP, Lightning swaps in its DistributedSampler, whose order is a function of
(seed, epoch); the same skip applies.

Kept apart from bench.run.runner so that importing the runner (the CLI does, for `git_sha`, on
the report path too) never imports torch or Lightning.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from bench.core.files import atomic_path


class StepTimer(L.Callback):
    """Wall time of each optimisation step (CUDA-synchronised), from its first micro-batch's start to
    the batch end at which the step was taken (options.accumulate: several micro-batches each)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0: float | None = None
        self._step = -1

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self._t0 is None:
            self._sync()
            self._t0, self._step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:  # an optimiser step was taken
            self._sync()
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None


class ConsistencyCurve(L.Callback):
    """Consistency metrics at fixed training steps on one fixed eval subset, so every method's
    curve has the same x positions and the same samples."""

    def __init__(self, steps: Iterable[int], measure: Callable[[L.LightningModule, int], None], points: list[dict]):
        self.steps, self.measure, self.points = set(steps), measure, points  # `measure` appends to `points`
        self.done: set[int] = set()

    def state_dict(self) -> dict:  # in the resume checkpoint: the points already measured are kept
        return {"done": sorted(self.done), "points": list(self.points)}

    def load_state_dict(self, state: dict) -> None:
        self.done = set(state["done"])
        self.points[:] = state["points"]

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


class EMAWeights(L.Callback):
    """An exponential moving average of the method's trainable weights from `start_step` on
    (diffusers' EMAModel with its default warm-up, decay (1 + s) / (10 + s) capped at `decay`, as
    the official scripts that use EMA run it); when training ends the averaged weights replace
    the trained ones, so evaluation scores them. Curve points measured mid-training see the raw
    weights."""

    def __init__(self, decay: float, start_step: int = 0):
        self.decay, self.start_step = decay, start_step
        self.ema = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step <= self.start_step or trainer.global_step == getattr(self, "_step", None):
            return  # before the start, or a micro-batch that took no optimiser step (options.accumulate)
        self._step = trainer.global_step
        params = module.trainable_parameters()
        if self.ema is None:  # starts from the weights at start_step, as ControlNet++'s starts from its ControlNet
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=self.decay)
        self.ema.step(params)

    def on_train_end(self, trainer, module):
        if self.ema is not None:
            self.ema.copy_to(module.trainable_parameters())

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state["ema"]

    def on_train_start(self, trainer, module):
        saved, self._saved = getattr(self, "_saved", None), None
        if saved is not None:  # resumed: the average so far, over this module's parameters
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(module.trainable_parameters(), decay=self.decay)
            self.ema.load_state_dict(saved)
            self.ema.to(module.device)  # the checkpoint's tensors load on the CPU


class SkippingBatches(BatchSampler):
    """BatchSampler that leaves out the first `skip` batches of its next pass (their indices are
    drawn, their data never loaded)."""

    skip = 0

    def __iter__(self):
        batches, (skip, self.skip) = super().__iter__(), (self.skip, 0)
        for _ in range(skip):
            next(batches, None)
        yield from batches


class ResumableLoader(DataLoader):
    """The training DataLoader: shuffled batches from a seeded generator, the last partial batch
    dropped; Lightning saves its state in a checkpoint and restores it before iterating (its
    `state_dict` protocol), so a resumed run continues the uninterrupted order (module docstring).
    One optimizer step takes one batch.

    The state is the generator's state where the current pass over the data began, and how many of
    its batches were trained: restored, the next pass draws its order exactly as the interrupted
    pass did and skips those batches. A pass already finished is restored as the generator's state
    now, which the next pass starts from. (Replaying past passes instead would have to know whether
    the caller ran the sampler to exhaustion, which draws once more: Lightning stops at the length.)"""

    position = 0  # optimizer steps taken; ResumeCheckpoint sets it before each save
    passes = 0  # passes begun over the data (epochs)
    _pass_start: torch.Tensor | None = None  # the generator's state when the current pass began

    @classmethod
    def shuffled(cls, dataset, batch_size: int, seed: int, collate_fn, **options) -> "ResumableLoader":
        # the draws of DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=g); `options`
        # (worker processes) change where batches are decoded, not which: the order is drawn here
        g = torch.Generator().manual_seed(seed)
        batches = SkippingBatches(RandomSampler(dataset, generator=g), batch_size, drop_last=True)
        return cls(dataset, batch_sampler=batches, collate_fn=collate_fn, generator=g, **options)

    def __iter__(self):
        self._pass_start = self.generator.get_state()
        self.passes += 1
        return super().__iter__()

    def state_dict(self) -> dict:
        trained = self.position - (self.passes - 1) * len(self)  # batches of the current pass trained on
        if trained >= len(self):
            return {"step": self.position, "passes": self.passes, "generator": self.generator.get_state(), "skip": 0}
        return {"step": self.position, "passes": self.passes - 1, "generator": self._pass_start, "skip": trained}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.passes, self.position = int(state["passes"]), int(state["step"])
        self.batch_sampler.skip = int(state["skip"])


def rng_states() -> dict:
    """The global RNG states training draws from (torch CPU and CUDA, numpy, random), as tensors
    and plain values so the checkpoint loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "random": random.getstate()}


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))


class ResumeCheckpoint(L.Callback):
    """Every `every` optimizer steps (0: never), a Lightning checkpoint at `path`, written
    atomically, that a re-run of the same run resumes from (`trainer.fit(ckpt_path=...)`): the
    trainable weights, optimizer and scheduler, loop progress, the other callbacks' states (curve
    points, EMA), the loader's position and the global RNG states. The frozen base model is left
    out (the run rebuilds it from its spec). Place it after the callbacks whose state it saves.
    `resumed_from` is the step a resumed run started at (0: from scratch)."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = Path(path), every
        self.resumed_from = 0
        self._rng: dict | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every or step % self.every or step >= trainer.max_steps or step == getattr(self, "_saved", None):
            return  # (the last: the next micro-batches of an accumulated step, once it is saved)
        self._saved = step
        if isinstance(trainer.train_dataloader, ResumableLoader):  # in batches: micro-batches per step
            trainer.train_dataloader.position = step * trainer.accumulate_grad_batches
        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                trainer.save_checkpoint(tmp)
        else:
            trainer.save_checkpoint(self.path)  # collective: only rank 0 writes

    def state_dict(self) -> dict:
        return {"rng": rng_states()}

    def load_state_dict(self, state: dict) -> None:
        self._rng = state["rng"]

    def on_save_checkpoint(self, trainer, module, checkpoint):
        frozen = _frozen_base_keys(module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, trainer, module, checkpoint):
        missing = sorted(set(module.state_dict()) - _frozen_base_keys(module) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"resume checkpoint {self.path} lacks {len(missing)} trained tensors (first: {missing[0]}); "
                             "delete it to train from step 0")
        self.resumed_from = int(checkpoint["global_step"])

    def on_train_start(self, trainer, module):
        if self._rng is not None:  # last, just before the first resumed step draws
            set_rng_states(self._rng)
            self._rng = None


def _frozen_base_keys(module) -> set[str]:
    """State-dict keys of the frozen base model (not trained, so rebuilt identically by the run)."""
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k for k in module.state_dict() if k.startswith("base.") and k not in trained}
