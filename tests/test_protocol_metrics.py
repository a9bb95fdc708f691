"""Protocol-faithful metrics (metrics/protocol.py) against hand computations and against the
reference implementations they follow (torchmetrics, kornia, the ControlNet++ save/read path)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import bench.datasets  # noqa: F401  (registers the conditions)
import bench.metrics  # noqa: F401  (registers the metrics)
import numpy as np
import pytest
import torch
from bench.metrics.protocol import (
    MS_SSIM_MIN_SIZE,
    CannyF1CNPP,
    DepthRMSEPerImage,
    SegMIoUIgnore0,
    binary_f1_per_image,
    mmseg_intersect_and_union,
)
from kornia.filters import canny
from PIL import Image
from torch import nn
from torchmetrics.classification import BinaryF1Score
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure
from torchvision.transforms import functional as TF

from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.registry import METRICS
from bench.core.weights import WEIGHTS


def _batch(image: torch.Tensor, start: int = 0, **conditions: torch.Tensor) -> Batch:
    n = image.shape[0]
    return Batch(ids=[f"s{i}" for i in range(start, start + n)], image=image, prompts=[""] * n, conditions=conditions)


def _shapes(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Images with a few flat rectangles (clear edges) plus a little noise, rounded to uint8."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, 3, size, size), 0.2)
    for i in range(n):
        for _ in range(3):
            y0, x0 = torch.randint(0, size - 12, (2,), generator=g).tolist()
            h, w = torch.randint(6, 12, (2,), generator=g).tolist()
            out[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
    out = (out + 0.03 * torch.randn(out.shape, generator=g)).clamp(0, 1)
    return out.mul(255).round().div(255)


def test_new_names_registered_with_versions_naming_the_protocol():
    expect = {"canny_f1_cnpp": "kornia", "depth_rmse_per_image": "per-image", "seg_miou_ignore0": "rzl1-ign255",
              "softedge_ms_ssim": "ms-ssim", "pidinet_ms_ssim": "ms-ssim", "lineart_ms_ssim": "ms-ssim",
              "kid": "poly3"}
    for name, word in expect.items():
        cls = METRICS.get(name)
        assert cls.name == name and cls.version.startswith(f"{name}-v1/") and word in cls.version
    # the old metrics keep their names and versions
    assert METRICS.get("canny_f1").version.startswith("canny_f1-v1/canny-cv2")
    assert METRICS.get("depth_rmse").version.startswith("depth_rmse-v1/")


# ------------------------------------------------------------------------------------ canny
def test_binary_f1_per_image_hand_counted():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    # tp,fp,fn: (1,1,1) -> 2/4; (0,0,2) -> 0; nothing anywhere -> 0 (torchmetrics zero_division); perfect -> 1
    assert binary_f1_per_image(pred, target).tolist() == [0.5, 0.0, 0.0, 1.0]
    for p, t, v in zip(pred, target, binary_f1_per_image(pred, target)):
        assert BinaryF1Score()(p.long(), t.long()).item() == pytest.approx(v.item())


def test_canny_f1_cnpp_hand_case_per_image_not_pooled():
    gt = _shapes(3)
    gen = torch.stack([gt[0], torch.full_like(gt[1], 0.5), torch.full_like(gt[2], 0.5)])
    gt[2] = 0.5  # third ground truth is blank too: no edge on either side -> F1 0
    m = CannyF1CNPP()
    m.update(gen, _batch(gt))
    assert m.sample_scores() == {"s0": 1.0, "s1": 0.0, "s2": 0.0}
    assert m.compute().item() == pytest.approx(1 / 3)


def test_canny_f1_cnpp_matches_torchmetrics_on_kornia_edges():
    gt, gen = _shapes(6, seed=1), _shapes(6, seed=2)
    gen[:3] = (gt[:3] + 0.04 * torch.randn(gt[:3].shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    m = CannyF1CNPP()
    for i in (0, 4):  # two updates
        m.update(gen[i:i + 4], _batch(gt[i:i + 4], start=i))
    scores = []
    for g, t in zip(gen, gt):
        e_pred = canny(g[None].mul(255).round().div(255), 0.1, 0.2)[1]
        e_gt = canny(t[None].mul(255).round().div(255), 0.1, 0.2)[1]
        scores.append(BinaryF1Score()(e_pred.flatten().long(), e_gt.flatten().long()).item())
    assert m.compute().item() == pytest.approx(float(np.mean(scores)), abs=1e-6)
    assert min(scores[:3]) > 0.5 and max(scores) < 1.0  # near copies score high, unrelated images low
    recorded = [m.sample_scores()[f"s{i}"] for i in range(6)]
    assert recorded == pytest.approx(scores)
    pooled = BinaryF1Score()(torch.cat([canny(x.mul(255).round().div(255), 0.1, 0.2)[1].flatten() for x in (gen,)]).long(),
                             torch.cat([canny(x.mul(255).round().div(255), 0.1, 0.2)[1].flatten() for x in (gt,)]).long())
    assert abs(pooled.item() - m.compute().item()) > 1e-3  # per-image mean, not the pooled F1
    assert np.mean(list(m.sample_scores().values())) == pytest.approx(m.compute().item(), abs=1e-6)


def test_kornia_edges_survive_the_controlnetpp_png_roundtrip():
    """eval.py saves `to_pil_image(edges, 'L')` and eval_edge.py reads it back with 255 -> 1."""
    gen = _shapes(2, seed=4)
    ours = CannyF1CNPP().extractor.edges(gen)
    for img, e in zip(gen, ours):
        pil = TF.to_pil_image(img.mul(255).round().byte())
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        x = TF.pil_to_tensor(Image.open(buf)).unsqueeze(0) / 255.0  # eval.py L226
        edge = canny(x, 0.1, 0.2)[1]  # eval.py L228
        back = np.array(TF.to_pil_image(edge[0], "L").convert("RGB").convert("L"))  # L231, eval_edge.py L23
        assert set(np.unique(back)) <= {0, 255}
        assert torch.equal(torch.from_numpy(back == 255), e)


# ------------------------------------------------------------------------------------ depth
def _red_is_depth(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0] * 255


def test_depth_rmse_per_image_hand_computed():
    target = torch.zeros(2, 3, 4, 4)
    gen = torch.zeros(2, 3, 4, 4)
    gen[0] += 3 / 255  # error 3 everywhere -> RMSE 3
    gen[1, :, :2] += 4 / 255  # error 4 on half the pixels -> RMSE sqrt(8)
    m = DepthRMSEPerImage(estimator=_red_is_depth)
    m.update(gen, _batch(torch.zeros(2, 3, 4, 4), depth=target))
    assert m.sample_scores() == pytest.approx({"s0": 3.0, "s1": math.sqrt(8)})
    assert m.compute().item() == pytest.approx((3 + math.sqrt(8)) / 2, rel=1e-6)
    pooled = METRICS.get("depth_rmse")(estimator=_red_is_depth)
    pooled.update(gen, _batch(torch.zeros(2, 3, 4, 4), depth=target))
    assert pooled.compute().item() == pytest.approx(math.sqrt((9 + 8) / 2), rel=1e-6)  # the old number is unchanged


# ------------------------------------------------------------------------------------ segmentation
def _label_images(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, None].float().expand(-1, 3, -1, -1)


def _identity_segmenter(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].long()


def _batch_with_labels(target: torch.Tensor) -> Batch:
    b = _batch(torch.zeros(target.shape[0], 3, *target.shape[1:]))
    b.refs["semantic"] = target
    return b


def test_seg_miou_ignore0_hand_confusion():
    # full label space 0..3; reduce_zero_label: 0 -> ignored, k -> k-1 (3 eval classes)
    target = torch.tensor([[[0, 1, 1], [2, 2, 3]]])
    pred = torch.tensor([[[3, 1, 2], [2, 0, 2]]])
    # kept pixels (label != 0): labels (reduced) 0,0,1,1,2 ; preds (reduced) 0,1,1,-1,1
    # class0: I=1 P=1 L=2 -> U=2 ; class1: I=1 P=3 L=2 -> U=4 ; class2: I=0 P=0 L=1 -> U=1
    m = SegMIoUIgnore0(segmenter=_identity_segmenter, num_classes=4)
    m.update(_label_images(pred), _batch_with_labels(target))
    assert m.area_intersect.tolist() == [1, 1, 0] and m.area_pred.tolist() == [1, 3, 0]
    assert m.area_label.tolist() == [2, 2, 1]
    assert m.compute().item() == pytest.approx((1 / 2 + 1 / 4 + 0) / 3)
    assert m.sample_scores() is None  # pooled: no per-sample values
    assert "rzl1-ign255" in m.version


def test_seg_miou_ignore0_options_in_version_and_ignore_index():
    target = torch.tensor([[[0, 1], [255, 2]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    m = SegMIoUIgnore0(segmenter=_identity_segmenter, num_classes=3, reduce_zero_label=False, ignore_index=255)
    m.update(_label_images(pred), _batch_with_labels(target))
    # 255 dropped; class0 I1 U1, class1 I1 U2, class2 I0 U1
    assert m.compute().item() == pytest.approx((1 + 0.5 + 0) / 3)
    assert "rzl0-ign255" in m.version and m.version != SegMIoUIgnore0.version
    # a class absent from both prediction and label carries no IoU (mmseg nanmean)
    m2 = SegMIoUIgnore0(segmenter=_identity_segmenter, num_classes=5, reduce_zero_label=False)
    m2.update(_label_images(pred), _batch_with_labels(target))
    assert m2.compute().item() == pytest.approx(m.compute().item())


def test_seg_miou_ignore0_logits_drop_the_zero_class():
    target = torch.tensor([[[1, 2]]])
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 0] = 5.0  # the full-space argmax would say "0" everywhere
    logits[0, 1, 0, 0] = 1.0
    logits[0, 2, 0, 1] = 1.0
    m = SegMIoUIgnore0(segmenter=lambda images: logits, num_classes=3)
    m.update(torch.zeros(1, 3, 1, 2), _batch_with_labels(target))
    assert m.compute().item() == pytest.approx(1.0)


def test_mmseg_areas_match_histc_definition():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 6, (3, 8, 8), generator=g)
    label[0, 0] = 255
    pred = torch.randint(0, 5, (3, 8, 8), generator=g)
    inter, p, lab = mmseg_intersect_and_union(pred, label, 5, 255, reduce_zero_label=True)
    # mmseg: the same after the LoadAnnotations reduce_zero_label map, with torch.histc
    lbl = label.clone()
    lbl[lbl == 0] = 255
    lbl = lbl - 1
    lbl[lbl == 254] = 255
    mask = lbl != 255
    pr, lb = pred[mask].float(), lbl[mask].float()
    hist = lambda x: torch.histc(x, bins=5, min=0, max=4).long()  # noqa: E731
    assert torch.equal(inter, hist(pr[pr == lb])) and torch.equal(p, hist(pr)) and torch.equal(lab, hist(lb))


# ------------------------------------------------------------------------------------ MS-SSIM
def _grey(images: torch.Tensor) -> torch.Tensor:
    """A stand-in soft-edge extractor: local gradient magnitude, [B,3,H,W] in [0,1]."""
    x = images.mean(1, keepdim=True)
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    e = torch.nn.functional.pad(gx, (0, 1)) + torch.nn.functional.pad(gy, (0, 0, 0, 1))
    return e.clamp(0, 1).expand(-1, 3, -1, -1)


def test_ms_ssim_matches_torchmetrics_and_records_per_image():
    size = MS_SSIM_MIN_SIZE
    gt, gen = _shapes(3, size, seed=5), _shapes(3, size, seed=6)
    gen[0] = gt[0]
    cls = METRICS.get("softedge_ms_ssim")
    m = cls(extractor=_grey)
    cond = _grey(gt)
    m.update(gen, _batch(gt, hed=cond))
    trunc = lambda x: x[:, :1].mul(255).to(torch.uint8).float().div(255)  # noqa: E731  (to_pil_image, 'L')
    ref = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)
    per = [ref(trunc(_grey(g[None])), trunc(c[None])).item() for g, c in zip(gen, cond)]
    assert m.compute().item() == pytest.approx(float(np.mean(per)), abs=1e-5)
    assert m.sample_scores()["s0"] == pytest.approx(1.0, abs=1e-6)
    assert [m.sample_scores()[f"s{i}"] for i in range(3)] == pytest.approx(per, abs=1e-5)


def test_ms_ssim_refuses_below_its_minimum_size():
    assert MS_SSIM_MIN_SIZE == 176
    small = torch.rand(1, 1, MS_SSIM_MIN_SIZE - 1, MS_SSIM_MIN_SIZE - 1)
    with pytest.raises(ValueError):  # torchmetrics itself refuses 175 px
        MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)(small, small)
    m = METRICS.get("lineart_ms_ssim")(extractor=_grey)
    img = torch.rand(1, 3, MS_SSIM_MIN_SIZE - 1, MS_SSIM_MIN_SIZE + 10)
    with pytest.raises(ConfigError, match="at least 176x176") as e:
        m.update(img, _batch(img, lineart=img))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ clean-fid
class _StandInLayers(nn.Module):
    """A tiny stand-in for the torchscript Inception's `layers`: [B,3,299,299] -> [B,2048] with 8
    informative dims (so 2048-d covariances of a few images stay well defined)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.tanh(self.conv(x)).mean((2, 3))
        return torch.cat([f, torch.zeros(f.shape[0], 2040, dtype=f.dtype)], 1)


class _StandInInception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _StandInLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def _save_png_folder(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im.mul(255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


def test_fid_clean_matches_clean_fid_compute_fid_on_the_same_folders(tmp_path, monkeypatch):
    from bench.metrics.fid_clean import FIDClean
    from cleanfid import fid as cleanfid

    root = tmp_path / "weights"
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(root))
    monkeypatch.setenv("CONTROLBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="missing weight 'inception-cleanfid'"):
        FIDClean()
    path = root / WEIGHTS.get("inception-cleanfid").relpath
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.jit.script(_StandInInception()).save(str(path))

    metric = FIDClean()  # through clean-fid's own InceptionV3W(download=False)
    assert path.name in metric.version and metric.version.startswith("fid_clean-v1/clean-fid")
    g = torch.Generator().manual_seed(7)
    real = torch.rand(12, 3, 40, 40, generator=g)
    fake = (torch.rand(12, 3, 40, 40, generator=g) * 0.7 + 0.2).clamp(0, 1)
    for i in (0, 8):
        ids = [f"e{j}" for j in range(i, min(i + 8, 12))]
        metric.update(fake[i:i + 8], Batch(ids=ids, image=real[i:i + 8], prompts=[""] * len(ids)))
    ours = metric.compute().item()

    _save_png_folder(real, tmp_path / "real")
    _save_png_folder(fake, tmp_path / "fake")
    from cleanfid.inception_torchscript import InceptionV3W
    model = InceptionV3W(str(path.parent), download=False).eval()
    ref_feats = cleanfid.get_folder_features(str(tmp_path / "fake"), model, num_workers=0, batch_size=8,
                                             device=torch.device("cpu"), mode="clean", verbose=False)
    assert np.allclose(torch.cat(metric.fake_features).numpy(), ref_feats, atol=1e-5)
    ref = cleanfid.compute_fid(str(tmp_path / "real"), str(tmp_path / "fake"), mode="clean", num_workers=0,
                               batch_size=8, device=torch.device("cpu"), custom_feat_extractor=model,
                               verbose=False, use_dataparallel=False)
    assert ours == pytest.approx(float(ref), rel=1e-4, abs=1e-6)
    assert ours > 0 and metric.sample_scores() is None


def test_fid_clean_refuses_a_file_that_is_not_torchscript(tmp_path, monkeypatch):
    from bench.metrics.fid_clean import FIDClean

    root = tmp_path / "weights"
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(root))
    path = root / WEIGHTS.get("inception-cleanfid").relpath
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match="not clean-fid's torchscript Inception"):
        FIDClean()


# ------------------------------------------------------------------------------------ shipped evaluators
@pytest.fixture(scope="module")
def eval_scenes() -> Batch:
    from bench.datasets.shapes import ShapesWorld

    from bench.api.types import collate

    world = ShapesWorld("eval", 32, conditions=("canny", "depth"))
    return collate([world[i] for i in range(len(world))])


def test_protocol_metrics_with_shipped_evaluators_on_real_images(eval_scenes: Batch) -> None:
    real, blank = eval_scenes.image, torch.ones_like(eval_scenes.image)
    canny_m = CannyF1CNPP()
    canny_m.update(real, eval_scenes)
    assert canny_m.compute().item() == pytest.approx(1.0)  # every eval scene has edges
    drawn = canny_m.reextract(real, eval_scenes)
    assert drawn.shape == real.shape and set(drawn.unique().tolist()) <= {0.0, 1.0}

    seg = SegMIoUIgnore0()
    assert seg.version == SegMIoUIgnore0.version
    seg.update(real, eval_scenes)
    good = seg.compute().item()
    seg.reset()
    seg.update(blank, eval_scenes)
    assert good > 0.85 and seg.compute().item() < good - 0.3  # background no longer scores

    depth = DepthRMSEPerImage()
    depth.update(real, eval_scenes)
    pooled = METRICS.get("depth_rmse")()
    pooled.update(real, eval_scenes)
    per_image = depth.sample_scores()
    assert len(per_image) == len(eval_scenes) and np.mean(list(per_image.values())) == pytest.approx(
        depth.compute().item(), rel=1e-5)
    assert depth.compute().item() <= pooled.compute().item() + 1e-4  # mean of roots <= root of mean (Jensen)
