"""Similarity transform from five detected landmarks to the ArcFace 112x112 template."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]

CROP_SIZE = 112
# Eye centres, nose tip and mouth corners of the 112x112 crops ArcFace models were trained
# on (InsightFace's arcface_dst); embeddings degrade quickly if faces are placed elsewhere.
ARCFACE_TEMPLATE: FloatArray = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def similarity_transform(src: FloatArray, dst: FloatArray) -> npt.NDArray[np.float64]:
    """Least-squares rotation + uniform scale + translation mapping src onto dst (Umeyama).

    Returns the 2x3 matrix for cv2.warpAffine.
    """
    src = src.astype(np.float64)
    dst = dst.astype(np.float64)
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0  # keep a rotation, never a reflection
    rotation = u @ np.diag(d) @ vt
    src_var = (src_c**2).sum() / n
    scale = float((s * d).sum() / src_var) if src_var > 0 else 1.0
    translation = dst_mean - scale * rotation @ src_mean
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = translation
    return matrix


def align_face(img: ImageArray, landmarks: FloatArray, size: int = CROP_SIZE) -> ImageArray:
    """Warp the face with these 5 landmarks onto the template; returns a size x size BGR crop."""
    template = ARCFACE_TEMPLATE * (size / CROP_SIZE)
    matrix = similarity_transform(landmarks, template)
    crop = cv2.warpAffine(img, matrix, (size, size), borderValue=0.0)
    return np.asarray(crop, dtype=np.uint8)
