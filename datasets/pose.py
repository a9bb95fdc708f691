"""Pose backends behind one interface, COCO-17 keypoints, OKS/PCK, and the `pose` condition.

`backend.keypoints(image uint8 [H,W,3] RGB) -> float32 [17,3]` of (x, y, confidence) in pixels,
COCO-17 order; no person gives all zeros. Single person: the most confident body is kept.
- `mediapipe`: legacy `solutions.pose` (model_complexity=1, whose .tflite files ship inside the
  mediapipe 0.10.14 wheel; 0.10.30+ dropped them). Its 33 landmarks map to COCO-17.
- `rtmpose` / `dwpose`: rtmlib's RTMPose on a local ONNX file, the whole image as the person box
  (no detector, so single-person images); DWPose's 133 whole-body keypoints start with COCO-17.
- `openpose`: controlnet-aux's body model (weights as for the `openpose` condition), 18 -> 17.
- `mmpose`: optional, needs mmpose + full mmcv; a one-line error when they are missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import torch
from bench.datasets.conditions import to_uint8

from bench.core.registry import CONDITIONS, Registry
from bench.core.weights import WeightSpec, register_weight, weight_path
from bench.core.optional import require

COCO17 = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
          "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
          "left_ankle", "right_ankle")
# COCO keypoint sigmas (cocoapi pycocotools/cocoeval.py), one per COCO17 entry.
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10
SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
            (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
MEDIAPIPE_TO_COCO = [0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28]
OPENPOSE_TO_COCO = [0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10]
MIN_CONFIDENCE = 0.3  # a keypoint counts as visible above this (COCO ground truth v in {1, 2} passes)

POSE_BACKENDS: Registry = Registry("pose backend")
RTMPOSE = register_weight(WeightSpec(
    "rtmpose-body", "pose/rtmpose-m_simcc-body7_pt-body7_420e-256x192.onnx",
    how="download rtmpose-m body7 256x192 onnx (end2end.onnx in the rtmlib/mmdeploy zip) and save it under this name"))
DWPOSE = register_weight(WeightSpec(
    "dwpose-wholebody", "pose/dw-ll_ucoco_384.onnx",
    how="download dw-ll_ucoco_384.onnx from huggingface.co/yzd-v/DWPose"))
MMPOSE = register_weight(WeightSpec(
    "mmpose-body", "pose/mmpose", is_dir=True,
    how="put an mmpose top-down COCO config as config.py and its checkpoint as checkpoint.pth in this folder"))


@dataclass(frozen=True)
class MediapipePose:
    name: str = "mediapipe"
    weights: tuple[str, ...] = ()  # the wheel ships its .tflite files

    @property
    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"mediapipe{version('mediapipe')}-pose-c1"
        except PackageNotFoundError:  # calling it names the install command
            return "mediapipe-missing-pose-c1"

    @cached_property
    def _pose(self):
        mp = require("mediapipe")
        return mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1, min_detection_confidence=0.5)

    def keypoints(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        found = self._pose.process(np.ascontiguousarray(image)).pose_landmarks
        if found is None:
            return np.zeros((17, 3), np.float32)
        lm = [found.landmark[i] for i in MEDIAPIPE_TO_COCO]
        kp = np.array([[p.x * w, p.y * h, p.visibility] for p in lm], np.float32)
        kp[~((kp[:, 0] >= 0) & (kp[:, 0] < w) & (kp[:, 1] >= 0) & (kp[:, 1] < h)), 2] = 0  # out of frame
        return kp


@dataclass(frozen=True)
class RtmlibPose:
    name: str
    weight: WeightSpec
    input_size: tuple[int, int]  # (w, h) of the ONNX input

    @property
    def weights(self) -> tuple[str, ...]:
        return (self.weight.name,)

    @property
    def version(self) -> str:
        return f"rtmlib-{Path(self.weight.relpath).name}-{self.input_size[0]}x{self.input_size[1]}-wholeimage"

    @cached_property
    def _model(self):
        path = weight_path(self.weight.name)  # checked first: rtmlib downloads a path it cannot find
        require("onnxruntime")
        RTMPose = require("rtmlib").RTMPose
        return RTMPose(str(path), model_input_size=self.input_size, backend="onnxruntime", device="cpu")

    def keypoints(self, image: np.ndarray) -> np.ndarray:
        xy, score = self._model(image[..., ::-1].copy())  # rtmlib follows mmpose: BGR input
        return np.concatenate([xy[0, :17], np.clip(score[0, :17, None], 0, 1)], 1).astype(np.float32)


@dataclass(frozen=True)
class OpenposeBody:
    name: str = "openpose"

    @property
    def weights(self) -> tuple[str, ...]:
        return CONDITIONS.get("openpose").weights

    @property
    def version(self) -> str:
        return f"openpose-body-{CONDITIONS.get('openpose').version}"

    def keypoints(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        poses = CONDITIONS.get("openpose").detector().detect_poses(np.ascontiguousarray(image))
        out = np.zeros((17, 3), np.float32)
        if poses:
            body = max(poses, key=lambda p: p.body.total_score).body.keypoints
            for coco, op in enumerate(OPENPOSE_TO_COCO):
                if body[op] is not None:
                    out[coco] = (body[op].x * w, body[op].y * h, min(max(body[op].score, 0.0), 1.0))
        return out


@dataclass(frozen=True)
class MMPose:
    name: str = "mmpose"
    weights: tuple[str, ...] = (MMPOSE.name,)
    version: str = "mmpose-topdown-wholeimage"

    @cached_property
    def _model(self):
        root = weight_path(MMPOSE.name)
        init_model = require("mmpose.apis").init_model
        return init_model(str(root / "config.py"), str(root / "checkpoint.pth"), device="cpu")

    def keypoints(self, image: np.ndarray) -> np.ndarray:
        model = self._model  # the weight check and the import error come first
        inst = require("mmpose.apis").inference_topdown(model, image[..., ::-1].copy())[0].pred_instances
        return np.concatenate([inst.keypoints[0, :17], inst.keypoint_scores[0, :17, None]], 1).astype(np.float32)


for _backend in (MediapipePose(), RtmlibPose("rtmpose", RTMPOSE, (192, 256)), RtmlibPose("dwpose", DWPOSE, (288, 384)),
                 OpenposeBody(), MMPose()):
    POSE_BACKENDS.register(_backend.name)(_backend)


def _visible_box(gt: np.ndarray, min_conf: float) -> tuple[np.ndarray, np.ndarray]:
    vis = gt[:, 2] > min_conf
    xy = gt[vis, :2]
    return vis, (xy.max(0) - xy.min(0) if vis.any() else np.zeros(2))


def oks(pred: np.ndarray, gt: np.ndarray, min_conf: float = MIN_CONFIDENCE, sigmas: np.ndarray = COCO_SIGMAS) -> float:
    """COCO object keypoint similarity of one person: mean over gt-visible keypoints of
    exp(-d^2 / (2 s^2 k^2)), k = 2 sigma, s^2 = area of the gt-visible keypoints' box (>= 1 px^2).
    A keypoint the prediction did not find (confidence <= min_conf) scores 0. NaN if no gt keypoint is visible."""
    vis, (w, h) = _visible_box(gt, min_conf)
    if not vis.any():
        return float("nan")
    d2 = ((pred[:, :2] - gt[:, :2]) ** 2).sum(1)
    e = np.exp(-d2 / (2 * max(w * h, 1.0) * (2 * sigmas) ** 2)) * (pred[:, 2] > min_conf)
    return float(e[vis].mean())


def pck(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.1, min_conf: float = MIN_CONFIDENCE) -> float:
    """Fraction of gt-visible keypoints predicted within alpha * max(w, h) of the gt-visible box."""
    vis, (w, h) = _visible_box(gt, min_conf)
    if not vis.any():
        return float("nan")
    hit = (np.linalg.norm(pred[:, :2] - gt[:, :2], axis=1) <= alpha * max(w, h)) & (pred[:, 2] > min_conf)
    return float(hit[vis].mean())


def draw_skeleton(kp: np.ndarray, height: int, width: int, min_conf: float = MIN_CONFIDENCE) -> np.ndarray:
    """COCO-17 keypoints -> uint8 [H,W,3] skeleton on black, a fixed colour per limb."""
    canvas = np.zeros((height, width, 3), np.uint8)
    thick = max(1, round(min(height, width) / 128))
    colors = cv2.applyColorMap(np.linspace(0, 255, len(SKELETON)).astype(np.uint8)[:, None], cv2.COLORMAP_HSV)[:, 0]
    for (a, b), color in zip(SKELETON, colors[:, ::-1].tolist()):
        if kp[a, 2] > min_conf and kp[b, 2] > min_conf:
            cv2.line(canvas, tuple(np.round(kp[a, :2]).astype(int)), tuple(np.round(kp[b, :2]).astype(int)), color,
                     thick, cv2.LINE_AA)
    for x, y, c in kp:
        if c > min_conf:
            cv2.circle(canvas, (round(float(x)), round(float(y))), thick + 1, (255, 255, 255), -1, cv2.LINE_AA)
    return canvas


def detect(backend_name: str, images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] float [0,1] -> [B,17,3] keypoints."""
    backend = POSE_BACKENDS.get(backend_name)
    return np.stack([backend.keypoints(im) for im in to_uint8(images)])


@dataclass(frozen=True)
class PoseSkeleton:
    """The `pose` condition: COCO-17 skeleton of the keypoints a pose backend finds."""

    backend: str = "mediapipe"

    @property
    def weights(self) -> tuple[str, ...]:
        return POSE_BACKENDS.get(self.backend).weights

    @property
    def version(self) -> str:
        return f"pose-skeleton-v1/{POSE_BACKENDS.get(self.backend).version}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        maps = [draw_skeleton(kp, h, w) for kp in detect(self.backend, images)]
        return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).float().div(255).to(images.device)


CONDITIONS.register("pose")(PoseSkeleton())
