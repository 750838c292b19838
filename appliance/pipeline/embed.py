"""ArcFace pre- and post-processing: pixels in, unit-length 512-d embeddings out."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from appliance.models.registry import Preprocess

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]


def to_blob(images: list[ImageArray] | ImageArray, preprocess: Preprocess) -> FloatArray:
    """BGR HWC uint8 images -> (N, 3, H, W) float32, channel order and scaling as the model wants."""
    batch = np.asarray(images if isinstance(images, np.ndarray) else np.stack(images))
    if batch.ndim == 3:
        batch = batch[None]
    if preprocess.rgb:
        batch = batch[..., ::-1]
    blob = (batch.astype(np.float32) - preprocess.mean) / preprocess.std
    return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))


def normalize(embeddings: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Unit-length rows and the norms they had; the norm is a rough face-quality signal."""
    emb = embeddings.reshape(embeddings.shape[0], -1).astype(np.float32)
    norms = np.linalg.norm(emb, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (emb / safe[:, None]).astype(np.float32), norms.astype(np.float32)
