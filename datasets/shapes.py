"""The shapes world: seeded, procedural scenes of coloured shapes with exact annotations.

Every sample is a pure function of (world seed, split, index), so train and eval never
share a random stream and any sample can be regenerated on its own.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from bench.api.types import Batch
from bench.core.registry import CONDITIONS, DATASETS

SHAPES = ("circle", "square", "triangle")
COLORS = {  # RGB, well separated in hue so a classical detector can read them back
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 50, 190),
    "cyan": (40, 200, 210),
}
BACKGROUND = (245, 245, 245)
SPLIT_CODE = {"train": 0, "eval": 1, "test": 2}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    cx: float  # centre and half-size in pixels of the output resolution
    cy: float
    r: float
    angle: float  # degrees; squares and triangles are rotated about their centre


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H,W,3]
    semantic: np.ndarray  # int64 [H,W]: 0 background, 1 + SHAPES.index(shape)
    instance: np.ndarray  # int64 [H,W]: 0 background, 1 + z-order index
    boxes: np.ndarray  # float32 [N,4] xyxy of the visible pixels
    labels: np.ndarray  # int64 [N] SHAPES index
    objects: tuple[ShapeObject, ...]
    prompt: str


def _polygon(obj: ShapeObject, scale: float) -> np.ndarray:
    n = 4 if obj.shape == "square" else 3
    start = 45.0 if obj.shape == "square" else -90.0
    t = np.deg2rad(start + obj.angle + np.arange(n) * 360.0 / n)
    rr = obj.r * (np.sqrt(2) if obj.shape == "square" else 1.25)
    pts = np.stack([obj.cx + rr * np.cos(t), obj.cy + rr * np.sin(t)], axis=1) * scale
    return np.round(pts * 16).astype(np.int32)  # 4 fractional bits for cv2 shift=4


def _draw(canvas: np.ndarray, obj: ShapeObject, value, scale: float) -> None:
    if obj.shape == "circle":
        centre = (int(round(obj.cx * scale * 16)), int(round(obj.cy * scale * 16)))
        cv2.circle(canvas, centre, int(round(obj.r * scale * 16)), value, -1, cv2.LINE_8, 4)
    else:
        cv2.fillPoly(canvas, [_polygon(obj, scale)], value, cv2.LINE_8, 4)


def join_phrases(names: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def prompt_for(objects: tuple[ShapeObject, ...]) -> str:
    return join_phrases([f"a {o.color} {o.shape}" for o in objects])


_OBJECT = re.compile(rf"\ban? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    """'a red circle, a blue square and a green triangle' -> [(red, circle), (blue, square), (green, triangle)]."""
    return _OBJECT.findall(prompt.lower())


def render(objects: tuple[ShapeObject, ...], resolution: int, paint=None) -> Scene:
    """Rasterise at 4x and area-downsample the image; masks take the pixel-centre label.

    `paint(rgb, inst)` may draw surface detail (the identity world's patterns) in place on the
    supersampled uint8 canvas [4H,4W,3], given its z-index map (0 background, 1 + z); big pixel
    (row j, col i) sits at (i, j) / 4 in ShapeObject coordinates. Annotations do not change.
    """
    big = resolution * SUPERSAMPLE
    inst_big = np.zeros((big, big), np.int32)
    for z, obj in enumerate(objects):  # later objects are drawn on top
        _draw(inst_big, obj, z + 1, SUPERSAMPLE)
    palette = np.array([BACKGROUND] + [COLORS[o.color] for o in objects], np.uint8)
    rgb = palette[inst_big]
    if paint is not None:
        paint(rgb, inst_big)
    image = cv2.resize(rgb, (resolution, resolution), interpolation=cv2.INTER_AREA)
    c = SUPERSAMPLE // 2
    instance = inst_big[c::SUPERSAMPLE, c::SUPERSAMPLE].astype(np.int64)
    sem_lut = np.array([0] + [1 + SHAPES.index(o.shape) for o in objects], np.int64)
    boxes, labels = [], []
    for z, obj in enumerate(objects):
        ys, xs = np.nonzero(instance == z + 1)
        if len(xs):
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(SHAPES.index(obj.shape))
    return Scene(
        image=image,
        semantic=sem_lut[instance],
        instance=instance,
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        labels=np.array(labels, np.int64),
        objects=objects,
        prompt=prompt_for(objects),
    )


def sample_objects(rng: np.random.Generator, resolution: int, max_objects: int = 3) -> tuple[ShapeObject, ...]:
    """1..max_objects shapes of distinct colours, each keeping at least 60% of its area visible."""
    n = int(rng.integers(1, max_objects + 1))
    chosen: list[ShapeObject] = []
    color_names = list(COLORS)
    for _ in range(200):
        if len(chosen) == n:
            break
        r = float(rng.uniform(0.14, 0.24) * resolution)
        reach = r * 1.42  # a rotated square's half-diagonal bounds every shape
        obj = ShapeObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=color_names[int(rng.integers(len(color_names)))],
            cx=float(rng.uniform(reach, resolution - reach)),
            cy=float(rng.uniform(reach, resolution - reach)),
            r=r,
            angle=float(rng.uniform(0, 360)),
        )
        if any(o.color == obj.color for o in chosen):  # distinct colours keep objects separable
            continue
        candidate = tuple(chosen + [obj])
        inst = render(candidate, resolution).instance
        full = [np.count_nonzero(render((o,), resolution).instance) for o in candidate]
        if all(np.count_nonzero(inst == z + 1) >= 0.6 * max(f, 1) for z, f in enumerate(full)):
            chosen.append(obj)
    return tuple(chosen)


def condition_from_scene(kind: str, scene) -> torch.Tensor:
    """The input condition for one rendered scene, [3,H,W] in [0,1]."""
    extractor = CONDITIONS.get(kind)
    if hasattr(extractor, "from_scene"):
        return extractor.from_scene(scene)
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return extractor(image)[0]


class ShapesWorld(torch.utils.data.Dataset):
    """Map-style dataset of one split; items are single-sample `Batch`es."""

    VERSION = "shapes-v1"

    def __init__(self, split: str, size: int, resolution: int = 32, seed: int = 0, conditions: tuple[str, ...] = ()):
        if split not in SPLIT_CODE:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_CODE)}")
        self.split, self.size, self.resolution, self.seed = split, size, resolution, seed
        self.conditions = conditions

    @property
    def version(self) -> str:
        return f"{self.VERSION}/seed{self.seed}/{self.resolution}px"

    def __len__(self) -> int:
        return self.size

    def verify(self) -> None:
        """Nothing to check: scenes are generated from the seed, no file is read (the preflight's hook)."""

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, SPLIT_CODE[self.split], index])
        return render(sample_objects(rng, self.resolution), self.resolution)

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < self.size:
            raise IndexError(index)
        scene = self.scene(index)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float().div(255).unsqueeze(0)
        return Batch(
            ids=[f"{self.split}-{index:06d}"],
            image=image,
            prompts=[scene.prompt],
            conditions={c: condition_from_scene(c, scene).unsqueeze(0) for c in self.conditions},
            refs={
                "semantic": torch.from_numpy(scene.semantic).unsqueeze(0),
                "boxes": [torch.from_numpy(scene.boxes)],
                "labels": [torch.from_numpy(scene.labels)],
            },
        )


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@DATASETS.register("shapes")
def build_shapes(split: str, size: int, resolution: int, conditions: tuple[str, ...], seed: int = 0) -> ShapesWorld:
    return ShapesWorld(split, size, resolution, seed, conditions)
