"""Fréchet distance in the proxy segmenter's feature space, for when no Inception weights
exist. It is not FID and is never reported as such: the name carries the extractor."""
from __future__ import annotations

from typing import Callable

import torch
from bench.metrics.base import BenchMetric
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from bench.api.types import Batch
from bench.core.registry import METRICS
from bench.proxy.analyzers import SEGNET, SEGNET_VERSION, config_hash, load_segnet


def _sqrt_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64.

    tr sqrtm(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): that matrix is symmetric PSD, so
    eigh is stable where a general sqrtm of the non-symmetric S1 S2 can go complex.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return fd.clamp_min(0)  # it is a squared distance; rounding can push equal sets to -1e-9


def _stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.T)


@METRICS.register("fd_segnet")
class FDSegnet(BenchMetric):
    """Fréchet distance between segnet features of generated images and the batch's real images.

    `extractor` maps images [B,3,H,W] to features [B,D]; the default is the shipped segnet's
    pooled bottleneck.
    """

    higher_is_better = False
    condition = None
    version = f"fd_segnet-v1/{SEGNET_VERSION}-{config_hash()}"
    evaluator_ids = (SEGNET.model_id,)

    def __init__(self, extractor: Callable[[Tensor], Tensor] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.segnet = load_segnet() if extractor is None else None  # submodule: follows .to(device)
        self.extractor = extractor if extractor is not None else self.segnet.features
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")
        self.add_state("real_features", default=[], dist_reduce_fx="cat")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        with torch.no_grad():
            self.fake_features.append(self.extractor(images).flatten(1).double())
            self.real_features.append(self.extractor(batch.image).flatten(1).double())

    def compute(self) -> Tensor:
        fake, real = dim_zero_cat(self.fake_features), dim_zero_cat(self.real_features)
        if len(fake) < 2 or len(real) < 2:
            raise ValueError(f"fd_segnet needs at least 2 samples per side, got {len(fake)} and {len(real)}")
        return frechet_distance(*_stats(fake), *_stats(real)).float()
