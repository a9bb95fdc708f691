"""Soft-edge consistency (ControlNet++ protocol): SSIM between the input soft-edge map and the
map the same extractor re-extracts from the generated image.

Plain single-scale SSIM (torchmetrics structural_similarity_index_measure, gaussian 11x11,
sigma 1.5, data_range 1), mean over images, on the first channel; not MS-SSIM: torchmetrics'
MS-SSIM needs images of 176+ px (`MS_SSIM_MIN_SIZE`); `softedge_ms_ssim` in metrics/protocol.py is
the ControlNet++ protocol where it is defined. One metric per soft-edge condition: `softedge_ssim` scores `hed` (the
ControlNet++ soft-edge task), `pidinet_ssim` and `lineart_ssim` the other two.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from bench.metrics.base import BenchMetric
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from bench.api.types import Batch
from bench.core.registry import CONDITIONS, METRICS


class SoftEdgeSSIM(BenchMetric):
    condition = "hed"
    higher_is_better = True

    def __init__(self, extractor: Callable[[Tensor], Tensor] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        # The SAME extractor that built the input; `extractor` is for tests or other evaluators.
        self.extractor = CONDITIONS.get(self.condition) if extractor is None else extractor
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def maps(self, images: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(re-extracted map, input map), first channel, float in [0, 1]."""
        with torch.no_grad():
            pred = self.extractor(images)[:, :1]
        return pred.float(), batch.conditions[self.condition][:, :1].float().to(pred.device)

    def score(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-image similarity [B]."""
        return ssim(pred, target, data_range=1.0, reduction="none")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        if self.condition not in batch.conditions:
            raise KeyError(f"{self.name} needs batch.conditions[{self.condition!r}]; the batch has "
                           f"{sorted(batch.conditions)}")
        per_image = self.score(*self.maps(images, batch))
        self.record_samples(batch.ids, per_image)
        self.total += per_image.double().sum().to(self.total.device)
        self.count += per_image.numel()

    def reextract(self, images: Tensor, batch: Batch) -> Tensor:
        with torch.no_grad():
            return self.extractor(images)

    def compute(self) -> Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


def _register(name: str, condition: str) -> None:
    extractor = CONDITIONS.get(condition)
    cls = type(f"SSIM_{condition}", (SoftEdgeSSIM,), dict(
        condition=condition, weights=extractor.weights, evaluator_ids=(extractor.version,),
        version=f"{name}-ssim-g11-v1/{extractor.version}", __doc__=f"SSIM (not MS-SSIM) of {condition} maps."))
    METRICS.register(name)(cls)


for _name, _condition in (("softedge_ssim", "hed"), ("pidinet_ssim", "pidinet"), ("lineart_ssim", "lineart")):
    _register(_name, _condition)
