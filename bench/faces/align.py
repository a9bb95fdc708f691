"""insightface's ArcFace alignment (utils/face_align.py `norm_crop`), shared by the face metric
(metrics/face.py) and InstantID's antelopev2 encoder (methods/encoders.py)."""
from __future__ import annotations

import numpy as np

ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[2,3] least-squares rotation+scale+translation mapping src points onto dst (Umeyama, no reflection)."""
    x, y = src[:, 0].astype(np.float64), src[:, 1].astype(np.float64)
    one, zero = np.ones_like(x), np.zeros_like(x)
    a = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    (s, r, tx, ty), *_ = np.linalg.lstsq(a, np.concatenate([dst[:, 0], dst[:, 1]]).astype(np.float64), rcond=None)
    return np.array([[s, -r, tx], [r, s, ty]])


def arcface_crop(image: np.ndarray, kps5: np.ndarray, size: int = 112) -> np.ndarray:
    import cv2

    return cv2.warpAffine(image, similarity_transform(kps5, ARCFACE_DST * size / 112), (size, size), borderValue=0.0)
