"""Condition consistency (ControlNet++ protocol): re-extract the condition from generated
images and compare it with the input condition."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bench.datasets.conditions import Canny
from bench.metrics.analyzers import (NUM_CLASSES, SEGNET_VERSION, config_hash, confusion_matrix, load_segnet,
                                     miou_from_confusion)
from bench.metrics.base import BenchMetric
from bench.registry import CONDITIONS, METRICS
from bench.types import Batch


@METRICS.register("canny_f1")
class CannyF1(BenchMetric):
    """Binary F1 of edges re-extracted with the input's own extractor, pooled over all pixels.

    Pooled (micro) F1 like torchmetrics BinaryF1Score; 0 when neither side has an edge.
    """

    name = "canny_f1"
    higher_is_better = True
    condition = "canny"
    version = f"canny_f1-v1/{CONDITIONS.get('canny').version}"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extractor: Canny = CONDITIONS.get("canny")  # the SAME extractor that built the input
        for state in ("tp", "fp", "fn"):
            self.add_state(state, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        if "canny" not in batch.conditions:
            raise KeyError(f"canny_f1 needs batch.conditions['canny']; the batch has {sorted(batch.conditions)}")
        pred = self.extractor.edges(images).to(self.tp.device)
        target = batch.conditions["canny"][:, 0].to(self.tp.device) > 0.5
        if pred.shape != target.shape:
            raise ValueError(f"canny_f1: edges {tuple(pred.shape)} vs condition {tuple(target.shape)}")
        self.tp += (pred & target).sum()
        self.fp += (pred & ~target).sum()
        self.fn += (~pred & target).sum()

    def compute(self) -> Tensor:
        denom = (2 * self.tp + self.fp + self.fn).double()
        return (2 * self.tp / denom).float() if denom > 0 else torch.tensor(0.0)


@METRICS.register("seg_miou")
class SegMIoU(BenchMetric):
    """mIoU of the proxy segmenter's labels on generated images vs the ground-truth labels.

    `segmenter` (for tests or other evaluators) maps images to labels [B,H,W] or logits
    [B,C,H,W]; the default is the shipped segnet, which is an evaluator only: no method may
    use it as a reward model.
    """

    name = "seg_miou"
    higher_is_better = True
    condition = "seg"
    version = f"seg_miou-v1/{SEGNET_VERSION}-{config_hash()}"

    def __init__(self, segmenter: Callable[[Tensor], Tensor] | None = None, num_classes: int = NUM_CLASSES,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        # A submodule moves with metric.to(device); an injected callable is used as given.
        self.segnet = load_segnet() if segmenter is None else None
        self.segmenter = segmenter if segmenter is not None else self.segnet.segment
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        target = batch.refs.get("semantic")
        if target is None:
            raise KeyError("seg_miou needs batch.refs['semantic'] (ground-truth labels [B,H,W])")
        with torch.no_grad():
            pred = self.segmenter(images)
        pred = pred.argmax(1) if pred.ndim == 4 else pred
        if pred.shape != target.shape:
            raise ValueError(f"seg_miou: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        self.confmat += confusion_matrix(pred.to(self.confmat.device), target.to(self.confmat.device), self.num_classes)

    def compute(self) -> Tensor:
        return miou_from_confusion(self.confmat)
