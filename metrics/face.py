"""Face identity: face-embedding backends, InstantID-style 5 keypoints, and the `id_sim` metric.

A `FaceBackend` detects faces in a uint8 [H,W,3] RGB image and embeds one face as a unit vector.
Each backend has one documented alignment, named in its `version`:
- `dlib`: HOG detector (upsample 1, detections scoring below 0.5 dropped), dlib's 5-point
  predictor, `dlib.get_face_chip` at 150 px with padding 0.25 (the crop dlib's ResNet was
  trained on), 128-d `face_recognition_model_v1` descriptor. The weights ship with the
  `face-recognition-models` package.
- `insightface`: an ArcFace ONNX model (the 3x112x112-input model of a local pack, run with
  onnxruntime; insightface's FaceAnalysis is not used because it may download). Detection reuses
  the dlib HOG detector; the 5 ArcFace points (eye centres, nose tip, mouth corners) come from
  dlib's 68 landmarks, and the face is warped to 112x112 by the least-squares similarity
  transform onto insightface's `arcface_dst` template (what insightface's `norm_crop` does);
  input is RGB, (x - 127.5) / 127.5.
  Default pack: buffalo_l (w600k_r50). InstantID encodes faces with antelopev2 (glintr100), so scoring
  with buffalo_l keeps the evaluator a different network from that method's encoder.
- `proxy`: the identity world's learned `id_evaluator` (bench/proxy/recognizers.py); `detect` returns
  the whole image as one face. The `id_sim_proxy` metric uses it; no method encodes with it.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from bench.datasets.conditions import to_uint8
from bench.metrics.base import BenchMetric
from bench.metrics.fid import fingerprint
from torch import Tensor

from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.registry import METRICS, Registry
from bench.core.weights import WeightSpec, register_weight, weight_path
from bench.faces.align import ARCFACE_DST, arcface_crop, similarity_transform  # noqa: F401  (re-exported)
from bench.proxy.recognizers import ID_EVALUATOR
from bench.core.optional import missing_message, require

register_weight(WeightSpec("insightface-buffalo_l", "insightface/models/buffalo_l", is_dir=True,
                           how="download https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip "
                               "and unzip its .onnx files into that directory (or copy ~/.insightface/models/buffalo_l)"))

HOG_UPSAMPLE, HOG_MIN_SCORE = 1, 0.5  # score > 0 is dlib's boundary; the margin drops HOG false positives


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom in pixels
    landmarks: np.ndarray  # [K,2] (x, y): the backend's alignment points
    score: float = 0.0

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


class FaceBackend(ABC):
    name: str
    version: str  # detector + alignment + recognizer
    model_id: str  # the recognizer's identity, a metric's evaluator id
    weights: tuple[str, ...] = ()

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """image: uint8 [H,W,3] RGB."""

    @abstractmethod
    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """A unit-norm 1-D float embedding of `face` in `image`."""

    def embedding(self, image: np.ndarray) -> np.ndarray | None:
        """The largest face's embedding, or None when no face is found."""
        faces = self.detect(image)
        return self.embed(image, max(faces, key=lambda f: f.area)) if faces else None


FACE_BACKENDS: Registry = Registry("face backend")


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return v / np.linalg.norm(v)


def _dlib():
    return require("dlib")


def dlib_model(filename: str) -> str:
    """A model file of `face-recognition-models`, found without importing it (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    path = Path(spec.submodule_search_locations[0]) / "models" / filename if spec else None
    if path is None or not path.is_file():
        raise ConfigError(missing_message("face_recognition_models", f"no {filename}"))
    return str(path)


@lru_cache(maxsize=None)
def _dlib_model(kind: str):
    dlib = _dlib()
    if kind == "hog":
        return dlib.get_frontal_face_detector()
    if kind == "resnet":
        return dlib.face_recognition_model_v1(dlib_model("dlib_face_recognition_resnet_model_v1.dat"))
    return dlib.shape_predictor(dlib_model(f"shape_predictor_{kind}_face_landmarks.dat"))


def _hog(image: np.ndarray) -> list:
    rects, scores, _ = _dlib_model("hog").run(np.ascontiguousarray(image), HOG_UPSAMPLE, HOG_MIN_SCORE)
    return list(zip(rects, scores))


def _box(rect) -> tuple[int, int, int, int]:
    return rect.left(), rect.top(), rect.right(), rect.bottom()


def _points(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def _kps5(image: np.ndarray, rect) -> np.ndarray:
    # 68-point groups: image-left eye 36-41, image-right eye 42-47, nose tip 30, mouth corners 48, 54
    p = _points(_dlib_model("68")(image, rect))
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


def face_keypoints_5(image: np.ndarray) -> np.ndarray | None:
    """InstantID's 5 keypoints [5,2] (x, y) of the largest face in a uint8 RGB image, in
    insightface order (image-left eye, image-right eye, nose tip, mouth left, mouth right); None if no face."""
    image = np.ascontiguousarray(image)
    found = _hog(image)
    if not found:
        return None
    rect = max(found, key=lambda rs: rs[0].area())[0]
    return _kps5(image, rect)


@FACE_BACKENDS.register("dlib")
class DlibBackend(FaceBackend):
    model_id = "dlib-resnet-face-v1"
    version = f"{model_id}/hog-up{HOG_UPSAMPLE}-t{HOG_MIN_SCORE}/sp5-face-chip-150px-pad0.25"

    def detect(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image)
        return [Face(_box(r), _points(_dlib_model("5")(image, r)), float(s)) for r, s in _hog(image)]

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        dlib = _dlib()
        shape = dlib.full_object_detection(dlib.rectangle(*face.box),
                                           [dlib.point(int(x), int(y)) for x, y in face.landmarks])
        chip = dlib.get_face_chip(np.ascontiguousarray(image), shape, size=150, padding=0.25)
        return _unit(_dlib_model("resnet").compute_face_descriptor(chip))


@FACE_BACKENDS.register("insightface")
class InsightFaceBackend(FaceBackend):
    model_id = "insightface-buffalo_l"
    alignment = f"dlib-hog-up{HOG_UPSAMPLE}-t{HOG_MIN_SCORE}+68pt-kps5/arcface-112-similarity/rgb-m127.5-s127.5"

    def __init__(self, pack: str = "insightface-buffalo_l") -> None:
        ort = require("onnxruntime")
        directory = weight_path(pack)
        for path in sorted(directory.glob("*.onnx")):
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            if list(session.get_inputs()[0].shape[1:]) == [3, 112, 112]:  # insightface's test for a recognizer
                break
        else:
            raise ConfigError(f"no ArcFace recognition model (.onnx with input 3x112x112) in {directory}; "
                              f"weight {pack!r} expects an insightface model pack there")
        self.session, self.input = session, session.get_inputs()[0].name
        self.weights = (pack,)
        self.model_id = f"{pack}/{path.stem}"
        self.version = f"{self.model_id}@{fingerprint(path)}/{self.alignment}"

    def detect(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image)
        return [Face(_box(r), _kps5(image, r), float(s)) for r, s in _hog(image)]

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        crop = arcface_crop(np.ascontiguousarray(image), face.landmarks).astype(np.float32)
        blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
        return _unit(self.session.run(None, {self.input: np.ascontiguousarray(blob)})[0][0])


@FACE_BACKENDS.register("proxy")
class ProxyBackend(FaceBackend):
    """The identity world's `id_evaluator` (bench/proxy/recognizers.py), a recognizer no method uses.
    Proxy images are single-subject scenes: `detect` returns the whole image as one face, and
    `embed` resizes it to the evaluator's training resolution (INTER_AREA) when it differs."""

    model_id = ID_EVALUATOR.model_id
    version = f"{model_id}/whole-image-{ID_EVALUATOR.recipe['resolution']}px"

    def __init__(self) -> None:
        self.net = ID_EVALUATOR.load()
        self.resolution = ID_EVALUATOR.recipe["resolution"]

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        return [Face((0, 0, w, h), np.zeros((0, 2), np.float32), 1.0)]

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        import cv2

        left, top, right, bottom = face.box
        crop = np.ascontiguousarray(image[top:bottom, left:right])
        if crop.shape[:2] != (self.resolution, self.resolution):
            crop = cv2.resize(crop, (self.resolution, self.resolution), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(crop).permute(2, 0, 1).float().div(255)[None]
        with torch.no_grad():
            return _unit(self.net.embed(x)[0].cpu().numpy())


@METRICS.register("id_sim")
class IdSim(BenchMetric):
    """Cosine similarity of face embeddings, generated vs reference (mean over a sample's references),
    averaged over samples with a face in both; plus the fraction of generated images with no face.

    References: batch.refs["reference_images"] (per sample [N,3,H,W] in [0,1]), else batch.image.
    compute() -> {"mean", "no_face_rate"}; mean is nan when nothing was scored.
    """

    higher_is_better = True
    part_higher_is_better = MappingProxyType({"no_face_rate": False})
    condition = None
    backend_name = "dlib"
    version = f"id_sim-v1/{DlibBackend.version}"
    evaluator_ids = (DlibBackend.model_id,)

    def __init__(self, backend: str | FaceBackend | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backend = backend if isinstance(backend, FaceBackend) else FACE_BACKENDS.get(backend or self.backend_name)()
        self.version = f"id_sim-v1/{self.backend.version}"
        self.evaluator_ids = (self.backend.model_id,)
        self.add_state("sim_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for state in ("scored", "no_face", "seen"):
            self.add_state(state, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        refs = batch.refs.get("reference_images")
        refs = [batch.image[i:i + 1] for i in range(len(batch))] if refs is None else refs
        per_sample, no_face = [], []
        for image, ref in zip(to_uint8(images), refs):
            self.seen += 1
            emb = self.backend.embedding(image)
            no_face.append(float(emb is None))
            per_sample.append(float("nan"))  # no face, or no reference embedding: no value
            if emb is None:
                self.no_face += 1
                continue
            ref = ref if ref.ndim == 4 else ref[None]
            sims = [float(emb @ r) for r in map(self.backend.embedding, to_uint8(ref)) if r is not None]
            if sims:
                per_sample[-1] = float(np.mean(sims))
                self.sim_sum += per_sample[-1]
                self.scored += 1
        self.record_samples(batch.ids, per_sample, part="mean")
        self.record_samples(batch.ids, no_face, part="no_face_rate")

    def compute(self) -> dict[str, Tensor]:
        mean = self.sim_sum / self.scored if self.scored else torch.tensor(float("nan"), dtype=torch.float64)
        return {"mean": mean.float(), "no_face_rate": (self.no_face / self.seen.clamp(min=1)).float()}


@METRICS.register("id_sim_insightface")
class IdSimInsightFace(IdSim):
    """id_sim with the insightface buffalo_l backend; its pack is checked before any compute."""

    backend_name = "insightface"
    version = f"id_sim-v1/{InsightFaceBackend.model_id}/{InsightFaceBackend.alignment}"
    weights = ("insightface-buffalo_l",)
    evaluator_ids = (InsightFaceBackend.model_id,)


@METRICS.register("id_sim_proxy")
class IdSimProxy(IdSim):
    """id_sim on the identity world, scored by the `id_evaluator` recognizer (see ProxyBackend)."""

    backend_name = "proxy"
    version = f"id_sim-v1/{ProxyBackend.version}"
    evaluator_ids = (ProxyBackend.model_id,)
