"""Request parsing and response building for the InsightFace-REST-compatible endpoints."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any

from appliance.api.errors import BadRequest
from appliance.pipeline.faces import AnalyzeOptions, Face
from appliance.pipeline.images import encode_jpeg

# Fields InsightFace-REST accepts that this appliance knows; others are reported as warnings.
KNOWN_FIELDS = {
    "images",
    "threshold",
    "embed_only",
    "return_face_data",
    "return_landmarks",
    "extract_embedding",
    "extract_ga",
    "detect_masks",
    "limit_faces",
    "min_face_size",
    "verbose_timings",
    "msgpack",
    "img_req_headers",
    "max_size",
    "api_ver",
}


@dataclasses.dataclass(frozen=True)
class ExtractRequest:
    data: list[str | bytes]
    urls: list[str]
    threshold: float
    embed_only: bool = False
    return_face_data: bool = False
    return_landmarks: bool = False
    extract_embedding: bool = True
    extract_ga: bool = False
    detect_masks: bool = False
    limit_faces: int = 0
    min_face_size: int = 0
    verbose_timings: bool = False
    msgpack: bool = False
    img_req_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    max_size: tuple[int, int] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.data) + len(self.urls)

    def options(self, source: str = "rest") -> AnalyzeOptions:
        return AnalyzeOptions(
            threshold=self.threshold,
            extract_embedding=self.extract_embedding,
            return_face_data=self.return_face_data,
            limit_faces=self.limit_faces,
            min_face_size=float(self.min_face_size),
            max_size=self.max_size,
            source=source,
        )


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
        return value.lower() in {"true", "1", "yes"}  # multipart form fields arrive as strings
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadRequest(f"'{name}' must be a boolean, got {value!r}", code="invalid_field")


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a number, got {value!r}", code="invalid_field")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(
            f"'{name}' must be a number, got {value!r}", code="invalid_field"
        ) from None
    if not lo <= number <= hi:
        raise BadRequest(f"'{name}' must be within {lo}..{hi}, got {number}", code="invalid_field")
    return number


def _int(body: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    number = _number(body, name, default, lo, hi)
    if number != int(number):
        raise BadRequest(f"'{name}' must be an integer, got {number}", code="invalid_field")
    return int(number)


def parse_options(
    body: Mapping[str, Any], default_threshold: float, max_size_limit: tuple[int, int]
) -> dict[str, Any]:
    """Every option except the images themselves; shared by /extract, multipart and streams."""
    max_size = body.get("max_size")
    parsed_size: tuple[int, int] | None = None
    if max_size is not None:
        if isinstance(max_size, str):
            max_size = max_size.split(",")
        if not (isinstance(max_size, (list, tuple)) and len(max_size) == 2):
            raise BadRequest("'max_size' must be [width, height]", code="invalid_field")
        try:
            w, h = int(max_size[0]), int(max_size[1])
        except (TypeError, ValueError):
            raise BadRequest("'max_size' must be two integers", code="invalid_field") from None
        if not (32 <= w <= max_size_limit[0] and 32 <= h <= max_size_limit[1]):
            raise BadRequest(
                f"'max_size' must be within 32x32..{max_size_limit[0]}x{max_size_limit[1]} (MAX_SIZE)",
                code="invalid_field",
            )
        parsed_size = (w, h)
    headers = body.get("img_req_headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise BadRequest("'img_req_headers' must be an object of strings", code="invalid_field")
    return {
        "threshold": _number(body, "threshold", default_threshold, 0.0, 1.0),
        "embed_only": _bool(body, "embed_only", False),
        "return_face_data": _bool(body, "return_face_data", False),
        "return_landmarks": _bool(body, "return_landmarks", False),
        "extract_embedding": _bool(body, "extract_embedding", True),
        "extract_ga": _bool(body, "extract_ga", False),
        "detect_masks": _bool(body, "detect_masks", False),
        "limit_faces": _int(body, "limit_faces", 0, 0, 10_000),
        "min_face_size": _int(body, "min_face_size", 0, 0, 100_000),
        "verbose_timings": _bool(body, "verbose_timings", False),
        "msgpack": _bool(body, "msgpack", False),
        "img_req_headers": {str(k): v for k, v in headers.items()},
        "max_size": parsed_size,
    }


def parse_extract(
    body: Any, default_threshold: float, max_size_limit: tuple[int, int], max_images: int
) -> ExtractRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON (or msgpack) object", code="invalid_body")
    images = body.get("images")
    if not isinstance(images, dict):
        raise BadRequest(
            "'images' must be an object with 'data' and/or 'urls' lists", code="invalid_field"
        )
    data = images.get("data") or []
    urls = images.get("urls") or []
    if not isinstance(data, list) or not all(isinstance(d, (str, bytes)) for d in data):
        raise BadRequest("'images.data' must be a list of base64 strings", code="invalid_field")
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise BadRequest("'images.urls' must be a list of strings", code="invalid_field")
    if not data and not urls:
        raise BadRequest(
            "no images: 'images.data' and 'images.urls' are both empty", code="no_images"
        )
    if len(data) + len(urls) > max_images:
        raise BadRequest(
            f"{len(data) + len(urls)} images in one request; the limit (MAX_IMAGES_PER_REQUEST) is {max_images}",
            code="too_many_images",
        )
    unknown = sorted(set(body) - KNOWN_FIELDS)
    warnings = tuple(f"unknown field '{name}' ignored" for name in unknown)
    return ExtractRequest(
        data=data,
        urls=urls,
        warnings=warnings,
        **parse_options(body, default_threshold, max_size_limit),
    )


def decode_base64(item: str | bytes) -> bytes:
    """Base64 image payload (a data: URL prefix is allowed); msgpack may carry raw bytes."""
    if isinstance(item, bytes):
        return item
    text = item.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64", code="invalid_base64") from None


def face_to_dict(face: Face, index: int, req: ExtractRequest | Mapping[str, Any]) -> dict[str, Any]:
    def opt(name: str) -> Any:
        return getattr(req, name) if isinstance(req, ExtractRequest) else req.get(name)

    x1, y1, x2, y2 = face.bbox
    out: dict[str, Any] = {
        "num_det": index,
        "prob": round(face.prob, 6),
        "bbox": [round(x1), round(y1), round(x2), round(y2)],
        "size": round(face.size),
        "landmarks": (
            [[round(x), round(y)] for x, y in face.landmarks]
            if opt("return_landmarks") and face.landmarks is not None
            else None
        ),
        "norm": round(face.norm, 4) if face.norm is not None else None,
        "vec": [round(float(v), 6) for v in face.vec] if face.vec is not None else None,
        "facedata": (
            base64.b64encode(encode_jpeg(face.crop)).decode("ascii")
            if opt("return_face_data") and face.crop is not None
            else None
        ),
    }
    if opt("extract_ga"):
        # No gender/age model ships with the appliance: say so instead of inventing values.
        out["gender"] = None
        out["age"] = None
    if opt("detect_masks"):
        out["mask_prob"] = None
    return out


def unavailable_warnings(req: ExtractRequest | Mapping[str, Any]) -> list[str]:
    def opt(name: str) -> Any:
        return getattr(req, name) if isinstance(req, ExtractRequest) else req.get(name)

    warnings = []
    if opt("extract_ga"):
        warnings.append(
            "extract_ga: no gender/age model is configured; 'gender' and 'age' are null"
        )
    if opt("detect_masks"):
        warnings.append("detect_masks: no mask model is configured; 'mask_prob' is null")
    return warnings
