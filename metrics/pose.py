"""Pose consistency: keypoints re-detected on generated images vs the condition's keypoints.

Targets are `batch.refs["keypoints"]` ([17,3] per sample, COCO-17) when the dataset has
annotations; otherwise the same backend that drew the `pose` condition re-detects them on the
real image, which is exactly what the skeleton was drawn from. Samples whose target has no
visible keypoint are skipped and counted in `skipped`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch
from bench.datasets.pose import detect, oks, pck
from bench.metrics.base import BenchMetric
from torch import Tensor

from bench.api.types import Batch
from bench.core.registry import CONDITIONS, METRICS


class _PoseScore(BenchMetric):
    higher_is_better = True
    condition = "pose"
    weights = CONDITIONS.get("pose").weights

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backend = CONDITIONS.get("pose").backend
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, pred: np.ndarray, gt: np.ndarray) -> float:
        raise NotImplementedError

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        pred = detect(self.backend, images)
        refs = batch.refs.get("keypoints")
        if refs is not None:
            gt = np.stack([np.asarray(k, np.float32) for k in refs])
        else:
            gt = detect(self.backend, batch.image)
        for p, g in zip(pred, gt):
            s = self.score(p, g)
            if np.isnan(s):
                self.skipped += 1
            else:
                self.total += s
                self.count += 1

    def reextract(self, images: Tensor, batch: Batch) -> Tensor:
        """The skeleton of the keypoints re-detected by the backend that drew the condition."""
        return CONDITIONS.get("pose")(images)

    def compute(self) -> Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


def _register(name: str, tag: str, score: Callable[[np.ndarray, np.ndarray], float], doc: str) -> None:
    pose = CONDITIONS.get("pose")
    METRICS.register(name)(type(f"Pose_{name}", (_PoseScore,), dict(
        version=f"{tag}-v1/{pose.version}", evaluator_ids=(pose.version,), score=staticmethod(score),
        __doc__=doc)))


_register("pose_oks", "pose_oks", oks, "Mean COCO OKS (COCO-17 sigmas, scale = area of the target keypoints' box).")
_register("pose_pck", "pose_pck0.1", partial(pck, alpha=0.1),
          "Mean PCK@0.1 (threshold 0.1 x the longer side of the target keypoints' box).")
