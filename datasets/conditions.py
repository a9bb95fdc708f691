"""Condition extractors: images -> condition maps, deterministic and versioned.

The same extractor builds a method's input condition and re-extracts it from generated
images, so consistency metrics compare like with like.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch
from bench.datasets.shapes import sample_objects

from bench.core.registry import CONDITIONS

SEG_PALETTE = np.array([[0, 0, 0], [255, 64, 64], [64, 255, 64], [64, 64, 255]], np.uint8)  # bg + SHAPES


class ConditionExtractor(Protocol):
    """Images -> condition maps. Extractors whose input comes from annotations (seg, depth,
    layout) also define `from_scene(scene) -> [3,H,W]`, which `bench.datasets.shapes.condition_from_scene` prefers."""

    name: str
    version: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] float in [0,1] -> [B,3,H,W] condition map in [0,1]."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] float [0,1] -> [B,H,W,3] uint8 with round-to-nearest (not truncation)."""
    return images.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class BinaryEdges:
    """An edge extractor's condition map: its binary `edges` [B,H,W] drawn white on black, on 3 channels."""

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.edges(images).float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class Canny(BinaryEdges):
    """OpenCV Canny (cv2.Canny, L1 gradient, 3x3 Sobel) on the grayscale image with fixed thresholds 60/120:
    the harness's own canny condition, which `canny_f1` re-extracts. Not ControlNet++'s protocol, which
    feeds and scores kornia's canny at 0.1/0.2 (`KorniaCanny`, the `canny_kornia` condition)."""

    low: int = 60
    high: int = 120

    @property
    def version(self) -> str:
        return f"canny-cv2-{self.low}-{self.high}-v1"

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """Binary edge maps [B,H,W] bool."""
        out = [cv2.Canny(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), self.low, self.high) > 0 for im in to_uint8(images)]
        return torch.from_numpy(np.stack(out))


def pil_roundtrip(images: torch.Tensor) -> torch.Tensor:
    """float [0,1] -> the float the protocol reads back from a saved 8-bit PNG:
    `F.pil_to_tensor(img) / 255` of an image rounded to uint8 like the harness's PNGs."""
    return images.detach().clamp(0, 1).mul(255).round().div(255)


@dataclass(frozen=True)
class KorniaCanny(BinaryEdges):
    """ControlNet++'s canny, which its eval both feeds the model and scores: `kornia.filters.canny(img/255,
    0.1, 0.2)[1]` with kornia's defaults (5x5 gaussian blur sigma 1, hysteresis on), on the RGB image as read
    from 8-bit files (kornia converts to grayscale itself); `label = condition` (liming-ai/ControlNet_Plus_Plus
    eval/eval.py L22, L175-180; eval_canny.sh `--condition_column='image'`). Registered as the `canny_kornia`
    condition and used by the `canny_f1_cnpp` metric, so the input and the re-extraction are one operator.
    The version is built from the thresholds, so changing one changes every version that names it."""

    low: float = 0.1
    high: float = 0.2

    @property
    def version(self) -> str:
        import kornia

        return f"canny-kornia{kornia.__version__}-{self.low}-{self.high}-g5s1-hyst-v1"

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """Binary edge maps [B,H,W] bool. kornia's hysteresis output is exactly 0 or 1, saved as
        0/255 by `to_pil_image(x, 'L')` and read back with 255 -> 1 (eval_edge.py L31-32)."""
        from kornia.filters import canny

        with torch.no_grad():
            _, edges = canny(pil_roundtrip(images).float(), self.low, self.high)
        return edges[:, 0] > 0.5


KORNIA_CANNY = KorniaCanny()


def seg_to_image(semantic: np.ndarray) -> torch.Tensor:
    """Semantic label map [H,W] -> palette image [3,H,W] in [0,1]."""
    return torch.from_numpy(SEG_PALETTE[semantic]).permute(2, 0, 1).float().div(255)


@dataclass(frozen=True)
class SegmentationFromAnnotations:
    """Segmentation inputs come from the world's exact masks; generated images are
    re-segmented by the `seg_miou` evaluator, a model no method trains against."""

    version: str = "seg-gt-palette-v1"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError("seg conditions come from dataset annotations; use the seg_miou metric to re-segment images")

    def from_scene(self, scene) -> torch.Tensor:
        return seg_to_image(scene.semantic)


# The world's own limit, read from its sampler so the depth scale cannot drift from it.
MAX_OBJECTS: int = inspect.signature(sample_objects).parameters["max_objects"].default


def depth_from_scene(scene) -> np.ndarray:
    """uint8 [H,W] depth from z-order: background 0, object z (drawn later = nearer) 255*(z+1)/MAX_OBJECTS."""
    if scene.instance.max() > MAX_OBJECTS:
        raise ValueError(f"scene has {scene.instance.max()} objects; the depth scale covers {MAX_OBJECTS}")
    lut = np.round(255 * np.arange(MAX_OBJECTS + 1) / MAX_OBJECTS).astype(np.uint8)
    return lut[scene.instance]


@dataclass(frozen=True)
class DepthFromAnnotations:
    """Depth inputs come from the world's z-order; generated images are re-estimated by the
    `depth_rmse` evaluator (depthnet), a model no method trains against."""

    version: str = f"depth-zorder{MAX_OBJECTS}-v1"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError("depth conditions come from dataset annotations; use the depth_rmse metric to estimate depth")

    def from_scene(self, scene) -> torch.Tensor:
        return torch.from_numpy(depth_from_scene(scene)).float().div(255).expand(3, -1, -1).contiguous()


CONDITIONS.register("canny")(Canny())
CONDITIONS.register("canny_kornia")(KORNIA_CANNY)
CONDITIONS.register("seg")(SegmentationFromAnnotations())
CONDITIONS.register("depth")(DepthFromAnnotations())


