"""Typed gallery errors. Each carries a stable `code`; the API maps the classes to HTTP statuses
(not-found -> 404, exists -> 409, the rest -> 400) without the gallery knowing about HTTP."""

from __future__ import annotations


class GalleryError(Exception):
    code = "gallery_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SubjectExists(GalleryError):
    code = "subject_exists"


class ExternalIdExists(GalleryError):
    code = "external_id_exists"


class SubjectNotFound(GalleryError):
    code = "subject_not_found"


class FaceNotFound(GalleryError):
    code = "face_not_found"


class InvalidEmbedding(GalleryError):
    """Wrong dimension, not finite, or all zeros."""

    code = "invalid_embedding"


class InvalidSubject(GalleryError):
    """An empty or over-long subject name, or metadata that is not a JSON object."""

    code = "invalid_subject"


class RecognizerMismatch(GalleryError):
    """Embeddings from one recognizer are meaningless against another's."""

    code = "recognizer_mismatch"


class SnapshotInvalid(GalleryError):
    """The snapshot file is unreadable, of an unknown format, or fails its checksum."""

    code = "snapshot_invalid"
