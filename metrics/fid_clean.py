"""`fid_clean`: FID as the clean-fid package computes it in its "clean" mode (what ControlNet++
reports: eval/eval_fid.py L10-15, `fid.compute_fid(real_dir, gen_dir, dataset_res=512)`, a
folder-vs-folder comparison, so `dataset_res` names only the images' resolution).

The pipeline is clean-fid's own code, not a re-implementation:
- images as the 8-bit RGB files hold them (generated images rounded to uint8 like the saved PNGs);
- `cleanfid.resize.build_resizer("clean")`: PIL bicubic resize to 299x299 of each channel as a
  float image, no re-quantisation (cleanfid/utils.py ResizeDataset.__getitem__);
- `cleanfid.inception_torchscript.InceptionV3W` (the NVIDIA torchscript Inception, inputs
  (x - 128) / 128, 2048-d pool features), loaded with `download=False` from the local weight
  `inception-cleanfid`: it never downloads;
- mean and unbiased covariance per side (np.cov), `cleanfid.fid.frechet_distance`.

ControlNet++ averages the FID of its 4 generation groups; the harness runs each seed as its own
run, so one run gives one group's FID. Real-side features are cached like the `fid` metric's,
under their own key (other weights, other resize).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from bench.datasets.conditions import to_uint8
from bench.metrics.base import BenchMetric
from bench.metrics.fid import fingerprint
from torch import Tensor, nn

from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.files import atomic_path
from bench.core.paths import cache_dir
from bench.core.registry import METRICS
from bench.core.weights import WeightSpec, register_weight, weight_path

CLEANFID_INCEPTION = register_weight(WeightSpec(
    "inception-cleanfid", "clean-fid/inception-2015-12-05.pt",
    how="download https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt "
        "(the file clean-fid fetches) on a connected machine and copy it there"))
RESIZE = "clean-fid-PIL-bicubic-float-299"


def _cleanfid_version() -> str:
    try:
        from importlib.metadata import version
        return version("clean-fid")
    except Exception:  # noqa: BLE001  (the version names the protocol; a missing package fails on use)
        return "unknown"


def load_cleanfid_inception(path: Path) -> nn.Module:
    """clean-fid's own Inception wrapper on a local file; never downloads."""
    from cleanfid.inception_torchscript import InceptionV3W

    if path.name != "inception-2015-12-05.pt":
        raise ConfigError(f"{path}: clean-fid loads a file named inception-2015-12-05.pt")
    try:
        return InceptionV3W(str(path.parent), download=False, resize_inside=False).eval()
    except RuntimeError as e:  # not a torchscript archive
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not clean-fid's torchscript Inception ({why}); "
                          f"{CLEANFID_INCEPTION.how}") from None


def cleanfid_inputs(images: Tensor) -> Tensor:
    """float [B,3,H,W] in [0,1] -> float [B,3,299,299] in [0,255]: uint8 rounding, then
    clean-fid's "clean" resizer (PIL bicubic on float channels), as its ResizeDataset feeds Inception."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    arrays = [resize(im) for im in to_uint8(images)]  # [H,W,3] uint8 -> [299,299,3] float32
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@METRICS.register("fid_clean")
class FIDClean(BenchMetric):
    """clean-fid "clean"-mode FID of generated images against the batch's real images (lower is
    better). `feature` (tests only) replaces the torchscript Inception: a module mapping float
    [B,3,299,299] in [0,255] to [B,D]."""

    higher_is_better = False
    condition = None
    version = f"fid_clean-v1/clean-fid{_cleanfid_version()}-clean-mode/{Path(CLEANFID_INCEPTION.relpath).stem}/uint8-round/{RESIZE}"
    weights = evaluator_ids = ("inception-cleanfid",)

    def __init__(self, feature: nn.Module | None = None, reference_key: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if feature is None:
            path = weight_path("inception-cleanfid")
            self.inception = load_cleanfid_inception(path)
            self.extractor_id = f"{path.name}@{fingerprint(path)}"
        else:
            self.inception = feature
            blob = b"".join(t.detach().cpu().numpy().tobytes() for t in feature.state_dict().values())
            self.extractor_id = f"custom:{type(feature).__name__}@{hashlib.sha256(blob).hexdigest()[:16]}"
        self.reference_key = reference_key
        self.version = f"{FIDClean.version}/{self.extractor_id}"
        for side in ("real", "fake"):
            self.add_state(f"{side}_features", default=[], dist_reduce_fx="cat")

    def _features(self, images: Tensor) -> Tensor:
        x = cleanfid_inputs(images).to(self.device)
        with torch.no_grad():
            return self.inception(x).float().flatten(1).cpu()  # float32, as clean-fid keeps them

    def _real_features(self, images: Tensor, ids: list[str]) -> Tensor:
        pixels = to_uint8(images)
        meta = json.dumps(dict(reference=self.reference_key, ids=list(ids), n=len(ids), resolution=pixels.shape[1:3],
                               resize=RESIZE, extractor=self.extractor_id), sort_keys=True)
        key = hashlib.sha256(meta.encode() + hashlib.sha256(pixels.tobytes()).digest()).hexdigest()[:24]
        path = cache_dir() / "fid_clean_ref" / f"{key}.pt"
        if path.exists():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)["features"]
            except Exception:  # noqa: BLE001  (a corrupt entry is recomputed, never trusted)
                path.unlink(missing_ok=True)
        feats = self._features(images)
        with atomic_path(path) as tmp:
            torch.save(dict(features=feats, ids=list(ids), meta=meta), tmp)
        return feats

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        self.fake_features.append(self._features(images).to(self.device))
        self.real_features.append(self._real_features(batch.image, batch.ids).to(self.device))

    def compute(self) -> Tensor:
        from cleanfid.fid import frechet_distance

        stats = []
        for side in ("fake", "real"):
            feats = getattr(self, f"{side}_features")
            feats = torch.cat(feats) if isinstance(feats, list) else feats
            if len(feats) < 2:
                raise ValueError(f"fid_clean needs at least 2 {side} samples, got {len(feats)}")
            f = feats.cpu().numpy()
            stats += [np.mean(f, axis=0), np.cov(f, rowvar=False)]
        return torch.tensor(float(frechet_distance(*stats)), dtype=torch.float32)
