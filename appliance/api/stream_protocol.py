"""The `/ws/stream` messages, declared once (DESIGN section 4; docs/STREAMS.md).

Client to server: an optional `config` text message (the /extract options plus `max_fps`), an
optional `frame` tag before a binary frame. Server to client: `config` (acknowledgement),
`status`, `result`, `stats` and `error` text messages. `/openapi.json` lists all of them as
components.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from appliance.api.wire import (
    ExtractOptions,
    FaceOut,
    dec_hook,
    known_fields,
)
from appliance.pipeline.faces import AnalyzeOptions

Timestamp = Annotated[
    float | int | str | None, Meta(description="the client's own stamp, echoed in the result")
]


class ConfigMessage(ExtractOptions, tag="config", tag_field="type", kw_only=True):
    """The stream's options; may be sent again at any time to change them."""

    max_fps: Annotated[float, Meta(gt=0, description="at most STREAM_MAX_FPS")] | None = None


class FrameTag(Struct, tag="frame", tag_field="type"):
    """Tags the next binary frame; without one, frames are numbered 1, 2, 3..."""

    seq: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
    ts: Timestamp = None


class ConfigAck(Struct, tag="config", tag_field="type"):
    max_fps: float
    warnings: list[str] | UnsetType = UNSET


class StatusMessage(Struct, tag="status", tag_field="type"):
    """The governor's state; sent on connect, after a config, and on every change."""

    state: str
    max_fps: float
    accept_new_streams: bool
    reason: str


class ResultMessage(Struct, tag="result", tag_field="type"):
    seq: int
    ts: Timestamp
    took_ms: float
    latency_ms: float
    faces: list[FaceOut]
    took: dict[str, float] | UnsetType = UNSET


class Latency(Struct):
    p50: float | None
    p99: float | None


class StatsMessage(Struct, tag="stats", tag_field="type"):
    received: int
    processed: int
    dropped: int
    dropped_replaced: int
    dropped_over_fps: int
    dropped_busy: int
    bad_frames: int
    results_dropped: int
    fps: float
    latency_ms: Latency
    max_fps: float
    state: str


class ErrorMessage(Struct, tag="error", tag_field="type"):
    """A bad frame or message; beyond STREAM_MAX_BAD_FRAMES the stream closes with 1008."""

    seq: int | None
    error: str


ServerMessage = ConfigAck | StatusMessage | ResultMessage | StatsMessage | ErrorMessage
CLIENT_TYPES: tuple[type, ...] = (ConfigMessage, FrameTag)
SERVER_TYPES: tuple[type, ...] = (
    ConfigAck,
    StatusMessage,
    ResultMessage,
    StatsMessage,
    ErrorMessage,
)
# Close codes a stream ends with (RFC 6455 numbers, aiohttp's WSCloseCode names).
CLOSE_CODES = {
    1001: "server shutdown",
    1008: "policy violation: bad config, or more than STREAM_MAX_BAD_FRAMES bad frames/messages",
    1009: "a frame over MAX_FRAME_BYTES",
    1011: "internal error (a bug; the appliance log has it)",
    1013: "try again later: MAX_STREAMS reached, or the governor sheds streams",
}


class BadConfig(ValueError):
    """A config message the stream cannot use: the stream is closed with 1008."""


class BadMessage(ValueError):
    """A text message that is not one of the client messages: answered with an error."""


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    options: AnalyzeOptions
    request: ExtractOptions
    max_fps: float
    warnings: tuple[str, ...] = ()


_keys = msgspec.json.Decoder(dict[str, msgspec.Raw])
_config = msgspec.json.Decoder(ConfigMessage, strict=False, dec_hook=dec_hook)
_frame = msgspec.json.Decoder(FrameTag)


def resolve_config(
    message: ConfigMessage,
    keys: Iterable[str],
    default_threshold: float,
    max_size: tuple[int, int],
    fps_limit: float,
) -> StreamConfig:
    try:
        size = message.resolved_max_size(max_size)
    except ValueError as exc:
        raise BadConfig(str(exc)) from None
    warnings: list[str] = []
    max_fps = fps_limit if message.max_fps is None else message.max_fps
    if max_fps > fps_limit:
        warnings.append(f"max_fps {max_fps:g} is above STREAM_MAX_FPS; using {fps_limit:g}")
        max_fps = fps_limit
    known = known_fields(ConfigMessage) | {"type"}
    unknown = sorted(set(keys) - known)
    warnings += [
        f"unknown field '{n.encode('utf-8', 'backslashreplace').decode()}' ignored" for n in unknown
    ]
    if message.msgpack:
        warnings.append("msgpack: stream results are always JSON text messages")
    options = message.analyze_options(default_threshold, size, "stream")
    return StreamConfig(options, message, max_fps, tuple(warnings))


def parse_config(
    message: Mapping[str, Any],
    default_threshold: float,
    max_size: tuple[int, int],
    fps_limit: float,
) -> StreamConfig:
    """A config message already decoded to a mapping -> StreamConfig; BadConfig says why."""
    try:
        typed = msgspec.convert(dict(message), ConfigMessage, strict=False, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        raise BadConfig(str(exc).replace("`$.", "`")) from None
    return resolve_config(typed, message, default_threshold, max_size, fps_limit)


def decode_client_message(
    text: str, default_threshold: float, max_size: tuple[int, int], fps_limit: float
) -> StreamConfig | FrameTag:
    """One client text message; BadConfig (close 1008) or BadMessage (an error reply)."""
    try:
        keys = _keys.decode(text)
    except msgspec.ValidationError:
        raise BadMessage("text message must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise BadMessage(f"text message is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadMessage("text message is nested too deeply") from None
    kind = keys.get("type")
    if kind is not None and bytes(kind) == b'"config"':
        try:
            config = _config.decode(text)
        except msgspec.ValidationError as exc:
            raise BadConfig(str(exc).replace("`$.", "`")) from None
        return resolve_config(config, keys, default_threshold, max_size, fps_limit)
    if kind is not None and bytes(kind) == b'"frame"':
        try:
            return _frame.decode(text)
        except msgspec.ValidationError as exc:
            raise BadMessage(f"frame message: {str(exc).replace('`$.', '`')}") from None
    shown = bytes(kind).decode("utf-8", "backslashreplace")[:40] if kind is not None else None
    raise BadMessage(f"unknown message type {shown}")


def encode(message: ServerMessage) -> str:
    return msgspec.json.encode(message).decode("utf-8")
