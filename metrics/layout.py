"""Layout fidelity: box mAP of the objects re-detected in generated images against the layout,
and the re-detection filter ODGEN applies to generated training data."""
from __future__ import annotations

import torch
from bench.datasets.conditions import to_uint8
from bench.datasets.layouts import layout_image
from bench.datasets.shapes import SHAPES
from bench.metrics.base import BenchMetric
from torch import Tensor

from bench.api.types import Batch
from bench.core.registry import METRICS
from bench.proxy.analyzers import detect_objects


def redetect(images: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The classical detector on [B,3,H,W] images: per image (boxes [K,4] xyxy, scores [K], labels [K] SHAPES index)."""
    out = []
    for image in to_uint8(images):
        found = detect_objects(image)
        out.append((torch.tensor([d.box for d in found], dtype=torch.float32).reshape(-1, 4),
                    torch.tensor([d.score for d in found], dtype=torch.float32),
                    torch.tensor([SHAPES.index(d.shape) for d in found], dtype=torch.long)))
    return out


def filter_detected(images: Tensor, batch: Batch, iou: float = 0.5) -> Tensor:
    """bool [B]: True where the classical detector re-finds every conditioning box with its class at IoU >= iou."""
    from torchvision.ops import (
        box_iou,  # imported here: torchvision adds ~1.3 s to every `import bench.metrics`
    )

    keep = []
    for (det_boxes, _, det_labels), boxes, labels in zip(redetect(images), batch.refs["boxes"], batch.refs["labels"]):
        ok = box_iou(boxes.float().cpu(), det_boxes) >= iou
        ok &= labels.cpu()[:, None] == det_labels[None, :]
        keep.append(bool(ok.any(1).all()))
    return torch.tensor(keep, dtype=torch.bool)


def box_map_metric():
    """COCO box mAP@[.5:.95] (pycocotools backend); update takes torchmetrics' preds/targets dicts."""
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(iou_type="bbox", backend="pycocotools")


def map_value(metric) -> Tensor:
    """The mAP of a box_map_metric; NaN (not torchmetrics' -1) when there were no ground-truth boxes."""
    value = metric.compute()["map"].float()
    return torch.tensor(float("nan")) if value < 0 else value


def as_preds(detections: list[tuple[Tensor, Tensor, Tensor]]) -> list[dict[str, Tensor]]:
    return [dict(boxes=b, scores=s, labels=l) for b, s, l in detections]


def as_targets(boxes: list[Tensor], labels: list[Tensor]) -> list[dict[str, Tensor]]:
    return [dict(boxes=b.float().cpu(), labels=l.long().cpu()) for b, l in zip(boxes, labels)]


@METRICS.register("layout_map")
class LayoutMAP(BenchMetric):
    """mAP@[.5:.95] of classical-detector boxes (label = shape, score = shape-fit score) vs refs boxes/labels."""

    higher_is_better = True
    condition = "layout"
    evaluator_ids = ("detector-cv2-v1",)
    version = "layout_map-v1/detector-cv2-v1"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.coco = box_map_metric()  # a child Metric holds the states; reset() passes through

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        self.coco.update(as_preds(redetect(images)), as_targets(batch.refs["boxes"], batch.refs["labels"]))

    def reextract(self, images: Tensor, batch: Batch) -> Tensor:
        """The re-detected boxes drawn like the layout condition, most confident on top."""
        h, w = images.shape[-2:]
        drawn = []
        for boxes, scores, labels in redetect(images):
            order = scores.argsort()
            drawn.append(layout_image(boxes[order], labels[order], h, w))
        return torch.stack(drawn)

    def compute(self) -> Tensor:
        return map_value(self.coco)

    def reset(self) -> None:
        super().reset()
        self.coco.reset()
