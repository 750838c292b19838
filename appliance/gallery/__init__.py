"""The face gallery: durable subjects and embeddings (SQLite), in-memory search, open-set
identification, verification and snapshots. Knows nothing of HTTP; the API calls it
through an executor (every method may block on disk or on a lock)."""

from appliance.gallery.errors import (
    ExternalIdExists,
    FaceNotFound,
    GalleryError,
    InvalidEmbedding,
    InvalidSubject,
    RecognizerMismatch,
    SnapshotInvalid,
    SubjectExists,
    SubjectNotFound,
)
from appliance.gallery.gallery import Gallery
from appliance.gallery.records import (
    BulkSubject,
    FaceRecord,
    Identification,
    Match,
    NewFace,
    Recognizer,
    Subject,
    Verification,
)

__all__ = [
    "BulkSubject",
    "ExternalIdExists",
    "FaceNotFound",
    "FaceRecord",
    "Gallery",
    "GalleryError",
    "Identification",
    "InvalidEmbedding",
    "InvalidSubject",
    "Match",
    "NewFace",
    "Recognizer",
    "RecognizerMismatch",
    "SnapshotInvalid",
    "Subject",
    "SubjectExists",
    "SubjectNotFound",
    "Verification",
]
