"""The shapes world's own analyzers: small learned segmenters and depth nets, and a classical detector.

Evaluators must differ from any reward model a method trains against (ControlNet++ gamed
its own metric that way): segnet and depthnet are used only by metrics; reward_segnet and
reward_depthnet (another seed and architecture) only by bench/proxy/rewards.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bench.core.files import atomic_path
from bench.datasets.conditions import depth_from_scene
from bench.datasets.shapes import BACKGROUND, COLORS, SHAPES, ShapesWorld

ANALYZERS_DIR = Path(__file__).resolve().parent / "assets" / "analyzers"  # inside bench/ in every install
NUM_CLASSES = 1 + len(SHAPES)  # background + shapes, as in Scene.semantic
PRETRAIN_HINT = "run `bench pretrain --analyzers`"


# ---------------------------------------------------------------------------- networks
def _block(cin: int, cout: int, groups: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """Tiny U-Net (two 2x downsamplings); GroupNorm so outputs never depend on batch makeup.

    The dilated bottleneck sees the whole 8x8 map, i.e. whole objects: telling a square from
    a triangle is a shape-level decision (0.38 -> 0.50 mIoU after 400 steps in probes).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), num_classes: int = NUM_CLASSES, norm_groups: int = 4,
                 mid_dilation: int = 2):
        super().__init__()
        c1, c2, c3 = channels
        self.enc1, self.enc2 = _block(3, c1, norm_groups), _block(c1, c2, norm_groups)
        self.mid = _block(c2, c3, norm_groups, mid_dilation)
        self.dec2, self.dec1 = _block(c3 + c2, c2, norm_groups), _block(c2 + c1, c1, norm_groups)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def _encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = images.to(self.head.weight.device, self.head.weight.dtype) * 2 - 1
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        return e1, e2, self.mid(F.max_pool2d(e2, 2))

    def forward(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> logits [B,C,H,W]."""
        e1, e2, m = self._encode(images)
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.head(d1)

    @torch.no_grad()
    def segment(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> int64 labels [B,H,W] (0 background, 1 + SHAPES index)."""
        return self(images).argmax(1)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Average-pooled bottleneck activations [B, channels[-1]]: the proxy FD feature space."""
        return self._encode(images)[2].mean((2, 3))


class DepthNet(SegNet):
    """The same U-Net with one output channel: depth/255 regressed per pixel."""

    @torch.no_grad()
    def depth(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> depth float [B,H,W] on the condition's 0-255 scale."""
        return self(images)[:, 0].clamp(0, 1) * 255


# ------------------------------------------------------------------------------ recipes
def _recipe(**changes) -> dict:
    # Many small steps beat few large ones at equal CPU time (0.89 at batch 8 vs 0.57 at batch 48 in probes);
    # up-weighting the shapes against the 80% background speeds up learning their classes.
    # Augmentation ranges cover what a slightly noisy, blurry, off-colour generator produces.
    r = dict(steps=7000, batch_size=8, lr=3e-3, warmup=50, weight_decay=1e-4, train_scenes=3000,
             class_weights=(0.5, 2.0, 2.0, 2.0),
             resolution=32, world_seed=0, world=ShapesWorld.VERSION, seed=0,
             noise_max=0.08, blur_p=0.5, blur_sigma_max=0.9, brightness=0.1, contrast=0.2,
             channel_gain=0.1, saturation=0.3)
    r.update(changes)
    return {k: v for k, v in r.items() if v is not None}


@dataclass(frozen=True, eq=False)
class Analyzer:
    """A shipped learned analyzer: architecture + training recipe, trained from a seed by
    `train()`; its weights file stores the hash of both and `load()` refuses any other.

    task "seg" classifies pixels into Scene.semantic; "depth" regresses depth_from_scene/255.
    """

    name: str
    version: str
    task: str
    arch: dict
    recipe: dict

    @property
    def path(self) -> Path:
        return ANALYZERS_DIR / f"{self.name}.safetensors"

    def config_hash(self, steps: int | None = None, seed: int | None = None) -> str:
        r = dict(self.recipe)
        r["steps"] = r["steps"] if steps is None else steps
        r["seed"] = r["seed"] if seed is None else seed
        blob = json.dumps(dict(version=self.version, arch=self.arch, recipe=r), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def model_id(self) -> str:
        """Identity compared between evaluators and reward models (see BenchMetric.evaluator_ids)."""
        return f"{self.name}-{self.config_hash()}"

    def build(self) -> SegNet:
        return (DepthNet if self.task == "depth" else SegNet)(**self.arch)

    def load(self, path: Path | str | None = None, device: torch.device | str = "cpu") -> SegNet:
        """The shipped weights, frozen and in eval mode; refuses weights from another recipe."""
        path = Path(path or self.path)
        if not path.is_file():
            raise FileNotFoundError(f"{self.name} weights not found at {path}; {PRETRAIN_HINT}")
        stored, expected = analyzer_metadata(path).get("config_hash"), self.config_hash()
        if stored != expected:
            raise ValueError(f"{path} has config_hash {stored}, {self.name} code expects {expected}; {PRETRAIN_HINT}")
        net = self.build()
        net.load_state_dict(load_file(str(path)))
        return net.eval().requires_grad_(False).to(device)

    def quality(self, net: SegNet, n: int = 256) -> dict[str, str]:
        """Accuracy on clean eval scenes: mIoU for seg, pooled RMSE (0-255) for depth."""
        images, target = render_split("eval", n, self.recipe["resolution"], target=self.task)
        if self.task == "depth":
            return {"eval_rmse": f"{depth_rmse(net.depth(images), target * 255):.2f}"}
        return {"eval_miou": f"{float(miou_from_confusion(confusion_matrix(net.segment(images), target))):.4f}"}

    def _data(self) -> tuple[Tensor, Tensor]:
        """The whole training set: (images [N,3,H,W] in [0,1], targets [N,...])."""
        r = self.recipe
        return render_split("train", r["train_scenes"], r["resolution"], r["world_seed"], self.task)

    def _objective(self, net: nn.Module) -> tuple[list[Tensor], Callable[[Tensor, Tensor], Tensor]]:
        """Extra trainable tensors beside net's (none here) and loss(net output, targets)."""
        if self.task == "depth":
            return [], lambda out, y: F.l1_loss(out[:, 0], y)
        weights = torch.tensor(self.recipe["class_weights"])
        return [], lambda out, y: F.cross_entropy(out, y, weight=weights)

    def _augment(self, images: Tensor, targets: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return augment(images, targets, self.recipe, g)

    def train(self, out_path: Path | str | None = None, steps: int | None = None, seed: int | None = None,
              progress: bool = False) -> Path:
        """Train from the seed on the training set and save atomically with the config hash."""
        r = self.recipe
        steps = r["steps"] if steps is None else steps
        seed = r["seed"] if seed is None else seed
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        images, targets = self._data()
        net = self.build()
        extra, loss_fn = self._objective(net)
        opt = torch.optim.AdamW([*net.parameters(), *extra], lr=r["lr"], weight_decay=r["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / r["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        t0 = time.time()
        net.train()
        for step in range(steps):
            idx = torch.randint(0, len(images), (r["batch_size"],), generator=g)
            x, y = self._augment(images[idx], targets[idx], g)
            loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress and (step % 100 == 0 or step + 1 == steps):
                print(f"{self.name} step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        train_seconds = time.time() - t0
        net.eval()
        meta = {"config_hash": self.config_hash(steps, seed), "version": self.version,
                "train_seconds": f"{train_seconds:.1f}", **self.quality(net)}
        return _save_atomic(net, Path(out_path or self.path), meta)


def _save_atomic(net: nn.Module, out_path: Path, meta: dict[str, str]) -> Path:
    with atomic_path(out_path) as tmp:  # readers never see a half-written file
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    return out_path


def analyzer_metadata(path: Path | str) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# Evaluators (used only by metrics) and reward models (see bench/proxy/rewards.py) differ in seed
# AND architecture, so a method optimising a reward cannot overfit the evaluator's quirks.
SEGNET = Analyzer("segnet", "segnet-v1", "seg",
                  dict(channels=(16, 32, 64), num_classes=NUM_CLASSES, norm_groups=4, mid_dilation=2), _recipe())
DEPTHNET = Analyzer("depthnet", "depthnet-v1", "depth",
                    dict(channels=(16, 32, 64), num_classes=1, norm_groups=4, mid_dilation=2),
                    _recipe(class_weights=None, seed=1))
REWARD_SEGNET = Analyzer("reward_segnet", "reward_segnet-v1", "seg",
                         dict(channels=(24, 48, 96), num_classes=NUM_CLASSES, norm_groups=8, mid_dilation=1),
                         _recipe(steps=3500, seed=2))
REWARD_DEPTHNET = Analyzer("reward_depthnet", "reward_depthnet-v1", "depth",
                           dict(channels=(24, 48, 96), num_classes=1, norm_groups=8, mid_dilation=1),
                           _recipe(steps=3500, class_weights=None, seed=3))
ANALYZERS = (SEGNET, DEPTHNET, REWARD_SEGNET, REWARD_DEPTHNET)


def canny_model_id(canny) -> str:
    """Identity of a cv2 Canny extractor used as an evaluator."""
    return f"cv2-canny-{canny.low}-{canny.high}"


# The segnet names the rest of the code and the tests use.
SEGNET_PATH, SEGNET_VERSION = SEGNET.path, SEGNET.version
config_hash, load_segnet, segnet_metadata = SEGNET.config_hash, SEGNET.load, analyzer_metadata
load_depthnet = DEPTHNET.load


def segnet_config() -> dict:
    return dict(SEGNET.arch)


def render_split(split: str, n: int, resolution: int = 32, seed: int = 0, target: str = "seg") -> tuple[Tensor, Tensor]:
    """n scenes of a ShapesWorld split as (images float [n,3,H,W] in [0,1], targets [n,H,W]):
    int64 labels for target "seg", float depth/255 for "depth"."""
    world = ShapesWorld(split, n, resolution, seed)
    scenes = [world.scene(i) for i in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float().div(255)
    if target == "depth":
        return images, torch.from_numpy(np.stack([depth_from_scene(s) for s in scenes])).float().div(255)
    return images, torch.from_numpy(np.stack([s.semantic for s in scenes]))


def augment(images: Tensor, targets: Tensor, r: dict, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Flips/rot90 (shape classes and z-order are invariant; recipe key rot90=False turns rot90
    off), colour jitter, slight blur and gaussian noise. targets: any per-pixel map [B,H,W]
    (labels or depth), moved with the image."""
    b = images.shape[0]

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return torch.rand((b, *shape), generator=g) * (hi - lo) + lo

    k = int(torch.randint(4, (1,), generator=g))
    if r.get("rot90", True):  # off for upright worlds (identities): the draws stay, so streams do not shift
        images, targets = images.rot90(k, (2, 3)), targets.rot90(k, (1, 2))
    if torch.rand(1, generator=g) < 0.5:
        images, targets = images.flip(3), targets.flip(2)
    gray = images.mean(1, keepdim=True)
    x = gray + (images - gray) * u(1 - r["saturation"], 1 + r["saturation"], 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(1 - r["contrast"], 1 + r["contrast"], 1, 1, 1)
    x = x * u(1 - r["channel_gain"], 1 + r["channel_gain"], 3, 1, 1) + u(-r["brightness"], r["brightness"], 1, 1, 1)
    # Per-sample separable gaussian blur via a grouped conv; sigma 0 gives an identity kernel.
    sigma = u(0, r["blur_sigma_max"]) * (torch.rand(b, generator=g) < r["blur_p"])
    t = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (t / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [b*3, 5]
    h, w = x.shape[-2:]
    x = F.pad(x.reshape(1, b * 3, h, w), (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(F.conv2d(x, k1[:, None, None, :], groups=b * 3), k1[:, None, :, None], groups=b * 3).reshape(b, 3, h, w)
    x = x + torch.randn(x.shape, generator=g) * u(0, r["noise_max"], 1, 1, 1)
    return x.clamp(0, 1), targets


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """[C,C] int64 counts, rows = target, columns = prediction."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long().to(target.device)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(conf: Tensor) -> Tensor:
    """Mean IoU over classes present in prediction or target (absent classes carry no information)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return (tp[present] / union[present]).mean().float() if present.any() else torch.tensor(float("nan"))


def depth_rmse(pred: Tensor, target: Tensor) -> float:
    """Pooled RMSE over every pixel of every map (same units as the inputs)."""
    return float((pred.double() - target.double()).square().mean().sqrt())


# ----------------------------------------------------------------------------- detector
@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    box: tuple[float, float, float, float]  # xyxy in input pixels
    score: float  # fraction of the fitted shape's area covered by foreground


_PALETTE = np.array([BACKGROUND, *COLORS.values()], np.float32)  # index 0 = background
_UPSCALE = 4  # sub-pixel geometry: 32px shapes are only ~9-15 px across


def _fit_scores(component: np.ndarray, foreground: np.ndarray) -> dict[str, float]:
    """Fit each shape's minimal enclosing outline to the component; score its foreground share.

    The right shape's outline hugs the object, so it holds almost no background; the wrong
    ones add corners (circle in a square) or slack. Occluded parts are covered by other
    objects, i.e. foreground, so occlusion does not penalise the true shape.
    """
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(np.concatenate(contours)).astype(np.float32)
    masks = {s: np.zeros_like(component) for s in SHAPES}
    (x, y), r = cv2.minEnclosingCircle(hull)
    cv2.circle(masks["circle"], (round(x * 16), round(y * 16)), round(r * 16), 1, -1, cv2.LINE_8, 4)
    rect = cv2.boxPoints(cv2.minAreaRect(hull))
    cv2.fillPoly(masks["square"], [np.round(rect * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    _, tri = cv2.minEnclosingTriangle(hull)
    cv2.fillPoly(masks["triangle"], [np.round(tri.reshape(-1, 2) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return {s: float(foreground[m > 0].mean()) if m.any() else 0.0 for s, m in masks.items()}


def detect_objects(image: np.ndarray, color_threshold: float = 80.0, min_area_frac: float = 0.008) -> list[Detection]:
    """Classical colour + shape detector for shapes-world images (uint8 [H,W,3] RGB)."""
    h, w = image.shape[:2]
    big = cv2.resize(image, (w * _UPSCALE, h * _UPSCALE), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    dist = np.linalg.norm(big[:, :, None, :] - _PALETTE, axis=-1)  # [H,W,1+colours]
    label = dist.argmin(-1)
    label[dist.min(-1) > color_threshold] = -1  # blends and off-palette pixels belong to nothing
    foreground = dist[..., 0] > color_threshold
    min_area = min_area_frac * big.shape[0] * big.shape[1]
    out: list[Detection] = []
    for ci, color in enumerate(COLORS, start=1):
        n, comp, stats, _ = cv2.connectedComponentsWithStats((label == ci).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            if stats[k, cv2.CC_STAT_AREA] < min_area:
                continue
            scores = _fit_scores((comp == k).astype(np.uint8), foreground)
            shape = max(scores, key=scores.get)
            x0, y0, bw, bh = (float(v) / _UPSCALE for v in stats[k, :4])
            out.append(Detection(color, shape, (x0, y0, x0 + bw, y0 + bh), scores[shape]))
    return out

