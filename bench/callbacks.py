"""Lightning callbacks the runner trains with: step timing, in-run convergence curves, and the
exponential moving average of the trained weights that some recipes evaluate.

Kept apart from bench.runner so that importing the runner (the CLI does, for `git_sha`, on
the report path too) never imports torch or Lightning.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import lightning as L
import torch


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

    def __init__(self, steps: Iterable[int], measure: Callable[[L.LightningModule, int], None]):
        self.steps, self.measure = set(steps), measure
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
        if trainer.global_step <= self.start_step:
            return
        params = module.trainable_parameters()
        if self.ema is None:  # starts from the weights at start_step, as ControlNet++'s starts from its ControlNet
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=self.decay)
        self.ema.step(params)

    def on_train_end(self, trainer, module):
        if self.ema is not None:
            self.ema.copy_to(module.trainable_parameters())
