"""The `/gallery/*` wire types (docs/GALLERY.md, issue 14's contract), declared once like
`api/wire.py`: the same Structs decode JSON and msgpack bodies, encode the answers and
generate their part of `/openapi.json`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from appliance.api.wire import ExtractRequest, ImageData

SubjectName = Annotated[str, Meta(min_length=1, max_length=200, description="subject name")]
ExternalId = Annotated[str, Meta(min_length=1, max_length=200, description="the caller's own id")]
Metadata = Annotated[dict[str, Any], Meta(description="any JSON object, stored as given")]
TopK = Annotated[int, Meta(ge=1, le=100, description="subjects per face, best first")]
IdentifyThreshold = Annotated[
    float,
    Meta(
        ge=-1.0,
        le=1.0,
        description="cosine similarity a face needs to be named (default IDENTIFY_THRESHOLD)",
    ),
]
Embedding = Annotated[list[float], Meta(min_length=1, max_length=4096)]


class CreateSubject(Struct, kw_only=True):
    subject: SubjectName
    metadata: Metadata | None = None
    external_id: ExternalId | None = None


class UpdateSubject(Struct, kw_only=True):
    """PATCH: only the fields sent change; `external_id: null` clears it."""

    metadata: Metadata | UnsetType = UNSET
    external_id: ExternalId | UnsetType | None = UNSET


class SubjectOut(Struct):
    subject: str
    metadata: dict[str, Any]
    external_id: str | None
    created: Annotated[float, Meta(description="Unix time")]
    face_count: int


class FaceInfo(Struct):
    face_id: int
    created: float
    recognizer: str
    has_crop: bool


class SubjectDetail(SubjectOut):
    faces: list[FaceInfo] = []


class SubjectList(Struct):
    subjects: list[SubjectOut]
    offset: int
    limit: int
    total_subjects: int
    total_faces: int


class SubjectDeleted(Struct):
    subject: str
    faces_deleted: int


class FaceDeleted(Struct):
    face_id: int
    deleted: bool = True


class EnrolEmbeddings(Struct, kw_only=True):
    """`POST /gallery/subjects/{subject}/faces` with embeddings instead of images."""

    embeddings: Annotated[list[Embedding], Meta(min_length=1, max_length=1000)]


class EnrolOk(Struct, tag="ok", tag_field="status"):
    face_id: int


class EnrolFailed(Struct, tag="error", tag_field="status"):
    error: str
    code: str


class EnrolResponse(Struct):
    subject: str
    face_ids: Annotated[list[int], Meta(description="the faces enrolled, in request order")]
    data: Annotated[list[EnrolOk | EnrolFailed], Meta(description="one entry per image")]


class BulkEntry(Struct, kw_only=True):
    """One subject of a bulk enrolment: created when missing, with its images and/or
    embeddings (each image enrols its largest face)."""

    subject: SubjectName
    external_id: ExternalId | None = None
    metadata: Metadata | None = None
    images: Annotated[list[ImageData], Meta(max_length=100)] = []
    embeddings: Annotated[list[Embedding], Meta(max_length=1000)] = []


class BulkRequest(Struct, kw_only=True):
    subjects: Annotated[list[BulkEntry], Meta(min_length=1, max_length=10_000)]
    threshold: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None


class BulkResult(Struct):
    subject: str
    external_id: str | None
    face_ids: list[int]
    errors: Annotated[list[EnrolFailed], Meta(description="images that enrolled nothing")]


class BulkResponse(Struct):
    subjects: list[BulkResult]


class SearchRequest(ExtractRequest, kw_only=True):
    """The /extract body (`threshold` is still the detection threshold) plus the search's."""

    top_k: TopK = 5
    identify_threshold: IdentifyThreshold | None = None


class VerifyRequest(ExtractRequest, kw_only=True):
    """Two images, or one image and a `subject`; the largest face of each image counts."""

    subject: SubjectName | None = None
    identify_threshold: IdentifyThreshold | None = None


class VerifyResponse(Struct):
    similarity: float
    match: bool
    threshold: float
    subject: str | None = None


class ImportResponse(Struct):
    mode: Literal["merge", "replace"]
    subjects_added: int
    faces_added: int
    faces_skipped: int
    total_subjects: int
    total_faces: int


REQUEST_TYPES: tuple[type, ...] = (
    CreateSubject,
    UpdateSubject,
    EnrolEmbeddings,
    BulkRequest,
    SearchRequest,
    VerifyRequest,
)
RESPONSE_TYPES: tuple[type, ...] = (
    SubjectOut,
    SubjectDetail,
    SubjectList,
    SubjectDeleted,
    FaceDeleted,
    EnrolResponse,
    BulkResponse,
    VerifyResponse,
    ImportResponse,
)
