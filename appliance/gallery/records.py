"""Plain records the gallery hands out; the API turns them into wire types."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclasses.dataclass(frozen=True)
class Recognizer:
    """The model every embedding of a gallery comes from: its registry name and file sha256."""

    name: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    metadata: dict[str, Any]
    external_id: str | None
    created: float
    face_count: int


@dataclasses.dataclass(frozen=True)
class FaceRecord:
    face_id: int
    subject: str
    recognizer: str
    recognizer_sha256: str
    created: float
    has_crop: bool


@dataclasses.dataclass(frozen=True)
class Match:
    subject: str
    similarity: float
    face_id: int


@dataclasses.dataclass(frozen=True)
class Identification:
    """Matches best first (one per subject); `identity` only when the best reaches the
    threshold, else None (an open set: strangers stay unnamed)."""

    matches: tuple[Match, ...]
    identity: str | None
    threshold: float

    @property
    def similarity(self) -> float | None:
        return self.matches[0].similarity if self.matches else None


@dataclasses.dataclass(frozen=True)
class Verification:
    similarity: float
    match: bool
    threshold: float


@dataclasses.dataclass(frozen=True)
class NewFace:
    """One face to enrol: its embedding and, only with GALLERY_KEEP_CROPS, an encoded crop."""

    embedding: FloatArray
    crop_jpeg: bytes | None = None


@dataclasses.dataclass(frozen=True)
class BulkSubject:
    """Bulk enrolment entry: a subject (created when missing) and its faces."""

    subject: str
    faces: tuple[NewFace, ...]
    metadata: dict[str, Any] | None = None
    external_id: str | None = None
