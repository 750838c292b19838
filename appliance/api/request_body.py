"""Request bodies into wire types: JSON, msgpack or multipart in, one `ParsedExtract` out.

Every malformed body becomes a 4xx `ApiError` here (never a 500): msgspec rejects numbers that
overflow (1e400, 400-digit integers), invalid UTF-8 and lone surrogates; nesting deeper than
the interpreter's recursion limit surfaces as RecursionError and is answered the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, TypeVar

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from appliance.api import state
from appliance.api.admission import off_loop
from appliance.api.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from appliance.api.wire import (
    ExtractOptions,
    ExtractRequest,
    dec_hook,
    known_fields,
    unknown_field_warnings,
)
from appliance.config import Settings
from appliance.pipeline.faces import AnalyzeOptions

JSON_TYPES = frozenset({"application/json", "text/json", ""})
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack"})
# Multipart form fields arrive as text; these spellings of a boolean are what HTML forms and
# FastAPI (InsightFace-REST's framework) accept besides msgspec's own "true"/"false"/"1"/"0".
FORM_BOOLEANS = {"yes": "true", "on": "true", "no": "false", "off": "false"}
MULTIPART_FILE_FIELDS = frozenset({"images", "file", "files", "image"})

T = TypeVar("T", bound=msgspec.Struct)
T_co = TypeVar("T_co")

_json_keys = msgspec.json.Decoder(dict[str, msgspec.Raw])
_msgpack_keys = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_json_extract = msgspec.json.Decoder(ExtractRequest, strict=False, dec_hook=dec_hook)
_msgpack_extract = msgspec.msgpack.Decoder(ExtractRequest, strict=False, dec_hook=dec_hook)


@dataclasses.dataclass(frozen=True)
class ParsedExtract:
    """A validated /extract request with what the settings resolve and what was ignored."""

    request: ExtractOptions
    data: list[str | bytes]
    urls: list[str]
    max_size: tuple[int, int] | None
    threshold: float
    warnings: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.data) + len(self.urls)

    def options(self, source: str = "rest") -> AnalyzeOptions:
        return self.request.analyze_options(self.threshold, self.max_size, source)


def validation_error(exc: msgspec.ValidationError) -> BadRequest:
    message = str(exc)
    if "missing required field" in message:
        return BadRequest(message, code="invalid_field")
    if " - at `$." not in message and " - at `$[" not in message:
        return BadRequest(f"request body must be an object: {message}", code="invalid_body")
    return BadRequest(message.replace("`$.", "`"), code="invalid_field")


def decode_typed(
    raw: bytes,
    keys_decoder: Any,
    decoder: Any,
    invalid_code: str,
    what: str,
) -> tuple[Any, list[str]]:
    """(typed value, top-level keys) or a 400 that names the problem."""
    try:
        keys = list(keys_decoder.decode(raw))
        return decoder.decode(raw), keys
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec's msgpack decoder reports invalid UTF-8 (a lone surrogate) as the latter.
        raise BadRequest(f"body is not valid {what}: {exc}", code=invalid_code) from None
    except RecursionError:
        raise BadRequest(
            f"body is not usable {what}: nested too deeply", code=invalid_code
        ) from None


def finish(req: ExtractRequest, keys: Iterable[str], settings: Settings) -> ParsedExtract:
    data = [item.value for item in req.images.data]
    urls = req.images.urls
    if not data and not urls:
        raise BadRequest(
            "no images: 'images.data' and 'images.urls' are both empty", code="no_images"
        )
    count = len(data) + len(urls)
    if count > settings.max_images_per_request:
        raise BadRequest(
            f"{count} images in one request; the limit (MAX_IMAGES_PER_REQUEST) is "
            f"{settings.max_images_per_request}",
            code="too_many_images",
        )
    return resolve(req, data, urls, keys, settings)


def resolve(
    req: ExtractOptions,
    data: list[str | bytes],
    urls: list[str],
    keys: Iterable[str],
    settings: Settings,
) -> ParsedExtract:
    try:
        max_size = req.resolved_max_size(settings.max_size)
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_field") from None
    threshold = settings.det_threshold if req.threshold is None else req.threshold
    known = known_fields(ExtractRequest)
    return ParsedExtract(req, data, urls, max_size, threshold, unknown_field_warnings(keys, known))


async def read_extract(request: web.Request, settings: Settings) -> ParsedExtract:
    """A JSON or msgpack /extract body."""
    ctype = request.content_type
    if ctype not in JSON_TYPES and ctype not in MSGPACK_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not accepted; send application/json or application/msgpack"
        )
    raw = await within_body_timeout(request.read(), request, settings)
    # A large body parses in the executor. msgspec holds the GIL while it parses, so this
    # bounds rather than removes the loop's stall (docs/RELIABILITY.md has the numbers); the
    # base64 of each image is decoded later, one image at a time, in the same way.
    return await off_loop(
        request.app[state.EXECUTOR],
        len(raw),
        lambda: parse_body(raw, ctype in MSGPACK_TYPES, settings),
    )


def parse_body(raw: bytes, is_msgpack: bool, settings: Settings) -> ParsedExtract:
    """The bytes of a JSON or msgpack body -> ParsedExtract; anything wrong -> BadRequest."""
    if not raw:
        raise BadRequest("request body is empty", code="invalid_body")
    if is_msgpack:
        req, keys = decode_typed(raw, _msgpack_keys, _msgpack_extract, "invalid_msgpack", "msgpack")
    else:
        req, keys = decode_typed(raw, _json_keys, _json_extract, "invalid_json", "JSON")
    return finish(req, keys, settings)


def convert_form(fields: Mapping[str, str], kind: type[T]) -> T:
    """Form fields (all text) into a wire type, with the usual spellings of booleans."""
    values = {k: FORM_BOOLEANS.get(v.strip().lower(), v) for k, v in fields.items()}
    try:
        return msgspec.convert(values, kind, strict=False, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None


async def read_multipart(request: web.Request, settings: Settings) -> ParsedExtract:
    """`multipart/form-data`: files in field `images` (repeatable), options as text fields."""
    if not request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type!r} is not accepted; send multipart/form-data"
        )
    files, fields = await within_body_timeout(read_parts(request, settings), request, settings)
    if not files:
        raise BadRequest("no image files in the multipart body (field 'images')", code="no_images")
    known = known_fields(ExtractOptions)
    options = convert_form({k: v for k, v in fields.items() if k in known}, ExtractOptions)
    return resolve(options, files, [], fields, settings)


async def within_body_timeout(
    read: Awaitable[T_co], request: web.Request, settings: Settings
) -> T_co:
    """The body read; 408 past BODY_TIMEOUT_S, or 503 at once when shutdown begins first.

    A client that trickles its body (slowloris) would otherwise hold its connection and the
    bytes so far for as long as it likes. At shutdown aiohttp stops taking in bytes on open
    connections, so a body still arriving then would only end in a 408 after BODY_TIMEOUT_S:
    such a request was never accepted, and the client is told to retry instead.
    """
    body = asyncio.ensure_future(read)
    stopping = asyncio.ensure_future(request.app[state.STOPPING].wait())
    try:
        await asyncio.wait(
            (body, stopping), timeout=settings.body_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopping.cancel()
        if not body.done():
            body.cancel()
            await asyncio.gather(body, return_exceptions=True)
    if not body.cancelled():
        return body.result()
    if stopping.done() and not stopping.cancelled():
        raise ServiceUnavailable(
            "the appliance is shutting down and the request body had not arrived; retry",
            code="shutting_down",
            headers={"Retry-After": str(max(settings.retry_after_s, 1))},
        )
    raise RequestTimeout(
        f"the request body did not arrive within BODY_TIMEOUT_S ({settings.body_timeout_s} s)"
    )


async def read_parts(
    request: web.Request, settings: Settings
) -> tuple[list[str | bytes], dict[str, str]]:
    """Every part of a multipart body: files (in order) and text fields."""
    files: list[str | bytes] = []
    fields: dict[str, str] = {}
    budget = settings.max_body_bytes
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted", code="invalid_body")
            name = part.name or ""
            data = await read_part(part, budget)
            budget -= len(data)
            if part.filename is not None or name in MULTIPART_FILE_FIELDS:
                files.append(data)
                if len(files) > settings.max_images_per_request:
                    raise BadRequest(
                        f"more than {settings.max_images_per_request} files "
                        "(MAX_IMAGES_PER_REQUEST)",
                        code="too_many_images",
                    )
            else:
                fields[name] = data.decode("utf-8", errors="replace")
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        # aiohttp's multipart reader raises these on a missing or wrong boundary, a body that
        # ends before its closing boundary, or a part header past its line limit.
        raise BadRequest(f"malformed multipart body: {exc}", code="invalid_multipart") from None
    return files, fields


async def read_part(part: BodyPartReader, budget: int) -> bytes:
    """A part's bytes; 413 once the parts together pass MAX_BODY_BYTES (each part alone is not
    the bound: aiohttp's client_max_size does not apply to a streamed multipart body)."""
    chunks: list[bytes] = []
    while chunk := await part.read_chunk(64 * 1024):
        budget -= len(chunk)
        if budget < 0:
            raise PayloadTooLarge(
                "multipart body is larger than MAX_BODY_BYTES (all parts together)"
            )
        chunks.append(bytes(chunk))
    return b"".join(chunks)


def decode_base64(item: str | bytes) -> bytes:
    """A base64 image (a data: URL prefix and line breaks allowed); msgpack may carry raw bytes.

    `base64` without `-w0` wraps its output at 76 columns, and InsightFace-REST (which calls
    `b64decode` without validation) accepts that: whitespace is dropped, anything else that is
    not base64 is still refused.
    """
    if isinstance(item, bytes):
        return item
    text = item.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64", code="invalid_base64") from None
