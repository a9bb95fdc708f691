"""Base class of every benchmark metric: one `update(images, batch)` signature for all."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from types import MappingProxyType

import torchmetrics
from torch import Tensor

from bench.types import Batch


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
    full_state_update = False  # states only accumulate, so per-batch forward() is cheap
    is_differentiable = False

    @abstractmethod
    def update(self, images: Tensor, batch: Batch) -> None:
        """images: generated, float [B,3,H,W] in [0,1], one per sample of `batch`."""

    @abstractmethod
    def compute(self) -> Tensor:
        """A 0-d float tensor."""

    def _check(self, images: Tensor, batch: Batch) -> None:
        # Fail loudly on misaligned inputs: a silent broadcast would give a plausible wrong number.
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B,3,H,W], got {tuple(images.shape)}")
        if images.shape[0] != len(batch):
            raise ValueError(f"{self.name}: {images.shape[0]} images for a batch of {len(batch)}")
