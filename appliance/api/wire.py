"""The REST wire format, declared once: every request body, response and error (DESIGN section 4).

These msgspec Structs are the single source of truth: the JSON and msgpack decoders validate
requests with them, responses are encoded from them, and `/openapi.json` is generated from
them (`api/openapi.py`). Field names, defaults and shapes are InsightFace-REST's, so its
clients do not notice; fields it does not know stay optional and off by default.

Why msgspec: one declaration gives validation with bounds, JSON and msgpack codecs and JSON
Schema (2020-12, the dialect OpenAPI 3.1 uses), and it decodes straight into typed objects
several times faster than pydantic v2 on bodies like these, with no Python object per
rejected field. The WebSocket messages live in `api/stream_protocol.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from appliance.pipeline.faces import AnalyzeOptions

Threshold = Annotated[
    float, Meta(ge=0.0, le=1.0, description="detection score threshold (default DET_THRESHOLD)")
]
# 32 is SCRFD's coarsest stride; the upper bound is MAX_SIZE, checked against the settings.
Side = Annotated[int, Meta(ge=32, le=65_536)]
LimitFaces = Annotated[int, Meta(ge=0, le=10_000, description="keep the N best faces; 0 = all")]
MinFaceSize = Annotated[
    int, Meta(ge=0, le=100_000, description="drop faces whose box is smaller (pixels)")
]


class ImageData:
    """One `images.data` item: a base64 string (JSON, msgpack) or raw bytes (msgpack only).

    msgspec cannot put two string-like types in one union, so this small type carries either;
    `dec_hook` builds it and `schema_hook` describes it.
    """

    __slots__ = ("value",)

    def __init__(self, value: str | bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"ImageData({len(self.value)} {type(self.value).__name__})"


def dec_hook(kind: type, obj: Any) -> Any:
    # msgspec turns a TypeError raised here into a ValidationError that names the field.
    if kind is ImageData:
        if isinstance(obj, (str, bytes)):
            return ImageData(obj)
        raise TypeError(f"Expected base64 `str` (or msgpack `bin`), got `{type(obj).__name__}`")
    raise TypeError(f"no decoder for {kind.__name__}")


def schema_hook(kind: type) -> dict[str, Any]:
    if kind is ImageData:
        return {
            "type": "string",
            "contentEncoding": "base64",
            "description": "base64 image (JPEG, PNG, BMP, WebP); a data: URL prefix and line "
            "breaks are accepted; msgpack bodies may carry raw bytes instead",
        }
    raise NotImplementedError(str(kind))


class Images(Struct, kw_only=True):
    data: list[ImageData] = []
    urls: Annotated[list[str], Meta(description="image URLs; only with ALLOW_URL_INPUTS=1")] = []


class ExtractOptions(Struct, kw_only=True):
    """Every /extract option except the images; stream configs take the same ones."""

    threshold: Threshold | None = None
    embed_only: Annotated[
        bool, Meta(description="images are aligned 112x112 crops: embed, skip detection")
    ] = False
    return_face_data: Annotated[
        bool, Meta(description="add `facedata`: base64 JPEG of each aligned crop")
    ] = False
    return_landmarks: Annotated[bool, Meta(description="add the five landmarks")] = False
    extract_embedding: bool = True
    extract_ga: Annotated[
        bool, Meta(description="no gender/age model ships: answered as null with a warning")
    ] = False
    detect_masks: Annotated[
        bool, Meta(description="no mask model ships: answered as null with a warning")
    ] = False
    limit_faces: LimitFaces = 0
    min_face_size: MinFaceSize = 0
    verbose_timings: Annotated[bool, Meta(description="per-stage timings per image")] = False
    msgpack: Annotated[bool, Meta(description="answer in msgpack")] = False
    img_req_headers: Annotated[
        dict[str, str], Meta(description="headers sent when fetching images.urls")
    ] = {}
    max_size: Annotated[
        tuple[Side, Side] | str | Literal[0] | None,
        Meta(
            description="[width, height] (or 'w,h') to detect at, at most MAX_SIZE; "
            "0 (InsightFace-REST's 'do not resize') means MAX_SIZE"
        ),
    ] = None
    subpixel: Annotated[
        bool,
        Meta(
            description="boxes, landmarks and size as floats with sub-pixel precision; by "
            "default they are integers truncated as InsightFace-REST truncates them"
        ),
    ] = False
    api_ver: Annotated[str | int | None, Meta(description="accepted and ignored")] = None
    identify: Annotated[
        bool,
        Meta(
            description="search each face in the gallery: adds `identity` and `matches` "
            "(on streams: `track_id`, `identity`, `similarity`)"
        ),
    ] = False

    def resolved_max_size(self, limit: tuple[int, int]) -> tuple[int, int] | None:
        """`max_size` as (w, h) within 32..MAX_SIZE; ValueError says what is wrong."""
        size = self.max_size
        if size is None or size == 0:
            return None
        if isinstance(size, str):
            parts = size.split(",")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError("'max_size' must be [width, height] or 'width,height'")
            size = (int(parts[0]), int(parts[1]))
        assert not isinstance(size, int)
        w, h = size
        if not (32 <= w <= limit[0] and 32 <= h <= limit[1]):
            raise ValueError(
                f"'max_size' must be within 32x32..{limit[0]}x{limit[1]} (MAX_SIZE), got {w}x{h}"
            )
        return (w, h)

    def analyze_options(
        self, default_threshold: float, max_size: tuple[int, int] | None, source: str
    ) -> AnalyzeOptions:
        return AnalyzeOptions(
            threshold=default_threshold if self.threshold is None else self.threshold,
            extract_embedding=self.extract_embedding,
            return_face_data=self.return_face_data,
            limit_faces=self.limit_faces,
            min_face_size=float(self.min_face_size),
            max_size=max_size,
            source=source,
        )


class ExtractRequest(ExtractOptions, kw_only=True):
    """The body of `POST /extract` and `POST /draw_detections` (InsightFace-REST's shape)."""

    images: Images


# ---------------------------------------------------------------- responses

Coordinate = int | float


class MatchOut(Struct):
    """One gallery subject a face resembles: its best face and the cosine similarity."""

    subject: str
    similarity: float
    face_id: int


class FaceOut(Struct):
    num_det: int
    prob: float
    bbox: Annotated[list[Coordinate], Meta(description="x1, y1, x2, y2 (pixels)")]
    size: Annotated[Coordinate, Meta(description="box width (pixels)")]
    landmarks: list[list[Coordinate]] | None
    norm: float | None
    vec: Annotated[list[float] | None, Meta(description="unit-length embedding")]
    facedata: str | None
    gender: int | UnsetType | None = UNSET
    age: int | UnsetType | None = UNSET
    mask_prob: float | UnsetType | None = UNSET
    # With `identify` (docs/GALLERY.md): the best subject at IDENTIFY_THRESHOLD or null.
    identity: str | UnsetType | None = UNSET
    matches: Annotated[list[MatchOut] | UnsetType, Meta(description="best first")] = UNSET
    # On streams with `identify`: the face's track and its smoothed best similarity.
    track_id: int | UnsetType = UNSET
    similarity: float | UnsetType | None = UNSET


class ImageOk(Struct, tag="ok", tag_field="status"):
    took_ms: float
    faces: list[FaceOut]
    took: dict[str, float] | UnsetType = UNSET


class ImageFailed(Struct, tag="error", tag_field="status"):
    error: str
    code: str


class Took(Struct):
    total_ms: float


class ExtractResponse(Struct):
    took: Took
    data: list[ImageOk | ImageFailed]
    warnings: list[str] | UnsetType = UNSET
    demo: Annotated[
        bool | UnsetType, Meta(description="true when the generated demo models answer")
    ] = UNSET


class ErrorDetail(Struct):
    code: str
    message: str


class ErrorResponse(Struct):
    error: ErrorDetail


class Liveness(Struct):
    status: Literal["ok"] = "ok"


class Readiness(Struct):
    status: Literal["ready", "not_ready"]
    checks: dict[str, dict[str, Any]]
    warnings: list[str] | UnsetType = UNSET
    demo: bool | UnsetType = UNSET


class ModelsInfo(Struct):
    detector: dict[str, Any]
    recognizer: dict[str, Any]


class NvJpegInfo(Struct):
    """What `USE_NVJPEG` came to: asked for, in use, and the loader's reason when it is not."""

    requested: bool
    in_use: bool
    # "in use", "off (USE_NVJPEG=0)" or "not available: <why>".
    status: str


class InfoResponse(Struct):
    """`GET /info`; parts of the app add sections (`streams`, `watchdog`) beside these."""

    version: str
    backend: str
    backend_reason: str
    models: ModelsInfo
    jpeg_decoder: str
    nvjpeg: NvJpegInfo
    settings: dict[str, Any]
    demo: bool


REQUEST_TYPES: tuple[type, ...] = (ExtractRequest,)
RESPONSE_TYPES: tuple[type, ...] = (
    ExtractResponse,
    ErrorResponse,
    Liveness,
    Readiness,
    InfoResponse,
)


def known_fields(struct: type[Struct]) -> frozenset[str]:
    return frozenset(struct.__struct_fields__)


def unknown_field_warnings(names: Iterable[str], known: frozenset[str]) -> tuple[str, ...]:
    """One warning per unknown field, lone surrogates escaped so every encoder takes it."""
    return tuple(
        f"unknown field '{n.encode('utf-8', 'backslashreplace').decode()}' ignored"
        for n in sorted(set(names) - known)
    )


def encode_json(value: Any) -> bytes:
    return msgspec.json.encode(value)


def encode_msgpack(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)
