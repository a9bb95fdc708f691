"""The identity world's recognizers: three small networks, trained from seeds by `train()` and
shipped as safetensors with their config hash (the `Analyzer` pattern).

- `instance_embed`: the proxy "ArcFace" (InstantID's ID encoder). A CNN -> unit embedding,
  trained with a CosFace margin softmax over the train identities (scenes and references).
- `image_encoder`: the proxy "CLIP image encoder" (IP-Adapter, PhotoMaker). Never sees identity
  labels: it learns generic scene attributes (which colours and shapes are present, and each
  colour's share of the image) on shapes-world scenes plus identity-world train scenes, and
  exposes pooled `features` [B,D] and spatial `tokens` [B,16,D].
- `id_evaluator`: the independent scorer behind `id_sim_proxy`, used only by metrics. Metric
  learning on the train identities like instance_embed, but another architecture (4 stages,
  one conv each, avg+max pooling, 128-d), another loss (ArcFace) and another seed.

Every `embed(images [B,3,H,W] in [0,1]) -> [B,D]` returns unit vectors. The quality stored with
the weights is measured on held-out identities (eval and test pools, never trained on): top-1
identification of each scene among one reference per identity, the ROC AUC of same- vs
different-identity cosines, and their mean gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.datasets.identity import SPLIT_SEED, IdentityWorld, identity_pools
from bench.datasets.shapes import COLORS, SHAPES, ShapesWorld
from bench.proxy.analyzers import Analyzer, augment

ATTRIBUTES = len(COLORS) * 2 + len(SHAPES)  # colour present, shape present, colour share (x SHARE_SCALE)
SHARE_SCALE = 5.0
SHARE_MAX_DIST = 60.0  # an RGB pixel belongs to its nearest palette colour within this distance (blends: none)


# ---------------------------------------------------------------------------- networks
class EmbedNet(nn.Module):
    """Conv stages (GroupNorm, ReLU; 2x max-pool between stages) -> global pooling -> linear."""

    def __init__(self, channels: tuple[int, ...] = (24, 48, 96), convs: int = 2, pool: str = "avg", dim: int = 64,
                 norm_groups: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(channels):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs):
                layers += [nn.Conv2d(cin, c, 3, padding=1), nn.GroupNorm(norm_groups, c), nn.ReLU(inplace=True)]
                cin = c
        self.body = nn.Sequential(*layers)
        self.pool = pool
        self.proj = nn.Linear(cin * (2 if pool == "avgmax" else 1), dim)

    def feature_map(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> [B,C,h,w]."""
        return self.body(images.to(self.proj.weight.device, self.proj.weight.dtype) * 2 - 1)

    def pooled(self, images: Tensor) -> Tensor:
        fm = self.feature_map(images)
        avg = fm.mean((2, 3))
        return torch.cat([avg, fm.amax((2, 3))], 1) if self.pool == "avgmax" else avg

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.pooled(images))

    def embed(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> unit embeddings [B,dim] (differentiable; loaded nets are frozen)."""
        return F.normalize(self(images), dim=-1)


class ImageEncoder(EmbedNet):
    """A generic encoder: `forward` gives attribute logits (training only); methods use
    `features` (pooled [B,C]), `tokens` (the final map pooled to grid x grid, [B,grid^2,C])
    and `embed` (unit pooled features)."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), convs: int = 1, pool: str = "avg",
                 dim: int = ATTRIBUTES, norm_groups: int = 4):
        super().__init__(channels, convs, pool, dim, norm_groups)

    def features(self, images: Tensor) -> Tensor:
        return self.pooled(images)

    def tokens(self, images: Tensor, grid: int = 4) -> Tensor:
        fm = F.adaptive_avg_pool2d(self.feature_map(images), grid)
        return fm.flatten(2).transpose(1, 2)

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self.features(images), dim=-1)


# --------------------------------------------------------------------------------- data
def _stack(scenes) -> Tensor:
    return torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float().div(255)


def identity_views(split: str, samples: int, refs: int, resolution: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Scenes and `refs` references of `samples` identity-world samples: (images [M,3,H,W], identity [M])."""
    world = IdentityWorld(split, samples, resolution, seed, num_refs=refs)
    scenes = [world.scene(i) for i in range(samples)]
    scenes += [world.reference(i, k) for i in range(samples) for k in range(refs)]
    return _stack(scenes), torch.tensor([s.identity.index for s in scenes])


def attribute_targets(scenes) -> Tensor:
    """[N, ATTRIBUTES]: colours present (annotations, incl. an instance's second colour), shapes
    present, and each colour's share of the image (nearest palette colour, x SHARE_SCALE)."""
    palette = np.array(list(COLORS.values()), np.float32)
    out = []
    for s in scenes:
        colors = {o.color for o in s.objects} | ({s.identity.second} if hasattr(s, "identity") else set())
        dist = np.linalg.norm(s.image.astype(np.float32)[:, :, None] - palette, axis=-1)
        label = np.where(dist.min(-1) <= SHARE_MAX_DIST, dist.argmin(-1), -1)
        share = np.array([(label == c).mean() for c in range(len(COLORS))]) * SHARE_SCALE
        shapes = {o.shape for o in s.objects}
        out.append(np.concatenate([[c in colors for c in COLORS], [sh in shapes for sh in SHAPES], share]))
    return torch.tensor(np.array(out), dtype=torch.float32)


def attribute_data(shape_scenes: int, identity_scenes: int, split: str, resolution: int = 32,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Shapes-world scenes plus identity-world scenes of `split` (no identity labels kept)."""
    scenes = [ShapesWorld(split, shape_scenes, resolution, seed).scene(i) for i in range(shape_scenes)]
    world = IdentityWorld(split, identity_scenes, resolution, seed)
    scenes += [world.scene(i) for i in range(identity_scenes)]
    return _stack(scenes), attribute_targets(scenes)


# ----------------------------------------------------------------------------- quality
@torch.no_grad()
def verification(net: EmbedNet, split: str, resolution: int = 32, seed: int = 0) -> dict[str, float]:
    """Each identity of the split's pool twice: scenes vs one reference per sample.

    top1: a scene's nearest reference (over all of them) shows its identity; auc: same- vs
    different-identity scene-reference cosines; gap: their mean difference."""
    n = 2 * len(identity_pools()[split])
    world = IdentityWorld(split, n, resolution, seed, num_refs=1)
    scenes = _stack([world.scene(i) for i in range(n)])
    refs = _stack([world.reference(i, 0) for i in range(n)])
    ids = torch.tensor([world.identity(i).index for i in range(n)])
    sims = net.embed(scenes) @ net.embed(refs).T
    same = ids[:, None] == ids[None, :]
    pos, neg = sims[same], sims[~same]
    auc = float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())
    top1 = float((ids[sims.argmax(1)] == ids).float().mean())
    return {"top1": top1, "auc": auc, "gap": float(pos.mean() - neg.mean()), "same": float(pos.mean()),
            "diff": float(neg.mean())}


@torch.no_grad()
def attribute_accuracy(net: ImageEncoder, n: int = 256, resolution: int = 32) -> float:
    """Mean accuracy of the colour- and shape-presence bits on eval scenes (half shapes, half identity)."""
    images, target = attribute_data(n // 2, n - n // 2, "eval", resolution)
    k = len(COLORS) + len(SHAPES)
    return float(((net(images)[:, :k] > 0) == (target[:, :k] > 0.5)).float().mean())


# ------------------------------------------------------------------------------ training
def margin_logits(emb: Tensor, centres: Tensor, labels: Tensor, loss: str, scale: float, margin: float) -> Tensor:
    """CosFace (cos - m) or ArcFace (cos(theta + m)) logits for the target class, scaled."""
    cos = F.normalize(emb, dim=-1) @ F.normalize(centres, dim=-1).T
    target = cos.gather(1, labels[:, None])
    if loss == "cosface":
        adjusted = target - margin
    else:  # arcface; beyond theta = pi - m fall back to CosFace-like (insightface's easy_margin=False rule)
        sin = (1 - target.square()).clamp_min(1e-7).sqrt()
        adjusted = torch.where(target > math.cos(math.pi - margin), target * math.cos(margin) - sin * math.sin(margin),
                               target - math.sin(math.pi - margin) * margin)
    return scale * cos.scatter(1, labels[:, None], adjusted)


def _recipe(**changes) -> dict:
    # rot90 off: identities are upright (split halves top vs bottom tell swapped colours apart).
    # Scenes (with companions) are half the views: with references dominating, companions distracted the
    # evaluator (eval top-1 0.92 -> 0.96 with 3000 samples x 1 reference instead of 1200 x 2).
    r = dict(steps=2000, batch_size=64, lr=3e-3, warmup=50, weight_decay=1e-4, train_samples=3000, train_refs=1,
             loss="cosface", scale=16.0, margin=0.25,
             resolution=32, world_seed=0, world=IdentityWorld.VERSION, split_seed=SPLIT_SEED, seed=0,
             noise_max=0.08, blur_p=0.5, blur_sigma_max=0.9, brightness=0.1, contrast=0.2,
             channel_gain=0.1, saturation=0.3, rot90=False)
    r.update(changes)
    return {k: v for k, v in r.items() if v is not None}


@dataclass(frozen=True, eq=False)
class Recognizer(Analyzer):
    """task "identity": metric learning over the train identities (EmbedNet);
    task "attributes": generic scene attributes, no identity labels (ImageEncoder).
    `path`, `config_hash`, `model_id`, `load` (which refuses another config hash) and the
    training loop `train` are Analyzer's; this class supplies the data, loss and quality."""

    def build(self) -> EmbedNet:
        return (ImageEncoder if self.task == "attributes" else EmbedNet)(**self.arch)

    def quality(self, net: EmbedNet) -> dict[str, str]:
        res = self.recipe["resolution"]
        out = {f"{split}_{k}": f"{v:.4f}" for split in ("eval", "test")
               for k, v in verification(net, split, res).items() if k in ("top1", "auc", "gap")}
        if self.task == "attributes":
            out["eval_attribute_acc"] = f"{attribute_accuracy(net, resolution=res):.4f}"
        return out

    def _data(self) -> tuple[Tensor, Tensor]:
        r = self.recipe
        if self.task == "attributes":
            return attribute_data(r["shape_scenes"], r["train_samples"], "train", r["resolution"], r["world_seed"])
        images, ids = identity_views("train", r["train_samples"], r["train_refs"], r["resolution"], r["world_seed"])
        classes = {i: c for c, i in enumerate(identity_pools()["train"])}
        return images, torch.tensor([classes[int(i)] for i in ids])

    def _objective(self, net: EmbedNet) -> tuple[list[Tensor], Callable[[Tensor, Tensor], Tensor]]:
        r = self.recipe
        if self.task == "attributes":  # presence bits: BCE; colour shares: L1
            k = len(COLORS) + len(SHAPES)
            return [], lambda out, y: (F.binary_cross_entropy_with_logits(out[:, :k], y[:, :k])
                                       + F.l1_loss(out[:, k:], y[:, k:]))
        centres = nn.Parameter(torch.randn(len(identity_pools()["train"]), self.arch["dim"]) * 0.01)  # not shipped
        return [centres], lambda out, y: F.cross_entropy(
            margin_logits(out, centres, y, r["loss"], r["scale"], r["margin"]), y)

    def _augment(self, images: Tensor, targets: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Image-level targets: nothing moves with the image (the dummy map is discarded)."""
        return augment(images, images[:, 0], self.recipe, g)[0], targets


# The evaluator differs from both method encoders in seed AND architecture (and its loss),
# so a method cannot game id_sim_proxy by matching its own encoder's quirks.
INSTANCE_EMBED = Recognizer("instance_embed", "instance_embed-v1", "identity",
                            dict(channels=(32, 64, 128), convs=1, pool="avg", dim=64, norm_groups=4),
                            _recipe(seed=10))
IMAGE_ENCODER = Recognizer("image_encoder", "image_encoder-v1", "attributes",
                           dict(channels=(32, 64, 128), convs=1, pool="avg", dim=ATTRIBUTES, norm_groups=4),
                           _recipe(seed=20, steps=3000, batch_size=32, train_samples=1500, shape_scenes=1500,
                                   shapes_world=ShapesWorld.VERSION, share_scale=SHARE_SCALE,
                                   share_max_dist=SHARE_MAX_DIST, train_refs=None, loss=None, scale=None, margin=None))
ID_EVALUATOR = Recognizer("id_evaluator", "id_evaluator-v1", "identity",
                          dict(channels=(16, 32, 64, 128), convs=1, pool="avgmax", dim=128, norm_groups=8),
                          _recipe(seed=30, steps=3000, loss="arcface", margin=0.3))
RECOGNIZERS = (INSTANCE_EMBED, IMAGE_ENCODER, ID_EVALUATOR)
