"""From images to gallery faces through the real pipeline: each image enrols its largest face.

Used by the calibration command, the benchmark and (later) the API's enrolment route.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from appliance.gallery.records import NewFace
from appliance.pipeline.faces import AnalyzeOptions, Face, FaceAnalyzer
from appliance.pipeline.images import ImageArray

# JPEG quality of kept crops: 112x112 faces stay recognisable for an operator's review.
CROP_JPEG_QUALITY = 90


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box: the subject of an enrolment photo, not a bystander."""
    return max(faces, key=lambda f: f.size, default=None)


def encode_crop(crop: ImageArray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, CROP_JPEG_QUALITY])
    if not ok:  # pragma: no cover - a 112x112 uint8 image always encodes
        raise ValueError("cannot encode the face crop")
    return bytes(buf.tobytes())


async def enrolment_face(
    analyzer: FaceAnalyzer, img: ImageArray, threshold: float, keep_crop: bool = False
) -> NewFace | None:
    """The image's largest face as a NewFace (crop only when asked), or None without a face."""
    result = await analyzer.analyze(
        img, AnalyzeOptions(threshold=threshold, return_face_data=keep_crop)
    )
    face = largest_face(result.faces)
    if face is None or face.vec is None:
        return None
    crop = encode_crop(face.crop) if keep_crop and face.crop is not None else None
    return NewFace(np.asarray(face.vec, np.float32), crop)
