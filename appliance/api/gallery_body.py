"""Gallery request bodies and images: typed JSON/msgpack decoding of the `/gallery/*` wire
types, and "each image gives its largest face" through the same analysis path as /extract
(overload, timeout and pause handling included)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from appliance.api import state
from appliance.api.errors import ApiError, BadRequest, UnsupportedMediaType
from appliance.api.identify import with_embeddings
from appliance.api.request_body import (
    JSON_TYPES,
    MSGPACK_TYPES,
    ParsedExtract,
    decode_typed,
    finish,
)
from appliance.api.rest import run_analysis
from appliance.api.wire import ExtractRequest, dec_hook, known_fields, unknown_field_warnings
from appliance.gallery import NewFace
from appliance.gallery.enrol import encode_crop, largest_face
from appliance.pipeline.faces import ImageResult
from appliance.pipeline.images import ImageError

S = TypeVar("S", bound=msgspec.Struct)

_json_keys = msgspec.json.Decoder(dict[str, msgspec.Raw])
_msgpack_keys = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])


@functools.cache
def _decoders(kind: type[Any]) -> tuple[Any, Any]:
    return (
        msgspec.json.Decoder(kind, strict=False, dec_hook=dec_hook),
        msgspec.msgpack.Decoder(kind, strict=False, dec_hook=dec_hook),
    )


def is_msgpack(request: web.Request) -> bool:
    ctype = request.content_type
    if ctype not in JSON_TYPES and ctype not in MSGPACK_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not accepted; send application/json or application/msgpack"
        )
    return ctype in MSGPACK_TYPES


def decode(raw: bytes, packed: bool, kind: type[S]) -> tuple[S, list[str]]:
    """A body into `kind` and its top-level keys; every malformed body is a 400."""
    if not raw:
        raise BadRequest("request body is empty", code="invalid_body")
    as_json, as_msgpack = _decoders(kind)
    if packed:
        value, keys = decode_typed(raw, _msgpack_keys, as_msgpack, "invalid_msgpack", "msgpack")
    else:
        value, keys = decode_typed(raw, _json_keys, as_json, "invalid_json", "JSON")
    assert isinstance(value, kind)
    return value, keys


def top_keys(raw: bytes, packed: bool) -> frozenset[str]:
    """The body's top-level keys, or none when it is malformed (`decode` then says why)."""
    try:
        return frozenset((_msgpack_keys if packed else _json_keys).decode(raw))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return frozenset()


async def read_typed(request: web.Request, kind: type[S]) -> S:
    packed = is_msgpack(request)
    value, _ = decode(await request.read(), packed, kind)
    return value


def parse_images(value: ExtractRequest, keys: list[str], request: web.Request) -> ParsedExtract:
    """An ExtractRequest (or a subtype with more fields) -> ParsedExtract, the subtype's own
    fields not reported as unknown."""
    parsed = finish(value, keys, request.app[state.SETTINGS])
    known = known_fields(type(value))
    return dataclasses.replace(parsed, warnings=unknown_field_warnings(keys, known))


Largest = NewFace | ApiError | ImageError


async def largest_faces(app: web.Application, parsed: ParsedExtract) -> list[Largest]:
    """Per image: its largest face as a NewFace, or why there is none (its own error)."""
    keep = app[state.SETTINGS].gallery_keep_crops
    parsed = with_embeddings(parsed)
    if keep and not parsed.request.return_face_data:
        request = msgspec.structs.replace(parsed.request, return_face_data=True)
        parsed = dataclasses.replace(parsed, request=request)
    outcomes = await run_analysis(app, parsed)
    out: list[Largest] = []
    for _, result in outcomes:
        if not isinstance(result, ImageResult):
            out.append(result)
            continue
        face = largest_face(result.faces)
        if face is None or face.vec is None:
            out.append(ApiError("no face found in the image", code="no_face", status=422))
            continue
        crop = encode_crop(face.crop) if keep and face.crop is not None else None
        out.append(NewFace(face.vec, crop))
    return out


def error_of(item: ApiError | ImageError) -> tuple[str, str]:
    """(code, message) of an image's own failure."""
    if isinstance(item, ApiError):
        return item.code, item.message
    return item.code, str(item)
