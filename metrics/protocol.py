"""Protocol-faithful metrics: each reproduces one published evaluation protocol and is registered
under a NEW name beside the harness's own metric, so records of the old names keep their meaning.

| name | what it computes | protocol it follows |
|---|---|---|
| `canny_f1_cnpp` | kornia canny (0.1/0.2, 5x5 sigma-1 blur, hysteresis) of the generated and the ground-truth image, BinaryF1Score per image, mean over images | ControlNet++ `eval/eval.py` L175-181, L225-232; `eval/eval_edge.py` L15-44, L81, L98-104 |
| `depth_rmse_per_image` | RMSE (0-255) per image, mean over images | ControlNet++ `eval/eval_depth.py` L22-28 |
| `seg_miou_ignore0` | mmseg IoUMetric: `reduce_zero_label` (label 0 -> ignored), `ignore_index` 255, areas pooled over the set, nanmean over classes | mmseg `IoUMetric.intersect_and_union` (ADE20K protocol of ControlNet++ `eval/eval_ade20k.sh`) |
| `softedge_ms_ssim`, `pidinet_ms_ssim`, `lineart_ms_ssim` | torchmetrics MS-SSIM (data_range 1, 11x11 gaussian sigma 1.5, 5 scales) per image, mean | ControlNet++ `eval/eval_edge.py` L13, L28, L62, L79 (it reports it as "SSIM") |
| `kid` | torchmetrics KernelInceptionDistance (poly kernel d=3, 100 subsets), mean | torchmetrics / torch-fidelity defaults, the `fid` metric's local Inception weights |

Per-image metrics record their per-sample values with `BenchMetric.record_samples`; the pooled
ones (`seg_miou_ignore0`, `kid`) record none.
"""
from __future__ import annotations

from typing import Callable

import torch
from bench.metrics.base import BenchMetric
from bench.metrics.consistency import DepthRMSE, SegMIoU
from bench.metrics.fid import (
    FID,
    INCEPTION,
    RESIZE,
    _plain_state_dict,
    as_uint8,
    fingerprint,
)
from bench.metrics.softedge import SoftEdgeSSIM
from torch import Tensor, nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure as ms_ssim,
)
from torchmetrics.image.fid import NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from bench.api.types import Batch
from bench.datasets.conditions import KORNIA_CANNY, pil_roundtrip
from bench.core.errors import ConfigError
from bench.core.registry import CONDITIONS, METRICS
from bench.core.weights import weight_path
from bench.proxy.analyzers import NUM_CLASSES, SEGNET_VERSION, config_hash


def to_pil_truncate(maps: Tensor) -> Tensor:
    """float [0,1] map -> what torchvision `to_pil_image` stores (`mul(255).byte()`: truncation),
    read back as uint8/255: how ControlNet++ saves its condition maps before scoring them."""
    return maps.detach().clamp(0, 1).mul(255).to(torch.uint8).float().div(255)


# ------------------------------------------------------------------------------------ canny
# The operator lives with the conditions (datasets/conditions.py), because it is also the `canny_kornia`
# input condition: what ControlNet++'s eval feeds the model is what it scores.


def binary_f1_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """[B,...] bool -> [B] float64: torchmetrics BinaryF1Score of each image's pixels
    (2TP / (2TP + FP + FN); 0 when neither map has an edge, torchmetrics' zero_division=0)."""
    p, t = pred.flatten(1), target.flatten(1)
    tp = (p & t).sum(1).double()
    fp = (p & ~t).sum(1).double()
    fn = (~p & t).sum(1).double()
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


@METRICS.register("canny_f1_cnpp")
class CannyF1CNPP(BenchMetric):
    """ControlNet++ canny F1: kornia canny (0.1/0.2) of each generated image against kornia canny
    of its ground-truth image, torchmetrics BinaryF1Score per image, mean over images.

    Under the protocol the model's input is the same operator's map of the real image (eval.py L175-180:
    `condition = canny(img, 0.1, 0.2)[1]`, `label = condition`): the `canny_kornia` condition, whose map is
    bit-equal to the target computed here. The target is computed here from `batch.image`, not read from
    `batch.conditions`, so the metric also scores a run on the harness's `canny` input (cv2 60/120,
    `also_scores`): the protocol's scorer on another input, which the record's condition names.

    ControlNet++ pools the 4 generations of a condition into one F1 and averages over
    conditions; the harness makes one generation per sample id, so that is one F1 per image.
    """

    higher_is_better = True
    condition = "canny_kornia"  # the protocol's input
    also_scores = ("canny",)
    # built from the operator, whose version is built from its thresholds
    version = f"canny_f1_cnpp-v1/{KORNIA_CANNY.version}/gt-from-image/binary-f1-per-image-mean"
    evaluator_ids = (f"kornia-canny-{KORNIA_CANNY.low}-{KORNIA_CANNY.high}",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extractor = KORNIA_CANNY
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        if batch.image.shape != images.shape:
            raise ValueError(f"{self.name}: generated {tuple(images.shape)} vs ground truth {tuple(batch.image.shape)}")
        pred = self.extractor.edges(images)
        target = self.extractor.edges(batch.image.to(images.device))
        f1 = binary_f1_per_image(pred, target)
        self.record_samples(batch.ids, f1)
        self.total += f1.sum().to(self.total.device)
        self.count += len(f1)

    def reextract(self, images: Tensor, batch: Batch) -> Tensor:
        return self.extractor(images).cpu()

    def compute(self) -> Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


# ------------------------------------------------------------------------------------ depth
@METRICS.register("depth_rmse_per_image")
class DepthRMSEPerImage(DepthRMSE):
    """RMSE (0-255) between depthnet's depth of each generated image and its input depth
    condition, per image, then the mean over images (ControlNet++ eval/eval_depth.py L22-28:
    `sqrt(F.mse_loss(pred, label))` per image, `np.array(accs).mean()`).

    Same evaluator and scale as `depth_rmse` (which pools squared errors over every pixel of the
    set); only the reduction differs, hence a new name: a record of `depth_rmse` keeps meaning the
    pooled value. Not reproduced: ControlNet++'s min-max rescaling of the label and max-scaling of
    DPT's output to 8-bit PNGs (here both sides already share depthnet's 0-255 scale)."""

    version = f"depth_rmse_per_image-v1/{DepthRMSE.version.split('/', 1)[1]}/rmse-per-image-mean"

    def __init__(self, estimator: Callable[[Tensor], Tensor] | None = None, **kwargs) -> None:
        super().__init__(estimator=estimator, **kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        if "depth" not in batch.conditions:
            raise KeyError(f"{self.name} needs batch.conditions['depth']; the batch has {sorted(batch.conditions)}")
        pred = self._depth(images)
        target = batch.conditions["depth"][:, 0] * 255
        if pred.shape != target.shape:
            raise ValueError(f"{self.name}: depth {tuple(pred.shape)} vs condition {tuple(target.shape)}")
        diff = pred.double().to(self.total.device) - target.double().to(self.total.device)
        rmse = diff.square().flatten(1).mean(1).sqrt()
        self.record_samples(batch.ids, rmse)
        self.total += rmse.sum()
        self.n_images += len(rmse)

    def compute(self) -> Tensor:
        return (self.total / self.n_images).float() if self.n_images > 0 else torch.tensor(float("nan"))


# ------------------------------------------------------------------------------------ segmentation
def mmseg_intersect_and_union(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255,
                              reduce_zero_label: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """mmseg `IoUMetric.intersect_and_union`: per-class areas (intersect, pred, label), int64 [C].

    With `reduce_zero_label` the label is mapped 0 -> 255, k -> k-1 (so 0, "other", is ignored);
    pixels whose label is `ignore_index` are dropped; a predicted value outside [0, C) counts in
    no class (mmseg's `torch.histc(..., bins=C, min=0, max=C-1)` leaves it out)."""
    label = label.long().clone()
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    keep = label != ignore_index
    pred, label = pred.long().to(label.device)[keep], label[keep]
    hit = pred[pred == label]
    count = lambda x: torch.bincount(x[(x >= 0) & (x < num_classes)], minlength=num_classes)[:num_classes]  # noqa: E731
    area_intersect, area_pred, area_label = count(hit), count(pred), count(label)
    return area_intersect, area_pred, area_label


@METRICS.register("seg_miou_ignore0")
class SegMIoUIgnore0(SegMIoU):
    """mIoU as mmseg's IoUMetric computes it (the ADE20K protocol ControlNet++ evaluates with,
    eval/eval_ade20k.sh L21-29): `reduce_zero_label=True` (label 0 ignored, labels shifted down
    by one), `ignore_index=255`, intersection/union areas pooled over the whole set, mIoU =
    nanmean over classes (a class absent from both prediction and label has no IoU).

    Both options are constructor arguments and are written into the instance's `version`.
    The default evaluator is the shipped segnet, read through its logits. With
    `reduce_zero_label`, a segmenter that returns logits [B,C,H,W] over the full label space
    is read as a model trained on the reduced classes (argmax over channels 1..C-1: such a model
    has no output for label 0); a segmenter that returns labels has them shifted like the target
    (a predicted 0 then counts in no class, as mmseg's histogram drops it). Pooled: records no
    per-sample values."""

    version = f"seg_miou_ignore0-v1/mmseg-iou/rzl1-ign255/{SEGNET_VERSION}-{config_hash()}-logits"

    def __init__(self, segmenter: Callable[[Tensor], Tensor] | None = None, num_classes: int = NUM_CLASSES,
                 reduce_zero_label: bool = True, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(segmenter=segmenter, num_classes=num_classes, **kwargs)
        if segmenter is None:
            self.segmenter = self.segnet  # its logits [B,C,H,W]: with reduce_zero_label, channel 0 is dropped
        self.reduce_zero_label, self.ignore_index = bool(reduce_zero_label), int(ignore_index)
        self.eval_classes = num_classes - 1 if self.reduce_zero_label else num_classes
        self.version = (f"seg_miou_ignore0-v1/mmseg-iou/rzl{int(self.reduce_zero_label)}-ign{self.ignore_index}"
                        f"/{SEGNET_VERSION}-{config_hash()}" + ("-logits" if segmenter is None else "-custom"))
        for state in ("area_intersect", "area_pred", "area_label"):
            self.add_state(state, default=torch.zeros(self.eval_classes, dtype=torch.long), dist_reduce_fx="sum")

    def _eval_labels(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.segmenter(images)
        if out.ndim == 4:
            return out[:, 1:].argmax(1) if self.reduce_zero_label else out.argmax(1)
        return out.long() - 1 if self.reduce_zero_label else out.long()

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        target = batch.refs.get("semantic")
        if target is None:
            raise KeyError(f"{self.name} needs batch.refs['semantic'] (ground-truth labels [B,H,W])")
        pred = self._eval_labels(images)
        if pred.shape != target.shape:
            raise ValueError(f"{self.name}: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        areas = mmseg_intersect_and_union(pred.to(self.area_label.device), target.to(self.area_label.device),
                                          self.eval_classes, self.ignore_index, self.reduce_zero_label)
        self.area_intersect += areas[0]
        self.area_pred += areas[1]
        self.area_label += areas[2]

    def compute(self) -> Tensor:
        union = (self.area_pred + self.area_label - self.area_intersect).double()
        present = union > 0
        if not present.any():
            return torch.tensor(float("nan"))
        return (self.area_intersect.double()[present] / union[present]).mean().float()


# ------------------------------------------------------------------------------------ MS-SSIM
MS_SSIM_KERNEL = 11
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# torchmetrics refuses H or W with H // (len(betas)-1)**2 <= kernel-1 (its `_multiscale_ssim_update`).
MS_SSIM_MIN_SIZE = MS_SSIM_KERNEL * (len(MS_SSIM_BETAS) - 1) ** 2  # 176


class SoftEdgeMSSSIM(SoftEdgeSSIM):
    """MS-SSIM (torchmetrics, data_range 1, gaussian 11x11 sigma 1.5, 5 scales, relu-normalised)
    between the input soft-edge map and the map the same extractor re-extracts from the generated
    image, per image, mean over images: what ControlNet++ reports as "SSIM" (eval/eval_edge.py
    L13, L62, L79: `MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)`).

    As in ControlNet++, the generated image is read as an 8-bit image and both maps are stored
    as 8-bit grayscale by `to_pil_image` (truncation) before scoring (eval.py L193-200, L239-246;
    eval_edge.py L52-62). Refuses images under MS_SSIM_MIN_SIZE px on a side."""

    def maps(self, images: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        if min(images.shape[-2:]) < MS_SSIM_MIN_SIZE:
            raise ConfigError(f"{self.name}: MS-SSIM needs images of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE} px "
                              f"(5 scales, 11x11 window), got {images.shape[-2]}x{images.shape[-1]}; use the SSIM metric")
        with torch.no_grad():
            pred = to_pil_truncate(self.extractor(pil_roundtrip(images))[:, :1].float())
        return pred, to_pil_truncate(batch.conditions[self.condition][:, :1].float().to(pred.device))

    def score(self, pred: Tensor, target: Tensor) -> Tensor:
        return ms_ssim(pred, target, data_range=1.0, kernel_size=MS_SSIM_KERNEL, sigma=1.5,
                       betas=MS_SSIM_BETAS, normalize="relu", reduction="none")


def _register_ms_ssim(name: str, condition: str) -> None:
    extractor = CONDITIONS.get(condition)
    cls = type(f"MSSSIM_{condition}", (SoftEdgeMSSSIM,), dict(
        condition=condition, weights=getattr(extractor, "weights", ()), evaluator_ids=(extractor.version,),
        version=f"{name}-v1/torchmetrics-ms-ssim-g11s1.5-5scale-relu-dr1/u8-maps/per-image-mean/{extractor.version}",
        __doc__=f"MS-SSIM (data_range 1) of {condition} maps, per image, mean over images."))
    METRICS.register(name)(cls)


for _name, _condition in (("softedge_ms_ssim", "hed"), ("pidinet_ms_ssim", "pidinet"), ("lineart_ms_ssim", "lineart")):
    _register_ms_ssim(_name, _condition)


# ------------------------------------------------------------------------------------ KID
@METRICS.register("kid")
class KID(BenchMetric, KernelInceptionDistance):
    """KID of generated images against the batch's real images (lower is better): torchmetrics
    KernelInceptionDistance (polynomial kernel degree 3, gamma 1/d, coef 1; unbiased MMD^2 over
    `subsets` random subsets, mean), on the `fid` metric's local Inception weights, uint8 rounding
    and TF1 bilinear resize. Real-side features share the `fid` metric's cache.

    `subset_size` is min(1000, n) where n is the smaller side's sample count: the unbiased
    MMD^2 estimate has the same expectation for any subset size, and proxy eval sets are far
    below torch-fidelity's 1000. The subsets are drawn from a fixed seed, so a rerun gives the
    same number. `feature` (tests only) replaces Inception as in `fid`."""

    higher_is_better = False
    condition = None
    SEED = 0
    version = (f"kid-v1/torchmetrics-poly3-subsets100-size-min1000n-seed0/inception-v3-compat-2048/"
               f"{INCEPTION.relpath.rsplit('/', 1)[-1].rsplit('.', 1)[0]}/uint8-round/{RESIZE}")
    weights = evaluator_ids = ("inception-fid",)

    def __init__(self, feature: nn.Module | None = None, reference_key: str | None = None, subsets: int = 100,
                 subset_size: int = 1000, **kwargs) -> None:
        if feature is None:
            path = weight_path("inception-fid")
            _plain_state_dict(path)
            # torchmetrics' KID has no weights-path argument: build its Inception exactly as its FID
            # does (torchmetrics image/fid.py), from the local file, so nothing is downloaded.
            feature = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         feature_extractor_weights_path=str(path), antialias=False)
            extractor_id = f"{path.name}@{fingerprint(path)}"
            super().__init__(feature=feature, subsets=subsets, subset_size=subset_size, normalize=False, **kwargs)
            self.used_custom_model = False
        else:
            import hashlib
            blob = b"".join(t.detach().cpu().numpy().tobytes() for t in feature.state_dict().values())
            extractor_id = f"custom:{type(feature).__name__}@{hashlib.sha256(blob).hexdigest()[:16]}"
            super().__init__(feature=feature, subsets=subsets, subset_size=subset_size, normalize=False, **kwargs)
        self.extractor_id, self.reference_key = extractor_id, reference_key
        self.max_subset_size = subset_size
        self.version = f"{KID.version}/{extractor_id}"

    _real_features = FID._real_features  # the same cache entries as `fid`: same Inception, resize and pixels

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        with torch.no_grad():
            self.fake_features.append(self.inception(as_uint8(images)).double().flatten(1))
        self.real_features.append(self._real_features(as_uint8(batch.image), batch.ids).double().flatten(1))

    def compute(self) -> Tensor:
        n = min(sum(len(f) for f in self.real_features), sum(len(f) for f in self.fake_features)) \
            if isinstance(self.real_features, list) else min(len(self.real_features), len(self.fake_features))
        if n < 2:
            raise ValueError(f"kid needs at least 2 real and 2 generated samples, got {n}")
        self.subset_size = min(self.max_subset_size, n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.SEED)
            mean, _std = KernelInceptionDistance.compute(self)
        return mean.float()
