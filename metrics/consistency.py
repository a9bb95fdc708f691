"""Condition consistency (ControlNet++ protocol): re-extract the condition from generated
images and compare it with the input condition."""
from __future__ import annotations

from typing import Callable

import torch
from bench.datasets.conditions import Canny, seg_to_image
from bench.metrics.base import BenchMetric
from torch import Tensor

from bench.api.types import Batch
from bench.core.registry import CONDITIONS, METRICS
from bench.proxy.analyzers import (
    DEPTHNET,
    NUM_CLASSES,
    SEGNET,
    SEGNET_VERSION,
    canny_model_id,
    config_hash,
    confusion_matrix,
    load_depthnet,
    load_segnet,
    miou_from_confusion,
)


@METRICS.register("canny_f1")
class CannyF1(BenchMetric):
    """Binary F1 of edges re-extracted with the input's own extractor, pooled over all pixels.

    Pooled (micro) F1 like torchmetrics BinaryF1Score; 0 when neither side has an edge.
    """

    higher_is_better = True
    condition = "canny"
    version = f"canny_f1-v1/{CONDITIONS.get('canny').version}"
    evaluator_ids = (canny_model_id(CONDITIONS.get("canny")),)

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

    def reextract(self, images: Tensor, batch: Batch) -> Tensor:
        return self.extractor(images)

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

    higher_is_better = True
    condition = "seg"
    version = f"seg_miou-v1/{SEGNET_VERSION}-{config_hash()}"
    evaluator_ids = (SEGNET.model_id,)

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
        pred = self._labels(images)
        if pred.shape != target.shape:
            raise ValueError(f"seg_miou: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        self.confmat += confusion_matrix(pred.to(self.confmat.device), target.to(self.confmat.device), self.num_classes)

    def _labels(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            pred = self.segmenter(images)
        return pred.argmax(1) if pred.ndim == 4 else pred

    def reextract(self, images: Tensor, batch: Batch) -> Tensor:
        """The evaluator's labels in the seg condition's palette."""
        return torch.stack([seg_to_image(labels.cpu().numpy()) for labels in self._labels(images)])

    def compute(self) -> Tensor:
        return miou_from_confusion(self.confmat)


@METRICS.register("depth_rmse")
class DepthRMSE(BenchMetric):
    """RMSE (0-255) between depthnet's depth of generated images and the input depth condition,
    pooled over every pixel of every image.

    `estimator` (for tests or other evaluators) maps images to depth [B,H,W] or [B,1,H,W] on
    the 0-255 scale; the default is the shipped depthnet, an evaluator only. Its RMSE on real
    images is not 0: the order of objects that do not overlap cannot be seen (see its metadata).
    """

    higher_is_better = False
    condition = "depth"
    version = f"depth_rmse-v1/{DEPTHNET.version}-{DEPTHNET.config_hash()}"
    evaluator_ids = (DEPTHNET.model_id,)

    def __init__(self, estimator: Callable[[Tensor], Tensor] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.depthnet = load_depthnet() if estimator is None else None  # submodule: follows .to(device)
        self.estimator = estimator if estimator is not None else self.depthnet.depth
        self.add_state("sse", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        if "depth" not in batch.conditions:
            raise KeyError(f"depth_rmse needs batch.conditions['depth']; the batch has {sorted(batch.conditions)}")
        pred = self._depth(images)
        target = batch.conditions["depth"][:, 0] * 255
        if pred.shape != target.shape:
            raise ValueError(f"depth_rmse: depth {tuple(pred.shape)} vs condition {tuple(target.shape)}")
        self.sse += (pred.double().to(self.sse.device) - target.double().to(self.sse.device)).square().sum()
        self.count += target.numel()

    def _depth(self, images: Tensor) -> Tensor:
        """[B,H,W] on the 0-255 scale."""
        with torch.no_grad():
            pred = self.estimator(images)
        return pred[:, 0] if pred.ndim == 4 else pred

    def reextract(self, images: Tensor, batch: Batch) -> Tensor:
        """The estimated depth drawn like the depth condition (grey, 0-255 -> [0,1])."""
        return self._depth(images).float().div(255).clamp(0, 1)[:, None].expand(-1, 3, -1, -1).cpu()

    def compute(self) -> Tensor:
        return (self.sse / self.count).sqrt().float() if self.count > 0 else torch.tensor(float("nan"))
