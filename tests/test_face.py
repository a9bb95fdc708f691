"""Real-face identity: dlib backend on skimage's astronaut, id_sim's no-face accounting, the insightface loader."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

dlib = pytest.importorskip("dlib", reason="needs the face extra: pip install 'controlbench[face]'")
skdata = pytest.importorskip("skimage.data")
if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("needs face-recognition-models (the face extra)", allow_module_level=True)

from bench.metrics import face  # noqa: E402

from bench.api.types import Batch  # noqa: E402
from bench.core.errors import ConfigError  # noqa: E402
from bench.core.weights import needed_weights, preflight  # noqa: E402

ASTRONAUT = skdata.astronaut()
FLIP = np.ascontiguousarray(ASTRONAUT[:, ::-1])


def as_tensor(*images: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1).float() / 255 for i in images])


def batch(image: torch.Tensor, refs: list[torch.Tensor] | None = None) -> Batch:
    n = len(image)
    return Batch(ids=[str(i) for i in range(n)], image=image, prompts=["a photo"] * n,
                 refs={"reference_images": refs} if refs is not None else {})


def id_sim(generated: torch.Tensor, b: Batch, backend="dlib") -> dict[str, float]:
    metric = face.IdSim(backend=backend)
    metric.update(generated, b)
    return {k: float(v) for k, v in metric.compute().items()}


def test_dlib_astronaut_flip_and_keypoints():
    faces = face.DlibBackend().detect(ASTRONAUT)
    assert len(faces) == 1
    out = id_sim(as_tensor(ASTRONAUT), batch(as_tensor(FLIP)))  # no refs: batch.image is the reference
    assert out["mean"] >= 0.9 and out["no_face_rate"] == 0.0
    left, top, right, bottom = faces[0].box
    kps = face.face_keypoints_5(ASTRONAUT)
    assert kps.shape == (5, 2)
    assert ((kps[:, 0] > left) & (kps[:, 0] < right) & (kps[:, 1] > top) & (kps[:, 1] < bottom)).all()
    eye_l, eye_r, nose, mouth_l, mouth_r = kps
    assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])


def test_non_face_counted_not_scored():
    gray = np.full_like(ASTRONAUT, 128)
    coffee = skdata.coffee()[:, 44:556][:400]  # 400x512 crop, no face
    coffee = np.pad(coffee, ((0, 112), (0, 0), (0, 0)))
    pair = id_sim(as_tensor(ASTRONAUT), batch(as_tensor(ASTRONAUT), [as_tensor(FLIP)]))
    mixed = id_sim(as_tensor(ASTRONAUT, coffee), batch(as_tensor(ASTRONAUT, gray), [as_tensor(FLIP), as_tensor(FLIP)]))
    assert mixed["no_face_rate"] == 0.5
    assert mixed["mean"] == pytest.approx(pair["mean"], abs=1e-6)
    none = id_sim(as_tensor(gray), batch(as_tensor(gray)))
    assert none["no_face_rate"] == 1.0 and np.isnan(none["mean"])


def test_dlib_matches_raw_descriptors():
    # face_recognition's own path: HOG(upsample 1), 5-point shape, compute_face_descriptor on the full image
    models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    recognizer = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def descriptor(img):
        rect = max(detector(img, 1), key=lambda r: r.area())
        return np.array(recognizer.compute_face_descriptor(img, predictor(img, rect)))

    a, b = descriptor(ASTRONAUT), descriptor(FLIP)
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert id_sim(as_tensor(ASTRONAUT), batch(as_tensor(FLIP)))["mean"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # from_estimate is skimage >= 0.26 only
def test_arcface_alignment_matches_skimage():
    from skimage.transform import SimilarityTransform

    kps = face.face_keypoints_5(ASTRONAUT)
    reference = SimilarityTransform()
    reference.estimate(kps, face.ARCFACE_DST)  # insightface's norm_crop does exactly this
    np.testing.assert_allclose(face.similarity_transform(kps, face.ARCFACE_DST), reference.params[:2], atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter needs no onnxscript
def test_insightface_loader(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the insightface backend needs onnxruntime")
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (onnx<1.23 keeps protobuf 5)")
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    for build in (face.InsightFaceBackend, face.IdSimInsightFace, lambda: preflight(needed_weights(face.IdSimInsightFace))):
        with pytest.raises(ConfigError) as err:
            build()
        assert str(pack) in str(err.value) and "buffalo_l.zip" in str(err.value) and "\n" not in str(err.value)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(3 * 14 * 14, 512)).eval()
    pack.mkdir(parents=True)
    detector_like = torch.nn.Conv2d(3, 4, 3).eval()  # sorts first; the loader must skip its 64x64 input
    torch.onnx.export(detector_like, (torch.zeros(1, 3, 64, 64),), str(pack / "det_10g.onnx"), dynamo=False)
    torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(pack / "w600k_r50.onnx"), dynamo=False)

    backend = face.InsightFaceBackend()
    assert backend.model_id == "insightface-buffalo_l/w600k_r50"
    faces = backend.detect(ASTRONAUT)
    assert len(faces) == 1 and faces[0].landmarks.shape == (5, 2)
    emb = backend.embed(ASTRONAUT, faces[0])
    assert emb.shape == (512,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-6)
    crop = torch.from_numpy(face.arcface_crop(ASTRONAUT, faces[0].landmarks).astype(np.float32))
    with torch.no_grad():
        expected = net(((crop - 127.5) / 127.5).permute(2, 0, 1)[None])[0].double().numpy()
    np.testing.assert_allclose(emb, expected / np.linalg.norm(expected), atol=1e-5)
    metric = face.IdSimInsightFace()
    assert metric.evaluator_ids == (backend.model_id,) and "w600k_r50@" in metric.version
