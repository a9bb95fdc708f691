"""insightface's antelopev2 pack, as InstantID uses it, without insightface: SCRFD face detection
with 5 keypoints, ArcFace embeddings (onnxruntime), and InstantID's `draw_kps`.

Core, not methods/: InstantID encodes its references with it (methods/instantid.py), and the
`face_kps` condition (datasets/identity.py) draws the keypoints of real face images with it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.core.optional import require
from bench.core.weights import WeightSpec, register_weight, weight_path

# InstantID: infer.py `FaceAnalysis(name='antelopev2', ...)`, `app.prepare(ctx_id=0, det_size=(640, 640))`.
ANTELOPEV2 = register_weight(WeightSpec(
    "insightface-antelopev2", "insightface/models/antelopev2", is_dir=True,
    how="download insightface's antelopev2 pack (scrfd_10g_bnkps.onnx, glintr100.onnx, ...) as InstantID's README "
        "says and put its .onnx files in that directory"))
DET_SIZE = (640, 640)  # InstantID infer.py det_size
DET_THRESH, NMS_THRESH = 0.5, 0.4  # insightface FaceAnalysis.prepare(det_thresh=0.5), SCRFD.nms_threshold
SCRFD_STRIDES, SCRFD_ANCHORS = (8, 16, 32), 2  # scrfd.py `_init_vars` for a model with 9 outputs (bnkps)


def _session(path: Path):
    ort = require("onnxruntime")

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _nms(dets: "np.ndarray", thresh: float) -> list[int]:
    """scrfd.py `nms`: greedy by score, +1 pixel areas, drop overlaps above `thresh`."""
    import numpy as np

    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort()[::-1], []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        order = order[np.where(inter / (areas[i] + areas[order[1:]] - inter) <= thresh)[0] + 1]
    return keep


class AntelopeEncoder(nn.Module):
    """InstantID's face encoder: insightface's antelopev2 pack run with onnxruntime, mirroring
    `FaceAnalysis.get` (insightface is not a dependency): SCRFD detection (model_zoo/scrfd.py) of
    the largest face, ArcFace (arcface_onnx.py) on its `norm_crop`, the raw `embedding` (InstantID
    feeds `face_info['embedding']`, not the normalised one; infer.py takes the largest face).
    Images are RGB, so the networks' `swapRB=True` (they were given cv2's BGR) is already done.
    A reference without a detected face gets the zero embedding, CFG's unconditional input.
    """

    def __init__(self, detector, recognizer, model_id: str):
        super().__init__()
        self.detector, self.recognizer, self.model_id = detector, recognizer, model_id
        self.dim = int(recognizer.get_outputs()[0].shape[-1])

    @classmethod
    def from_dir(cls, directory: Path, model_id: str) -> "AntelopeEncoder":
        """model_zoo.py's routing: a detector has >= 5 outputs, a recognizer a square >= 112 input."""
        from bench.core.errors import ConfigError

        detector = recognizer = None
        files = {}
        for path in sorted(Path(directory).glob("*.onnx")):
            session = _session(path)
            shape = session.get_inputs()[0].shape
            if len(session.get_outputs()) >= 5:
                detector = detector or session
                files.setdefault("detector", path)
            elif shape[2] == shape[3] and isinstance(shape[2], int) and shape[2] >= 112 and shape[2] % 16 == 0:
                recognizer = recognizer or session
                files.setdefault("recognizer", path)
        if detector is None or recognizer is None or len(detector.get_outputs()) != 9:
            raise ConfigError(f"{directory}: expected an insightface pack with an SCRFD detector with keypoints "
                              "(9 outputs) and an ArcFace recognizer (square input >= 112)")
        encoder = cls(detector, recognizer, model_id)
        encoder.weight_files = (files["detector"], files["recognizer"])  # its weights, for the feature cache's key
        return encoder

    @classmethod
    def from_weight(cls, name: str) -> "AntelopeEncoder":
        return cls.from_dir(weight_path(name), name)

    def detect(self, image: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
        """scrfd.py `detect`: letterbox into DET_SIZE, decode every stride, NMS. -> ([F, 5] boxes with
        scores, [F, 5, 2] keypoints) in image pixels."""
        import cv2
        import numpy as np

        (w_in, h_in), (h, w) = DET_SIZE, image.shape[:2]
        new_h, new_w = (h_in, int(h_in / (h / w))) if h / w > h_in / w_in else (int(w_in * h / w), w_in)
        scale = new_h / h
        canvas = np.zeros((h_in, w_in, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.detector.run(None, {self.detector.get_inputs()[0].name: blob})
        boxes, kpss = [], []
        for i, stride in enumerate(SCRFD_STRIDES):
            scores = outs[i].reshape(-1)
            dist, kps = outs[i + 3].reshape(-1, 4) * stride, outs[i + 6].reshape(-1, 10) * stride
            grid = np.stack(np.mgrid[:h_in // stride, :w_in // stride][::-1], axis=-1).reshape(-1, 2) * stride
            centers = np.repeat(grid, SCRFD_ANCHORS, axis=0).astype(np.float32)  # anchors of a cell side by side
            keep = scores >= DET_THRESH
            c, d = centers[keep], dist[keep]
            boxes.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3],
                                   scores[keep]], axis=-1))
            kpss.append((c[:, None] + kps[keep].reshape(-1, 5, 2)))
        dets, kpss = np.concatenate(boxes), np.concatenate(kpss)
        dets[:, :4] /= scale
        kpss = kpss / scale
        order = dets[:, 4].argsort()[::-1]
        keep = _nms(dets[order], NMS_THRESH)
        return dets[order][keep], kpss[order][keep]

    def embed_face(self, image: "np.ndarray", kps: "np.ndarray") -> "np.ndarray":
        """arcface_onnx.py `get`: norm_crop to 112, (x - 127.5) / 127.5 (the pack's models are not
        mxnet exports with their own Sub/Mul), the raw network output."""
        from bench.faces.align import arcface_crop

        crop = arcface_crop(image, kps, self.recognizer.get_inputs()[0].shape[2]).astype("float32")
        blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
        return self.recognizer.run(None, {self.recognizer.get_inputs()[0].name: blob})[0][0]

    def face(self, image: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"] | None:
        """(raw embedding, 5 keypoints) of the largest face (InstantID infer.py), or None."""
        dets, kpss = self.detect(image)
        if not len(dets):
            return None
        i = int(((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])).argmax())
        return self.embed_face(image, kpss[i]), kpss[i]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[M, 3, H, W] in [0, 1] -> raw ID embeddings [M, dim] (zeros where no face is found)."""
        out = torch.zeros(len(images), self.dim)
        for i, im in enumerate(images):
            found = self.face((im.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
            if found is not None:
                out[i] = torch.from_numpy(found[0])
        return out.to(images.device)


def draw_kps(size: tuple[int, int], kps, colors=((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))):
    """InstantID's `draw_kps` (pipeline_stable_diffusion_xl_instantid.py): limbs from each eye and
    mouth corner to the nose as filled ellipses 4 px wide in the outer point's colour, dimmed to
    60%, then 10 px discs at the points. -> uint8 [h, w, 3] RGB for `size` (w, h)."""
    import math

    import cv2
    import numpy as np

    kps = np.asarray(kps)
    out = np.zeros([size[1], size[0], 3])
    for a, b in ((0, 2), (1, 2), (3, 2), (4, 2)):
        (xa, ya), (xb, yb) = kps[a], kps[b]
        length = ((xa - xb) ** 2 + (ya - yb) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), 4), int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), poly, colors[a])
    out = (out * 0.6).astype(np.uint8)
    for (x, y), color in zip(kps, colors):
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, color, -1)
    return out
