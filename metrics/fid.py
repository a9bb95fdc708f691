"""FID: torchmetrics' FrechetInceptionDistance on the torch-fidelity Inception weights, from a local file.

Clean protocol: images are rounded to uint8 exactly as the PNGs are written, and torch-fidelity's
TF1-compatible bilinear resize to 299 (antialias=False) is the one resize rule. Real-side features
are cached per batch under cache_dir()/fid_ref, keyed by the pixels themselves, so every method
scored on the same eval set reuses them.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from bench.datasets.conditions import to_uint8
from bench.metrics.base import BenchMetric
from bench.metrics.fd import frechet_distance
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.files import atomic_path
from bench.core.paths import cache_dir
from bench.core.registry import METRICS
from bench.core.weights import WEIGHTS, WeightSpec, register_weight, weight_path

INCEPTION = register_weight(WeightSpec(
    "inception-fid", "inception/pt_inception-2015-12-05-6726825d.pth",
    how="download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth on a connected machine and copy it there"))
RESIZE = "tf1-bilinear-299(torch-fidelity)"


def as_uint8(images: Tensor) -> Tensor:
    """[B,3,H,W] float [0,1] -> uint8 [B,3,H,W], rounded like the saved PNGs."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous().to(images.device)


def fingerprint(*paths: Path, limit: int | None = 2**20) -> str:
    """sha256 over each file's first `limit` bytes and size: names a checkpoint without reading GBs."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read(limit))
        h.update(str(os.path.getsize(p)).encode())
    return h.hexdigest()[:16]


def _plain_state_dict(path: Path) -> None:
    # torch-fidelity loads with weights_only=False; refuse anything a weights_only load rejects first.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ConfigError(f"{path} is not a plain tensor state dict ({type(e).__name__}); "
                          f"{WEIGHTS.get('inception-fid').how}") from None


@METRICS.register("fid")
class FID(BenchMetric, FrechetInceptionDistance):
    """FID of generated images against the batch's real images (lower is better).

    `feature` (tests only) replaces Inception with a module mapping uint8 [B,3,H,W] to [B,D];
    `reference_key` is an optional caller label (e.g. dataset@version/split) added to the cache key.
    """

    higher_is_better = False
    condition = None
    version = f"fid-v1/torchmetrics-inception-v3-compat-2048/{Path(INCEPTION.relpath).stem}/uint8-round/{RESIZE}"
    weights = evaluator_ids = ("inception-fid",)

    def __init__(self, feature: nn.Module | None = None, reference_key: str | None = None, **kwargs) -> None:
        if feature is None:
            path = weight_path("inception-fid")
            _plain_state_dict(path)
            super().__init__(feature=2048, normalize=False, feature_extractor_weights_path=str(path),
                             antialias=False, **kwargs)
            self.extractor_id = f"{path.name}@{fingerprint(path)}"
        else:
            super().__init__(feature=feature, normalize=False, **kwargs)
            blob = b"".join(t.detach().cpu().numpy().tobytes() for t in feature.state_dict().values())
            self.extractor_id = f"custom:{type(feature).__name__}@{hashlib.sha256(blob).hexdigest()[:16]}"
        self.reference_key = reference_key
        self.version = f"{FID.version}/{self.extractor_id}"  # the record names the exact weights

    def _accumulate(self, side: str, feats: Tensor) -> None:
        f = feats.double().flatten(1)
        getattr(self, f"{side}_features_sum").add_(f.sum(0))
        getattr(self, f"{side}_features_cov_sum").add_(f.T @ f)
        getattr(self, f"{side}_features_num_samples").add_(len(f))

    def _real_features(self, images: Tensor, ids: list[str]) -> Tensor:
        pixels = images.cpu().numpy()
        meta = json.dumps(dict(reference=self.reference_key, ids=list(ids), n=len(ids), resolution=pixels.shape[2:],
                               resize=RESIZE, extractor=self.extractor_id), sort_keys=True)
        key = hashlib.sha256(meta.encode() + hashlib.sha256(pixels.tobytes()).digest()).hexdigest()[:24]
        path = cache_dir() / "fid_ref" / f"{key}.pt"
        if path.exists():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)["features"].to(images.device)
            except Exception:  # a corrupt entry is recomputed, never trusted
                path.unlink(missing_ok=True)
        with torch.no_grad():
            feats = self.inception(images)
        with atomic_path(path) as tmp:
            torch.save(dict(features=feats.cpu(), ids=list(ids), meta=meta), tmp)
        return feats

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        with torch.no_grad():
            self._accumulate("fake", self.inception(as_uint8(images)))
        self._accumulate("real", self._real_features(as_uint8(batch.image), batch.ids))

    def compute(self) -> Tensor:
        def moments(side: str) -> tuple[Tensor, Tensor]:
            n = int(getattr(self, f"{side}_features_num_samples"))
            if n < 2:
                raise ValueError(f"fid needs at least 2 {side} samples, got {n}")
            mu = getattr(self, f"{side}_features_sum") / n
            return mu, (getattr(self, f"{side}_features_cov_sum") - n * torch.outer(mu, mu)) / (n - 1)

        return frechet_distance(*moments("fake"), *moments("real")).float()
