"""Layouts (boxes + class labels): the `layout` condition and box statistics for pseudo-layouts.

Re-detecting boxes in generated images (layout mAP, ODGEN's filter) lives with the metrics:
bench/metrics/layout.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from bench.datasets.conditions import SEG_PALETTE
from bench.datasets.shapes import COLORS, SHAPES, ShapeObject, parse_prompt, prompt_for
from torch import Tensor

from bench.api.types import Batch
from bench.core.registry import CONDITIONS


def box_slices(box, height: int, width: int) -> tuple[slice, slice]:
    """(rows, cols) of the pixels whose centres lie inside an xyxy box, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cols = slice(min(max(math.ceil(x0 - 0.5), 0), width), min(max(math.ceil(x1 - 0.5), 0), width))
    rows = slice(min(max(math.ceil(y0 - 0.5), 0), height), min(max(math.ceil(y1 - 0.5), 0), height))
    return rows, cols


def layout_image(boxes, labels, height: int, width: int) -> Tensor:
    """Filled class-coloured boxes in z-order (later on top) on black, [3,H,W] in [0,1]."""
    canvas = torch.zeros(3, height, width)
    palette = torch.from_numpy(SEG_PALETTE).float() / 255
    for box, label in zip(boxes, labels):
        rows, cols = box_slices(box, height, width)
        canvas[:, rows, cols] = palette[1 + int(label)][:, None, None]
    return canvas


@dataclass(frozen=True)
class LayoutFromAnnotations:
    """Layouts come from the world's boxes; generated images are re-detected by `layout_map`."""

    version: str = "layout-boxes-palette-v1"

    def __call__(self, images: Tensor) -> Tensor:
        raise TypeError("layout conditions come from dataset annotations; use the layout_map metric to re-detect boxes")

    def from_scene(self, scene) -> Tensor:
        return layout_image(scene.boxes, scene.labels, *scene.image.shape[:2])


CONDITIONS.register("layout")(LayoutFromAnnotations())


def layout_objects(boxes, labels, colors: list[str]) -> tuple[ShapeObject, ...]:
    """Upright shapes, each the largest that fits its box, centred in it (prompts, reference renders)."""
    out = []
    for (x0, y0, x1, y1), label, color in zip(np.asarray(boxes, np.float64), labels, colors):
        shape, w, h = SHAPES[int(label)], x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if shape == "triangle":  # apex up: width 2.5 r cos30, height 1.875 r, centroid 0.3125 r below the box centre
            r = min(w / (2.5 * math.cos(math.pi / 6)), h / 1.875)
            cy += 0.3125 * r
        else:
            r = min(w, h) / 2
        out.append(ShapeObject(shape, color, float(cx), float(cy), float(r), 0.0))
    return tuple(out)


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    from torchvision.ops import (
        box_iou,  # imported here: torchvision adds ~1.3 s to every `import bench.datasets`
    )

    return box_iou(a, b)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N,M] IoUs of xyxy boxes."""
    return _box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()


@dataclass
class BoxStatistics:
    """Empirical layout statistics of a training set, for sampling new pseudo-layouts.

    Per image: object count; per object: class (train frequency), box size (w,h) drawn jointly
    from that class's training boxes and centre drawn independently from its training centres,
    so layouts are new combinations rather than copies. Colours are drawn distinct per image
    from the train colour frequency. Pairs overlapping more than the train 95th-percentile IoU
    are resampled: the world keeps most of every object visible.
    """

    resolution: int
    counts: np.ndarray  # [max objects + 1] frequency of objects per image
    class_freq: np.ndarray  # [len(SHAPES)]
    color_freq: np.ndarray  # [len(COLORS)]
    sizes: list[np.ndarray]  # per class [M,2] (w,h)
    centres: list[np.ndarray]  # per class [M,2] (cx,cy)
    max_iou: float

    @classmethod
    def fit(cls, samples) -> "BoxStatistics":
        """samples: an iterable of Batches (with refs boxes/labels) or Scenes."""
        layouts, colors, resolution = [], [], None
        for s in samples:
            if isinstance(s, Batch):
                resolution = s.image.shape[-1]
                layouts += [(b.numpy(), l.numpy()) for b, l in zip(s.refs["boxes"], s.refs["labels"])]
                colors += [c for p in s.prompts for c, _ in parse_prompt(p)]
            else:
                resolution = s.image.shape[1]
                layouts.append((s.boxes, s.labels))
                colors += [o.color for o in s.objects]
        if not layouts:
            raise ValueError("BoxStatistics.fit needs at least one sample")
        boxes = np.concatenate([b for b, _ in layouts]).astype(np.float64)
        labels = np.concatenate([l for _, l in layouts])
        n = np.array([len(l) for _, l in layouts])
        ious = np.concatenate([_iou(b, b)[np.triu_indices(len(b), 1)] for b, _ in layouts])
        color_counts = np.array([colors.count(c) for c in COLORS], np.float64)
        return cls(
            resolution=int(resolution),
            counts=np.bincount(n) / len(n),
            class_freq=np.bincount(labels, minlength=len(SHAPES)) / len(labels),
            color_freq=color_counts / max(color_counts.sum(), 1),
            sizes=[boxes[labels == c, 2:] - boxes[labels == c, :2] for c in range(len(SHAPES))],
            centres=[(boxes[labels == c, 2:] + boxes[labels == c, :2]) / 2 for c in range(len(SHAPES))],
            max_iou=float(np.quantile(ious, 0.95)) if len(ious) else 1.0,
        )

    def _box(self, label: int, rng: np.random.Generator) -> np.ndarray:
        w, h = self.sizes[label][rng.integers(len(self.sizes[label]))]
        cx, cy = self.centres[label][rng.integers(len(self.centres[label]))]
        x0 = np.clip(cx - w / 2, 0, self.resolution - w)  # shift, not shrink, into the image
        y0 = np.clip(cy - h / 2, 0, self.resolution - h)
        return np.array([x0, y0, x0 + w, y0 + h], np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """n pseudo-layouts: (boxes float32 [K,4] xyxy, labels int64 [K]), in z-order."""
        out = []
        for _ in range(n):
            k = int(rng.choice(len(self.counts), p=self.counts))
            labels = rng.choice(len(SHAPES), size=k, p=self.class_freq).astype(np.int64)
            boxes: list[np.ndarray] = []
            for label in labels:
                for _ in range(100):
                    box = self._box(int(label), rng)
                    if not boxes or _iou(np.stack(boxes), box[None]).max() <= self.max_iou:
                        break
                boxes.append(box)
            out.append((np.array(boxes, np.float32).reshape(-1, 4), labels))
        return out

    def pseudo_batch(self, n: int, seed: int) -> Batch:
        """n pseudo-layouts with prompts in the world's grammar; a pure function of (statistics, seed)."""
        rng = np.random.default_rng([seed, 0x0D6E])
        layouts = self.sample(n, rng)
        prompts = []
        for boxes, labels in layouts:
            colors = [str(c) for c in rng.choice(list(COLORS), size=len(labels), replace=False, p=self.color_freq)]
            prompts.append(prompt_for(layout_objects(boxes, labels, colors)))
        res = self.resolution
        return Batch(
            ids=[f"pseudo-{i:06d}" for i in range(n)],
            image=torch.zeros(n, 3, res, res),
            prompts=prompts,
            conditions={"layout": torch.stack([layout_image(b, l, res, res) for b, l in layouts])},
            refs={"boxes": [torch.from_numpy(b) for b, _ in layouts], "labels": [torch.from_numpy(l) for _, l in layouts]},
        )

