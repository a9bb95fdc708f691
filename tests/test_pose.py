"""Pose: OKS/PCK by hand, backends' loading code (rtmlib on a tiny exported ONNX model, mmpose's
missing-package error) and mediapipe on skimage's astronaut when the `pose` extra is installed."""
from __future__ import annotations

import importlib.util

import bench.datasets  # noqa: F401  (registers)
import numpy as np
import pytest
import torch
from bench.datasets.pose import (
    COCO_SIGMAS,
    DWPOSE,
    MMPose,
    RtmlibPose,
    draw_skeleton,
    oks,
    pck,
)

from bench.core.errors import ConfigError

HAS_MEDIAPIPE = importlib.util.find_spec("mediapipe") is not None


def person(seed=0):
    rng = np.random.default_rng(seed)
    kp = np.concatenate([rng.uniform(20, 120, (17, 2)), np.full((17, 1), 2.0)], 1)
    kp[3, 2] = 0  # one unlabeled keypoint
    return kp.astype(np.float32)


def test_oks_is_one_on_itself_and_drops_monotonically():
    gt = person()
    assert oks(gt, gt) == 1.0
    scores = [oks(gt + np.array([d, 0, 0], np.float32), gt) for d in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip([1.0] + scores, scores)), scores
    vis = gt[:, 2] > 0  # by hand: COCO formula, scale = area of the visible keypoints' box
    w, h = np.ptp(gt[vis, 0]), np.ptp(gt[vis, 1])
    by_hand = np.mean([np.exp(-16 / (2 * w * h * (2 * s) ** 2)) for s, v in zip(COCO_SIGMAS, vis) if v])
    assert scores[2] == pytest.approx(by_hand, rel=1e-6)
    missed = gt.copy()
    missed[:, 2] = 0  # a prediction that found nothing scores 0, wherever its zeros lie
    assert oks(missed, gt) == 0.0 and np.isnan(oks(gt, missed))


def test_pck_hand_computed():
    gt = np.zeros((17, 3), np.float32)
    gt[:4] = [[0, 0, 2], [100, 0, 2], [100, 50, 2], [0, 50, 1]]  # box 100 x 50 -> threshold 0.1 * 100 = 10
    pred = gt.copy()
    pred[1, 0] += 5
    pred[2, 1] += 10  # on the threshold counts
    pred[3, 0] += 11
    assert pck(pred, gt, alpha=0.1) == 0.75
    pred[0, 2] = 0  # not found
    assert pck(pred, gt, alpha=0.1) == 0.5
    assert pck(pred, gt, alpha=0.2) == 0.75


def test_skeleton_drawing():
    canvas = draw_skeleton(person(), 128, 128)
    assert canvas.shape == (128, 128, 3) and canvas.dtype == np.uint8 and canvas.any()
    assert not draw_skeleton(np.zeros((17, 3), np.float32), 64, 64).any()


class SimCC(torch.nn.Module):
    """A random conv net whose SimCC outputs peak at the input centre (bins 2*96, 2*128)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 17, 3, stride=8, padding=1)
        self.x = torch.nn.Parameter(torch.nn.functional.one_hot(torch.full((1, 17), 192), 384).float())
        self.y = torch.nn.Parameter(torch.nn.functional.one_hot(torch.full((1, 17), 256), 512).float())

    def forward(self, image):
        f = 1e-3 * self.conv(image).mean((2, 3)).sigmoid()[..., None]  # > 0: scores clip to 1
        return self.x + f, self.y + f


def test_rtmlib_backend_loads_local_onnx(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the pose extra (onnxruntime) is not installed")
    pytest.importorskip("rtmlib", reason="rtmlib is not installed (pip install --no-deps rtmlib)")
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    backend = RtmlibPose("rtmpose-test", DWPOSE, (192, 256))
    image = np.full((120, 90, 3), 128, np.uint8)
    with pytest.raises(ConfigError, match="dw-ll_ucoco_384.onnx not found; download"):
        backend.keypoints(image)  # the preflight error, before rtmlib could try a download
    path = tmp_path / DWPOSE.relpath
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.onnx.export(SimCC(), torch.rand(1, 3, 256, 192), str(path), input_names=["input"],
                      output_names=["simcc_x", "simcc_y"], dynamo=False)
    kp = backend.keypoints(image)
    assert kp.shape == (17, 3) and kp.dtype == np.float32
    np.testing.assert_allclose(kp[:, :2], np.tile([[45.0, 60.0]], (17, 1)), atol=1e-3)  # the image centre
    assert (kp[:, 2] == 1).all()  # scores clipped to [0, 1]


def test_mmpose_missing_is_one_line(tmp_path, monkeypatch):
    if importlib.util.find_spec("mmpose") is not None:
        pytest.skip("mmpose is installed")
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    with pytest.raises(ConfigError, match="mmpose-body"):
        MMPose().keypoints(np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "pose/mmpose").mkdir(parents=True)
    (tmp_path / "pose/mmpose/config.py").write_text("")
    with pytest.raises(ConfigError, match=r"the mmpose pose backend needs mmpose: mim install mmcv mmpose") as e:
        MMPose().keypoints(np.zeros((8, 8, 3), np.uint8))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not HAS_MEDIAPIPE, reason="mediapipe (the pose extra) is not installed")
def test_mediapipe_finds_the_astronaut_and_pose_metrics_score_one():
    import bench.metrics  # noqa: F401  (registers)
    from bench.datasets.pose import POSE_BACKENDS
    from skimage.data import astronaut

    from bench.api.types import Batch
    from bench.core.registry import CONDITIONS, METRICS

    image = astronaut()
    kp = POSE_BACKENDS.get("mediapipe").keypoints(image)
    assert kp.shape == (17, 3) and (kp[:, 2] > 0.3).sum() >= 7
    assert kp[0, 1] < min(kp[11, 1], kp[12, 1])  # nose above the hips
    assert kp[5, 0] > kp[6, 0]  # facing the camera: her left shoulder is on the image's right
    assert np.array_equal(kp, POSE_BACKENDS.get("mediapipe").keypoints(image))

    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).unsqueeze(0)
    cond = CONDITIONS.get("pose")(x)
    assert cond.shape == x.shape and cond.max() > 0
    batch = Batch(ids=["a"], image=x, prompts=["an astronaut"], conditions={"pose": cond})
    for name in ("pose_oks", "pose_pck"):
        metric = METRICS.get(name)()
        metric.update(x, batch)
        assert metric.compute().item() == pytest.approx(1.0)
    blank = METRICS.get("pose_oks")()
    blank.update(torch.zeros_like(x), Batch(ids=["a"], image=x, prompts=["x"], conditions={"pose": cond},
                                            refs={"keypoints": [torch.from_numpy(kp)]}))
    assert blank.compute().item() == 0.0  # no body in a black image
