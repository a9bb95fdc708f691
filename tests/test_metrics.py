"""Metrics against hand-computed cases, reference implementations and the shipped analyzers."""
from __future__ import annotations

import bench.metrics  # noqa: F401  (registers the metrics)
import numpy as np
import pytest
import scipy.linalg
import torch
from bench.datasets.conditions import Canny
from bench.datasets.shapes import COLORS, SHAPES, ShapesWorld, parse_prompt
from bench.metrics.consistency import CannyF1, SegMIoU
from bench.metrics.fd import FDSegnet, frechet_distance
from bench.metrics.prompt_fidelity import PromptFidelity
from safetensors.torch import save_file
from torchmetrics.classification import BinaryF1Score, MulticlassJaccardIndex

from bench.api.types import Batch, collate
from bench.core.registry import METRICS
from bench.proxy.analyzers import (
    SEGNET_PATH,
    config_hash,
    detect_objects,
    load_segnet,
    render_split,
    segnet_config,
    segnet_metadata,
)


def _batch(image: torch.Tensor, prompts: list[str] | None = None, **conditions: torch.Tensor) -> Batch:
    n = image.shape[0]
    return Batch(ids=[str(i) for i in range(n)], image=image, prompts=prompts or [""] * n, conditions=conditions)


@pytest.fixture(scope="module")
def eval_scenes() -> Batch:
    world = ShapesWorld("eval", 64, conditions=("canny",))
    return collate([world[i] for i in range(len(world))])


def test_registered_names_and_directions() -> None:
    expected = {"canny_f1": True, "seg_miou": True, "fd_segnet": False, "prompt_fidelity": True}
    for name, higher in expected.items():
        cls = METRICS.get(name)
        assert cls.name == name and cls.higher_is_better is higher and cls.version
    # A proxy Fréchet distance must never pass for FID.
    # Every "fid*" is a real FID on Inception features: torch-fidelity's legacy protocol or clean-fid's.
    assert sorted(n for n in METRICS.names() if n.startswith("fid")) == ["fid", "fid_clean"]
    assert METRICS.get("fid").weights == ("inception-fid",)
    assert METRICS.get("fid_clean").weights == ("inception-cleanfid",)
    assert "fid" not in (FDSegnet.name + FDSegnet.version).lower()
    assert Canny().version in CannyF1.version


# ------------------------------------------------------------------------------ canny_f1
def test_canny_f1_same_image_is_perfect_and_blank_is_zero(eval_scenes: Batch) -> None:
    batch = eval_scenes.subset(slice(0, 8))
    m = CannyF1()
    m.update(batch.image, batch)
    assert m.compute().item() == pytest.approx(1.0)
    m = CannyF1()
    m.update(torch.ones_like(batch.image), batch)  # a blank image has no edges: tp = 0
    assert m.compute().item() == 0.0


def test_canny_f1_hand_counted(eval_scenes: Batch) -> None:
    batch = eval_scenes.subset(slice(0, 2))
    edges = Canny().edges(batch.image)
    target = edges.clone()
    on = edges.nonzero()
    off = (~edges).nonzero()
    k, extra = 5, 7
    for b, y, x in on[:k]:  # generated image has these edges, the input condition does not: fp
        target[b, y, x] = False
    for b, y, x in off[:extra]:  # input condition has these, the generated image does not: fn
        target[b, y, x] = True
    tp = int(edges.sum()) - k
    batch.conditions["canny"] = target[:, None].float().expand(-1, 3, -1, -1)
    m = CannyF1()
    m.update(batch.image, batch)
    assert m.compute().item() == pytest.approx(2 * tp / (2 * tp + k + extra), abs=1e-6)


def test_canny_f1_matches_torchmetrics_over_several_updates() -> None:
    g = torch.Generator().manual_seed(0)
    m, ref = CannyF1(), BinaryF1Score()
    for _ in range(3):
        # Smoothed noise gives a realistic edge density; the condition is an unrelated random map.
        images = torch.nn.functional.avg_pool2d(torch.rand(4, 3, 36, 36, generator=g), 5, 1)
        cond = (torch.rand(4, 1, 32, 32, generator=g) < 0.2).float().expand(-1, 3, -1, -1)
        m.update(images, _batch(images, canny=cond))
        ref.update(Canny().edges(images).flatten().long(), (cond[:, 0] > 0.5).flatten().long())
    assert m.compute().item() == pytest.approx(ref.compute().item(), abs=1e-6)
    assert 0.0 < m.compute().item() < 1.0


def test_canny_f1_requires_the_condition() -> None:
    with pytest.raises(KeyError, match="canny"):
        CannyF1().update(torch.rand(1, 3, 8, 8), _batch(torch.rand(1, 3, 8, 8)))


# ------------------------------------------------------------------------------ seg_miou
def _label_images(labels: torch.Tensor) -> torch.Tensor:
    """Encode labels in the image so an identity-like segmenter can read them back."""
    return labels[:, None].float().expand(-1, 3, -1, -1)


def _identity_segmenter(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].long()


def test_seg_miou_hand_computed_excludes_absent_classes() -> None:
    target = torch.tensor([[[0, 1], [2, 2]]])
    pred = torch.tensor([[[0, 1], [2, 1]]])
    batch = _batch(torch.zeros(1, 3, 2, 2))
    batch.refs["semantic"] = target
    m = SegMIoU(segmenter=_identity_segmenter)
    m.update(_label_images(pred), batch)
    # IoU: bg 1/1, circle 1/2, square 1/2; triangle absent from both -> excluded (else 0.5 or 0.75).
    assert m.compute().item() == pytest.approx(2 / 3)


def test_seg_miou_matches_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    m, ref = SegMIoU(segmenter=_identity_segmenter), MulticlassJaccardIndex(num_classes=4, average="macro")
    for classes in (4, 3):  # second update lacks class 3 entirely; first one has it
        target = torch.randint(0, classes, (3, 16, 16), generator=g)
        noisy = torch.randint(0, classes, target.shape, generator=g)
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target, noisy)
        batch = _batch(torch.zeros(3, 3, 16, 16))
        batch.refs["semantic"] = target
        m.update(_label_images(pred), batch)
        ref.update(pred, target)
    assert m.compute().item() == pytest.approx(ref.compute().item(), abs=1e-6)
    assert 0.3 < m.compute().item() < 0.9


def test_seg_miou_with_shipped_segnet_on_real_images(eval_scenes: Batch) -> None:
    m = SegMIoU()
    m.update(eval_scenes.image, eval_scenes)
    assert m.compute().item() > 0.85
    m.reset()
    m.update(torch.ones_like(eval_scenes.image), eval_scenes)  # blank canvas: only background right
    assert m.compute().item() < 0.4


# ------------------------------------------------------------------------------------ FD
def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_matches_scipy_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    fake = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g) + 0.5  # correlated, shifted
    real = torch.randn(300, 12, generator=g)
    m = FDSegnet(extractor=lambda x: x)  # identity: the "images" [B,3,2,2] are feature vectors
    for sl in (slice(0, 100), slice(100, 300)):
        m.update(fake[sl].view(-1, 3, 2, 2), _batch(real[sl].view(-1, 3, 2, 2)))
    got = m.compute().item()
    assert got == pytest.approx(_scipy_fd(fake.double().numpy(), real.double().numpy()), rel=1e-5)
    assert got > 1.0


def test_fd_of_identical_sets_is_zero_and_shift_adds_squared_norm() -> None:
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.cov(x.T)
    assert frechet_distance(x.mean(0), s, x.mean(0), s).item() == pytest.approx(0.0, abs=1e-8)
    shift = torch.full((6,), 0.5, dtype=torch.float64)
    assert frechet_distance(x.mean(0) + shift, s, x.mean(0), s).item() == pytest.approx(1.5, abs=1e-8)


def test_fd_segnet_separates_real_from_blank(eval_scenes: Batch) -> None:
    m = FDSegnet()
    m.update(eval_scenes.image, eval_scenes)
    same = m.compute().item()
    m.reset()
    m.update(torch.full_like(eval_scenes.image, 0.5), eval_scenes)
    assert same == pytest.approx(0.0, abs=1e-6)
    assert m.compute().item() > 0.1


# ------------------------------------------------------------------------------- prompts
def test_parse_prompt() -> None:
    assert parse_prompt("a red circle, a blue square and a green triangle") == [
        ("red", "circle"), ("blue", "square"), ("green", "triangle")]
    assert parse_prompt("a red circle above a Cyan square") == [("red", "circle"), ("cyan", "square")]
    assert parse_prompt("a photo") == []


def test_prompt_fidelity_real_scenes_and_blank(eval_scenes: Batch) -> None:
    m = PromptFidelity()
    m.update(eval_scenes.image, eval_scenes)
    assert m.compute().item() > 0.95
    m.reset()
    m.update(torch.ones_like(eval_scenes.image), eval_scenes)
    assert m.compute().item() == 0.0


def test_prompt_fidelity_wrong_shape_or_colour_scores_zero() -> None:
    scene = ShapesWorld("eval", 1).scene(0)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
    (obj,) = scene.objects[:1]
    other_shape = next(s for s in SHAPES if s != obj.shape)
    other_color = next(c for c in COLORS if all(o.color != c for o in scene.objects))
    m = PromptFidelity()
    m.update(image.repeat(2, 1, 1, 1), _batch(image.repeat(2, 1, 1, 1), [
        f"a {obj.color} {other_shape}", f"a {other_color} {obj.shape}"]))
    assert m.compute().item() == 0.0


def test_detector_accuracy_on_eval_scenes() -> None:
    world = ShapesWorld("eval", 200)
    found = total = 0
    for i in range(len(world)):
        scene = world.scene(i)
        seen = {(d.color, d.shape) for d in detect_objects(scene.image)}
        found += sum((o.color, o.shape) in seen for o in scene.objects)
        total += len(scene.objects)
    assert found / total > 0.9


def test_detector_boxes_match_ground_truth() -> None:
    scene = next(s for s in map(ShapesWorld("eval", 50).scene, range(50)) if len(s.objects) == 1)
    (det,) = detect_objects(scene.image)
    assert (det.color, det.shape) == (scene.objects[0].color, scene.objects[0].shape)
    assert np.abs(np.array(det.box) - scene.boxes[0]).max() <= 1.5


# -------------------------------------------------------------------------------- segnet
def test_shipped_segnet_hash_and_accuracy() -> None:
    meta = segnet_metadata(SEGNET_PATH)
    assert meta["config_hash"] == config_hash() and meta["version"]
    assert SEGNET_PATH.stat().st_size < 2_000_000
    net = load_segnet()
    images, labels = render_split("eval", 64)
    m = SegMIoU(segmenter=net)  # a logits-returning module is accepted too
    batch = _batch(images)
    batch.refs["semantic"] = labels
    m.update(images, batch)
    assert m.compute().item() > 0.85
    assert net.features(images).shape == (64, segnet_config()["channels"][-1])


def test_load_segnet_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="bench pretrain --analyzers"):
        load_segnet(tmp_path / "missing.safetensors")
    stale = tmp_path / "stale.safetensors"
    save_file({"w": torch.zeros(1)}, str(stale), metadata={"config_hash": "0" * 16, "version": "old"})
    with pytest.raises(ValueError, match="config_hash"):
        load_segnet(stale)
