"""The identity world: instances (patterned shapes) that reappear in new scenes, for the
identity-prompt methods (IP-Adapter, InstantID, PhotoMaker) and the `id_sim` metric.

An *identity* is a shape + a body colour + a second colour drawn in a bold pattern (split
halves, centre dot, ring, two stripes): 3 x 6 x 5 x 4 = 360 identities, enumerated in a fixed
order. A fixed permutation (independent of the world seed) splits their indices into disjoint
train / eval / test pools, so eval and test identities are never seen by any recognizer or
method in training.

A sample shows its split's identity in a new scene: its own position, scale and rotation
(within +-30 degrees: like faces, instances are upright, so "body on top, second colour below"
differs from the swapped colours), drawn on top of 0-2 plain companions from the shapes world
whose colours differ from the instance's. The prompt names the instance only by its class word
(its shape), "a circle and a blue square": the instance's colours must come from the
references. Each sample carries `num_refs` reference images of the instance alone and 5 sparse
keypoints (InstantID's face-landmark order: left eye, right eye, nose = centre, left and right
mouth corner) that rotate and scale with the instance.

Every sample is a pure function of (world seed, split, index, num_refs); the scene and the k-th
reference do not depend on num_refs, so single- and multi-reference runs share their targets.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from bench.datasets.shapes import (
    COLORS,
    SHAPES,
    SPLIT_CODE,
    SUPERSAMPLE,
    Scene,
    ShapeObject,
    ShapesWorld,
    join_phrases,
    render,
)

from bench.api.types import Batch
from bench.core.registry import CONDITIONS, DATASETS

PATTERNS = ("split", "dot", "ring", "stripes")
SPLIT_SEED = 4  # the identity split is fixed: it never follows the world seed
TRAIN_FRACTION = 2 / 3  # the rest is halved into eval and test
MAX_ROTATION = 30.0  # degrees either way
INSTANCE_RADIUS = (0.20, 0.27)  # x resolution: the instance is the large subject, like a face
REFERENCE_RADIUS = (0.22, 0.30)
COMPANION_RADIUS = (0.13, 0.19)
MAX_COMPANIONS = 2
REACH = 1.42  # a rotated square's half-diagonal bounds every shape (in radii)
# Keypoints in the instance frame (radii; x right, y down), insightface's 5-point order.
KEYPOINTS_LOCAL = np.array([[-0.35, -0.3], [0.35, -0.3], [0.0, 0.0], [-0.4, 0.35], [0.4, 0.35]], np.float64)
# Pattern geometry in radii: ring = the shape minus its 0.65-scaled copy; dot radius; stripe band |y|.
RING_INNER, DOT_RADIUS, STRIPES = 0.65, 0.38, (0.18, 0.52)
TRIANGLE_INRADIUS = 0.625  # shapes._polygon: circumradius 1.25 r, apex up


@dataclass(frozen=True)
class Identity:
    index: int
    shape: str  # the class word
    body: str  # colour names from shapes.COLORS
    second: str
    pattern: str

    @property
    def colors(self) -> frozenset[str]:
        return frozenset((self.body, self.second))


IDENTITIES: tuple[Identity, ...] = tuple(
    Identity(i, shape, body, second, pattern)
    for i, (shape, body, second, pattern) in enumerate(
        (s, b, c, p) for s, b, c, p in itertools.product(SHAPES, COLORS, COLORS, PATTERNS) if b != c))


@lru_cache(maxsize=None)
def identity_pools() -> dict[str, tuple[int, ...]]:
    """Disjoint identity indices per split, in a fixed shuffled order (samples cycle through it)."""
    perm = [int(i) for i in np.random.default_rng(SPLIT_SEED).permutation(len(IDENTITIES))]
    n_train = round(len(IDENTITIES) * TRAIN_FRACTION)
    n_eval = (len(IDENTITIES) - n_train) // 2
    return {"train": tuple(perm[:n_train]), "eval": tuple(perm[n_train:n_train + n_eval]),
            "test": tuple(perm[n_train + n_eval:])}


def _local(obj: ShapeObject, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates -> the object's frame in radii (undoing its rotation)."""
    a = np.deg2rad(obj.angle)
    dx, dy = (x - obj.cx) / obj.r, (y - obj.cy) / obj.r
    return dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)


def _inside(shape: str, u: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Points of the object frame inside the shape scaled by `scale` about its centre."""
    if shape == "circle":
        return u * u + v * v < scale * scale
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < scale
    normals = np.deg2rad([90.0, 210.0, 330.0])  # outward edge normals of the apex-up triangle
    return np.all([np.cos(t) * u + np.sin(t) * v < TRIANGLE_INRADIUS * scale for t in normals], axis=0)


def pattern_mask(identity: Identity, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (object frame, inside the shape) take the second colour."""
    if identity.pattern == "split":
        return v > 0  # the lower half
    if identity.pattern == "dot":
        return u * u + v * v < DOT_RADIUS ** 2
    if identity.pattern == "ring":
        return ~_inside(identity.shape, u, v, RING_INNER)
    lo, hi = STRIPES
    return (np.abs(v) > lo) & (np.abs(v) < hi)


def keypoints_of(obj: ShapeObject) -> np.ndarray:
    """float32 [5,2] (x, y) in ShapeObject (pixel) coordinates; they rotate and scale with the object."""
    a = np.deg2rad(obj.angle)
    u, v = KEYPOINTS_LOCAL[:, 0] * obj.r, KEYPOINTS_LOCAL[:, 1] * obj.r
    x, y = obj.cx + u * np.cos(a) - v * np.sin(a), obj.cy + u * np.sin(a) + v * np.cos(a)
    return np.stack([x, y], 1).astype(np.float32)


@dataclass
class IdentityScene(Scene):
    identity: Identity
    keypoints: np.ndarray  # float32 [5,2] of the instance (the last, topmost object)


def render_identity(identity: Identity, instance: ShapeObject, companions: tuple[ShapeObject, ...],
                    resolution: int) -> IdentityScene:
    """Companions first, the instance on top, its pattern painted on the supersampled canvas."""
    objects = (*companions, instance)

    def paint(rgb: np.ndarray, inst: np.ndarray) -> None:
        ys, xs = np.nonzero(inst == len(objects))
        u, v = _local(instance, xs / SUPERSAMPLE, ys / SUPERSAMPLE)
        m = pattern_mask(identity, u, v)
        rgb[ys[m], xs[m]] = COLORS[identity.second]

    scene = render(objects, resolution, paint)
    prompt = join_phrases([f"a {identity.shape}"] + [f"a {o.color} {o.shape}" for o in companions])
    base = {f.name: getattr(scene, f.name) for f in fields(Scene)} | {"prompt": prompt}
    return IdentityScene(**base, identity=identity, keypoints=keypoints_of(instance))


def _place(rng: np.random.Generator, shape: str, color: str, radius: tuple[float, float], resolution: int,
           max_rotation: float) -> ShapeObject:
    r = float(rng.uniform(*radius) * resolution)
    reach = r * REACH
    return ShapeObject(shape=shape, color=color, cx=float(rng.uniform(reach, resolution - reach)),
                       cy=float(rng.uniform(reach, resolution - reach)), r=r,
                       angle=float(rng.uniform(-max_rotation, max_rotation)))


def sample_scene(identity: Identity, rng: np.random.Generator, resolution: int) -> IdentityScene:
    """The instance somewhere new, plus 0-2 solid companions of other colours, each >= 60% visible."""
    instance = _place(rng, identity.shape, identity.body, INSTANCE_RADIUS, resolution, MAX_ROTATION)
    n = int(rng.integers(0, MAX_COMPANIONS + 1))
    free = [c for c in COLORS if c not in identity.colors]
    companions: list[ShapeObject] = []
    for _ in range(100):
        if len(companions) == n:
            break
        obj = _place(rng, SHAPES[int(rng.integers(len(SHAPES)))], free[int(rng.integers(len(free)))],
                     COMPANION_RADIUS, resolution, 180.0)
        if any(o.color == obj.color for o in companions):
            continue
        candidate = (*companions, obj, instance)
        inst = render(candidate, resolution).instance
        full = [np.count_nonzero(render((o,), resolution).instance) for o in candidate[:-1]]
        if all(np.count_nonzero(inst == z + 1) >= 0.6 * max(f, 1) for z, f in enumerate(full)):
            companions.append(obj)
    return render_identity(identity, instance, tuple(companions), resolution)


def sample_reference(identity: Identity, rng: np.random.Generator, resolution: int) -> IdentityScene:
    """The instance alone on the background, at its own scale, rotation and position."""
    instance = _place(rng, identity.shape, identity.body, REFERENCE_RADIUS, resolution, MAX_ROTATION)
    return render_identity(identity, instance, (), resolution)


# ------------------------------------------------------------------------ keypoints condition
KPS_COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]], np.float64)
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # every point to the centre, as InstantID's draw_kps


def draw_keypoints(kps, height: int, width: int) -> torch.Tensor:
    """InstantID's draw_kps at proxy scale: limbs from each point to the centre in the point's
    colour at 60%, then full-colour dots, on black; drawn at 4x and area-downsampled.
    kps: [5,2] (x, y) in pixels. Returns [3,H,W] float in [0,1]."""
    s = SUPERSAMPLE
    scale = max(height, width) / 32  # limb 1 px and dot radius 1.5 px at 32 px
    pts = np.round(np.asarray(kps, np.float64) * s * 16).astype(np.int64)  # 4 fractional bits
    limbs = np.zeros((height * s, width * s, 3), np.float64)
    for a, b in KPS_LIMBS:
        cv2.line(limbs, tuple(map(int, pts[a])), tuple(map(int, pts[b])), KPS_COLORS[a].tolist(),
                 max(1, round(s * scale)), cv2.LINE_8, 4)
    canvas = limbs * 0.6
    for p, color in zip(pts, KPS_COLORS):
        cv2.circle(canvas, tuple(map(int, p)), round(1.5 * s * scale * 16), color.tolist(), -1, cv2.LINE_8, 4)
    small = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small).permute(2, 0, 1).float().div(255).clamp(0, 1)


@dataclass(frozen=True)
class KeypointsFromAnnotations:
    """InstantID's 5-keypoint image (IdentityNet's condition), drawn from the identity world's
    exact instance keypoints. There is no proxy keypoint detector, so generated images are not
    re-extracted; identity is scored by `id_sim_proxy` instead."""

    version: str = "keypoints-5pt-drawkps-v1"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError("keypoints conditions come from identity-world annotations (scene.keypoints or "
                        "batch.refs['keypoints'] via draw_keypoints); no detector re-extracts them from images")

    def from_scene(self, scene) -> torch.Tensor:
        return draw_keypoints(scene.keypoints, *scene.image.shape[:2])


CONDITIONS.register("keypoints")(KeypointsFromAnnotations())


@lru_cache(maxsize=1)
def _antelope(directory: str):
    from bench.faces.antelope import ANTELOPEV2, AntelopeEncoder

    return AntelopeEncoder.from_dir(Path(directory), ANTELOPEV2.name)


@dataclass(frozen=True)
class FaceKeypoints:
    """IdentityNet's condition for real face images, made as InstantID's infer.py makes it:
    antelopev2 (bench/faces/antelope.py) finds the largest face and `draw_kps` draws its 5 keypoints at
    the image's size. An image without a detected face gets a black map: infer.py stops there,
    a dataset keeps the sample. Generated images are not re-extracted for a consistency score:
    antelopev2 is InstantID's own encoder, which the evaluator never scores with."""

    name: str = "face_kps"
    version: str = "face-kps-antelopev2-scrfd640-drawkps-v1"
    weights: tuple[str, ...] = ("insightface-antelopev2",)  # bench.faces.antelope.ANTELOPEV2

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from bench.datasets.conditions import to_uint8

        from bench.core.weights import weight_path
        from bench.faces.antelope import draw_kps

        encoder = _antelope(str(weight_path(self.weights[0])))
        maps = []
        for image in to_uint8(images):
            found = encoder.face(image)
            drawn = draw_kps((image.shape[1], image.shape[0]), found[1]) if found is not None else np.zeros_like(image)
            maps.append(torch.from_numpy(drawn).permute(2, 0, 1).float().div(255))
        return torch.stack(maps).to(images.device)


CONDITIONS.register("face_kps")(FaceKeypoints())


# ---------------------------------------------------------------------------------- dataset
def _image(scene: Scene) -> torch.Tensor:
    return torch.from_numpy(scene.image).permute(2, 0, 1).float().div(255)


class IdentityWorld(ShapesWorld):
    """Map-style dataset of one split; items are single-sample `Batch`es.

    refs: "reference_images" [list of [num_refs,3,H,W]], "identity" int64 [B] (index into
    IDENTITIES), "keypoints" float32 [B,5,2] (x, y pixels), "class_word" [list of str], and the
    shapes world's "semantic", "boxes", "labels" (so seg/depth/layout conditions work too).
    """

    VERSION = "identity-v1"  # bump with any change to identities, pools, geometry or sampling: recognizers hash it

    def __init__(self, split: str, size: int, resolution: int = 32, seed: int = 0, conditions: tuple[str, ...] = (),
                 num_refs: int = 1):
        if not 1 <= num_refs <= 4:
            raise ValueError(f"num_refs must be 1..4, got {num_refs}")
        super().__init__(split, size, resolution, seed, conditions)
        self.num_refs = num_refs

    @property
    def version(self) -> str:
        return f"{super().version}/refs{self.num_refs}"

    def identity(self, index: int) -> Identity:
        pool = identity_pools()[self.split]
        return IDENTITIES[pool[index % len(pool)]]

    def scene(self, index: int) -> IdentityScene:
        rng = np.random.default_rng([self.seed, SPLIT_CODE[self.split], index, 0])
        return sample_scene(self.identity(index), rng, self.resolution)

    def reference(self, index: int, k: int) -> IdentityScene:
        rng = np.random.default_rng([self.seed, SPLIT_CODE[self.split], index, 1, k])
        return sample_reference(self.identity(index), rng, self.resolution)

    def __getitem__(self, index: int) -> Batch:
        from bench.datasets.shapes import condition_from_scene

        if not 0 <= index < self.size:
            raise IndexError(index)
        scene = self.scene(index)
        refs = torch.stack([_image(self.reference(index, k)) for k in range(self.num_refs)])
        return Batch(
            ids=[f"{self.split}-{index:06d}"],
            image=_image(scene).unsqueeze(0),
            prompts=[scene.prompt],
            conditions={c: condition_from_scene(c, scene).unsqueeze(0) for c in self.conditions},
            refs={
                "reference_images": [refs],
                "identity": torch.tensor([scene.identity.index], dtype=torch.int64),
                "keypoints": torch.from_numpy(scene.keypoints).unsqueeze(0),
                "class_word": [scene.identity.shape],
                "semantic": torch.from_numpy(scene.semantic).unsqueeze(0),
                "boxes": [torch.from_numpy(scene.boxes)],
                "labels": [torch.from_numpy(scene.labels)],
            },
        )


# The runner builds datasets by name with (split, size, resolution, conditions, seed) only, so
# the reference count is part of the name: one reference (the InstantID-vs-PhotoMaker claim's
# track) and four (PhotoMaker's multi-reference track). The scenes are identical between them.
@DATASETS.register("identity")
def build_identity(split: str, size: int, resolution: int, conditions: tuple[str, ...], seed: int = 0,
                   num_refs: int = 1) -> IdentityWorld:
    return IdentityWorld(split, size, resolution, seed, conditions, num_refs)


@DATASETS.register("identity_multi")
def build_identity_multi(split: str, size: int, resolution: int, conditions: tuple[str, ...], seed: int = 0,
                         num_refs: int = 4) -> IdentityWorld:
    return IdentityWorld(split, size, resolution, seed, conditions, num_refs)
