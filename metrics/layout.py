"""Layout fidelity: box mAP of the objects re-detected in generated images against the layout."""
from __future__ import annotations

import torch
from torch import Tensor

from bench.datasets.layouts import redetect
from bench.metrics.base import BenchMetric
from bench.registry import METRICS
from bench.types import Batch


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

    name = "layout_map"
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

    def compute(self) -> Tensor:
        return map_value(self.coco)

    def reset(self) -> None:
        super().reset()
        self.coco.reset()
