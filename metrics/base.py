"""Base class of every benchmark metric: one `update(images, batch)` signature for all.

The protocol the runner relies on, declared here and nowhere else:

- ``update(images, batch)`` / ``compute()``: torchmetrics' accumulate-then-reduce, fed the
  generated images and the Batch they were generated for.
- ``synthesizes`` / ``synthesize(generate_fn, train_set, seed)``: metrics that score data this
  method generates for them (e.g. ODGEN's downstream detector utility), not only the eval set.
- ``on_curve(condition)``: whether the runner may measure the metric at convergence-curve steps.
- ``reextract(images, batch)``: the condition the metric reads back out of generated images, as a
  picture, so the runner can save it beside the input condition for the report's sample grid.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

import torchmetrics
from torch import Tensor

from bench.types import Batch

GenerateFn = Callable[[Batch], Tensor]  # Batch -> generated images [B,3,H,W] in [0,1]


class BenchMetric(torchmetrics.Metric):
    """A torchmetrics Metric fed generated images plus the Batch they were generated for.

    Subclasses set `name`, `version` (recorded with every result so numbers from different
    evaluators are never compared), `higher_is_better` and `condition` (the condition kind
    the metric needs in `batch.conditions`, or None), and register with METRICS.
    """

    name: str
    version: str
    higher_is_better: bool
    condition: str | None = None
    part_higher_is_better: Mapping[str, bool] = MappingProxyType({})  # parts of a dict result that differ
    evaluator_ids: tuple[str, ...] = ()  # identities of the models that score; a method may not train against them
    synthesizes: ClassVar[bool] = False  # True: compute() needs synthesize() after the eval loop
    full_state_update = False  # states only accumulate, so per-batch forward() is cheap
    is_differentiable = False

    @abstractmethod
    def update(self, images: Tensor, batch: Batch) -> None:
        """images: generated, float [B,3,H,W] in [0,1], one per sample of `batch`."""

    @abstractmethod
    def compute(self) -> Tensor | dict[str, Tensor]:
        """A 0-d float tensor, or a dict of named 0-d parts (recorded as ``<name>_<part>``)."""

    def synthesize(self, generate_fn: GenerateFn, train_set: Sequence[Batch], seed: int) -> Tensor | dict[str, Tensor]:
        """Score data generated for this metric; only for metrics with ``synthesizes = True``.

        Contract: the runner calls it exactly once per run, after every eval batch went through
        `update`, with
        - ``generate_fn``: the run's own generation call (the shared sampler with this run's
          method, budget and seed; per-sample noise from (seed, sample id)), Batch -> images;
        - ``train_set``: the run's train split, indexable single-sample Batches (never the eval
          samples: those are what the metric must not be fitted to);
        - ``seed``: the run's seed, for any training the metric does.
        It stores its result, which `compute()` then returns (and which it also returns).
        """
        raise NotImplementedError(f"{self.name} does not synthesize (synthesizes = {self.synthesizes})")

    @classmethod
    def on_curve(cls, condition: str | None) -> bool:
        """Whether the runner may measure this metric at a budget's curve steps, for a run on
        `condition`: a consistency metric of that condition, scored from eval batches alone."""
        return condition is not None and cls.condition == condition and not cls.synthesizes

    def reextract(self, images: Tensor, batch: Batch) -> Tensor | None:
        """The condition this metric re-extracts from generated `images`, drawn like the input
        condition (float [B,3,H,W] in [0,1]), or None for metrics that re-extract nothing.

        The runner saves it beside the generated and input images for the report's sample
        grid; it must not touch the metric's states."""
        return None

    def _check(self, images: Tensor, batch: Batch) -> None:
        # Fail loudly on misaligned inputs: a silent broadcast would give a plausible wrong number.
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B,3,H,W], got {tuple(images.shape)}")
        if images.shape[0] != len(batch):
            raise ValueError(f"{self.name}: {images.shape[0]} images for a batch of {len(batch)}")
