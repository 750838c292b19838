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


def similarity_transforms(src: FloatArray, dst: FloatArray) -> npt.NDArray[np.float64]:
    """`similarity_transform` for every face at once: src (N, K, 2), dst (K, 2) -> (N, 2, 3).

    The same Umeyama arithmetic with batched SVDs, so a crowd costs one numpy call per step
    instead of one per face.
    """
    points = np.asarray(src, np.float64).reshape(-1, dst.shape[0], 2)
    target = np.asarray(dst, np.float64)
    n_points = points.shape[1]
    src_mean = points.mean(axis=1)  # (N, 2)
    dst_mean = target.mean(axis=0)  # (2,)
    src_c = points - src_mean[:, None, :]
    dst_c = target - dst_mean
    cov = np.einsum("kd,nke->nde", dst_c, src_c) / n_points  # (N, 2, 2): dst_c.T @ src_c
    u, s, vt = np.linalg.svd(cov)
    d = np.ones((points.shape[0], 2))
    d[np.linalg.det(cov) < 0, -1] = -1.0  # keep a rotation, never a reflection
    rotation = u @ (d[:, :, None] * vt)
    src_var = (src_c**2).sum(axis=(1, 2)) / n_points
    scale = np.where(src_var > 0, (s * d).sum(axis=1) / np.where(src_var > 0, src_var, 1), 1.0)
    translation = dst_mean - scale[:, None] * np.einsum("nij,nj->ni", rotation, src_mean)
    matrices = np.empty((points.shape[0], 2, 3), np.float64)
    matrices[:, :, :2] = scale[:, None, None] * rotation
    matrices[:, :, 2] = translation
    return matrices


def align_faces(img: ImageArray, landmarks: FloatArray, size: int = CROP_SIZE) -> ImageArray:
    """All faces of one image: landmarks (N, 5, 2) -> (N, size, size, 3) BGR crops.

    One batched transform estimate; each warp writes straight into its row of the result,
    which is the recognizer's input as it is (uint8 NHWC).
    """
    count = landmarks.shape[0]
    crops = np.empty((count, size, size, 3), np.uint8)
    if count == 0:
        return crops
    template = ARCFACE_TEMPLATE * (size / CROP_SIZE)
    for crop, matrix in zip(crops, similarity_transforms(landmarks, template), strict=True):
        cv2.warpAffine(img, matrix, (size, size), dst=crop, borderValue=0.0)
    return crops
