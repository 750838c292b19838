"""One frozen, typed `Settings` built from environment variables and an optional TOML file.

Environment variable names are the upper-case field names (seed-compatible: `DET_MODEL`,
`MAX_SIZE`, `FORCE_FP16`, ...). A TOML file (path in `APPLIANCE_CONFIG` or passed explicitly)
uses the lower-case field names; the environment wins over the file. Every value is checked at
start-up and an invalid one raises `ConfigError` naming the variable.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Jetson's system Python is 3.10
    import tomli as tomllib

CONFIG_FILE_ENV = "APPLIANCE_CONFIG"


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message names the variable."""


BackendName = Literal["auto", "trt", "onnx"]
LogFormat = Literal["auto", "json", "console"]
TelemetrySourceName = Literal["auto", "jtop", "sysfs"]


@dataclasses.dataclass(frozen=True)
class Settings:
    # Models and inference.
    det_model: str = "scrfd_10g_gnkps"
    rec_model: str = "glintr100"
    # (width, height) of the detector input; the seed writes it as "640,640".
    max_size: tuple[int, int] = (640, 640)
    det_batch_size: int = 1
    rec_batch_size: int = 4
    force_fp16: bool = True
    inference_backend: BackendName = "auto"
    # Decode JPEGs on the GPU (nvJPEG) where a decoder is available; /info says when it is not.
    use_nvjpeg: bool = False
    # CPU threads the process may keep busy: ONNX Runtime's intra-op threads, OpenCV's and the
    # executor's are all derived from it (`backends.threads`). 0 = every core.
    cpu_threads: int = 0
    # Backend sessions (ONNX Runtime) or execution contexts (TensorRT) per model, each run by
    # its own batcher thread. 0 = chosen for the backend (`backends.threads`).
    det_workers: int = 0
    rec_workers: int = 0
    # Decode JPEGs at least twice the detector input at a reduced DCT scale (libjpeg-turbo).
    # Off: measured on the shared photos, embeddings of faces aligned from the reduced pixels
    # moved by up to 0.05 in similarity (docs/BENCHMARKS.md, "Decoding at a reduced DCT scale").
    jpeg_dct_scaling: bool = False
    models_dir: Path = Path("/var/lib/appliance/models")
    engines_dir: Path = Path("/var/lib/appliance/engines")
    # JSON file of operator models, InsightFace-REST's models.override.json; default: in models_dir.
    models_override: Path | None = None
    # Serve the small generated test models instead of real weights (offline demo).
    demo_models: bool = False
    # Allow registry models that have no published checksum.
    trust_unverified: bool = False
    det_threshold: float = 0.6
    nms_threshold: float = 0.4
    trt_workspace_mb: int = 2048

    # HTTP server.
    host: str = "0.0.0.0"
    port: int = 18080
    api_token: str | None = None
    batch_window_ms: float = 2.0
    max_queue: int = 64
    retry_after_s: int = 1
    request_timeout_s: float = 30.0
    max_image_pixels: int = 40_000_000
    # Decoded pixels held at once across all requests and streams (3 bytes each): past it,
    # 503 + Retry-After. Four images of the default MAX_IMAGE_PIXELS, 480 MB.
    max_pixels_in_flight: int = 160_000_000
    max_body_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 64
    allow_url_inputs: bool = False
    # Hosts or CIDRs that URL inputs may reach even though they are private or loopback.
    url_allowlist: tuple[str, ...] = ()
    url_timeout_s: float = 10.0
    # Images of one request decoded and analysed at once; the rest wait their turn, so one
    # 64-image request neither floods the executor nor holds 64 decoded images.
    request_image_concurrency: int = 4
    # A request body must arrive within this long (a slowloris body gets 408, not a socket).
    body_timeout_s: float = 30.0
    # On SIGTERM: stop accepting, then give in-flight requests this long to finish.
    shutdown_grace_s: float = 10.0

    # Live streams.
    max_frame_bytes: int = 4 * 1024 * 1024
    max_streams: int = 16
    stream_max_fps: float = 30.0
    stream_stats_interval_s: float = 2.0
    stream_heartbeat_s: float = 10.0
    stream_max_bad_frames: int = 5
    stream_send_queue: int = 8
    # Stream frames decoded or in analysis at once, shared by every stream. 0 = from the
    # detector: 2 x workers x batch + 1 (a batch running on every worker, as many queued, one
    # being decoded).
    stream_frame_slots: int = 0

    # Watchdog (DESIGN section 5).
    watchdog_interval_s: float = 1.0
    telemetry_source: TelemetrySourceName = "auto"
    sysfs_root: Path = Path("/")
    temp_warm_c: float = 80.0
    temp_hot_c: float = 90.0
    temp_critical_c: float = 97.0
    ram_warm_pct: float = 80.0
    ram_hot_pct: float = 90.0
    ram_critical_pct: float = 95.0
    temp_hysteresis_c: float = 3.0
    ram_hysteresis_pct: float = 3.0
    watchdog_min_dwell_s: float = 3.0
    telemetry_fail_limit: int = 3

    # Gallery and identification (docs/GALLERY.md).
    gallery_db: Path = Path("/var/lib/appliance/gallery.db")
    # Cosine similarity a face needs to be named; unset = the recognizer's default
    # (appliance/gallery/thresholds.py). Measure it with `appliance gallery calibrate`.
    identify_threshold: float | None = None
    # Store each enrolled face's aligned crop (off: privacy).
    gallery_keep_crops: bool = False
    # Faces from which search uses the approximate index (binary codes + re-rank); 0 = never.
    # Below it search is exact (int8 pre-scan + exact re-rank, docs/GALLERY.md).
    gallery_ann_min_faces: int = 150_000
    # Stream tracking: recognise a track again after this many frames.
    track_recognize_every: int = 15
    # Frames a track survives without a matching detection.
    track_max_age: int = 10
    # Smallest box overlap (IoU) that continues a track.
    track_min_iou: float = 0.3
    # Recognise again when the face is this much larger than at its last recognition.
    track_better_view: float = 1.3
    # Recent recognitions a track's identity is voted over (no flicker).
    track_smoothing: int = 5

    # Logging.
    log_format: LogFormat = "auto"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def override_file(self) -> Path:
        return self.models_override or self.models_dir / "models.override.json"

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to show in /info: the token is never echoed."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_token":
                value = value is not None
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_POSITIVE_INT = (
    "det_batch_size",
    "rec_batch_size",
    "max_queue",
    "max_image_pixels",
    "max_pixels_in_flight",
    "max_body_bytes",
    "max_images_per_request",
    "request_image_concurrency",
    "max_frame_bytes",
    "max_streams",
    "stream_send_queue",
    "telemetry_fail_limit",
    "trt_workspace_mb",
    "track_recognize_every",
    "track_max_age",
    "track_smoothing",
)
_POSITIVE_FLOAT = (
    "request_timeout_s",
    "url_timeout_s",
    "shutdown_grace_s",
    "body_timeout_s",
    "stream_max_fps",
    "stream_stats_interval_s",
    "stream_heartbeat_s",
    "watchdog_interval_s",
)


def _validate(s: Settings) -> None:
    for name in _POSITIVE_INT:
        if getattr(s, name) < 1:
            raise ConfigError(f"{name.upper()} must be >= 1, got {getattr(s, name)}")
    for name in _POSITIVE_FLOAT:
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name.upper()} must be > 0, got {getattr(s, name)}")
    if s.max_pixels_in_flight < s.max_image_pixels:
        raise ConfigError(
            "MAX_PIXELS_IN_FLIGHT must be >= MAX_IMAGE_PIXELS (one image must fit), got "
            f"{s.max_pixels_in_flight} < {s.max_image_pixels}"
        )
    if not 0 <= s.batch_window_ms <= 1000:
        raise ConfigError(f"BATCH_WINDOW_MS must be within 0..1000, got {s.batch_window_ms}")
    if not 1 <= s.port <= 65535:
        raise ConfigError(f"PORT must be within 1..65535, got {s.port}")
    w, h = s.max_size
    if w < 32 or h < 32 or w % 32 or h % 32:
        raise ConfigError(f"MAX_SIZE must be two multiples of 32 (>= 32), got {w},{h}")
    for name in ("det_threshold", "nms_threshold"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise ConfigError(f"{name.upper()} must be within 0..1, got {getattr(s, name)}")
    for name in ("cpu_threads", "det_workers", "rec_workers"):
        if not 0 <= getattr(s, name) <= 256:
            raise ConfigError(
                f"{name.upper()} must be within 0..256 (0 = auto), got {getattr(s, name)}"
            )
    if not 0 <= s.stream_frame_slots <= 1024:
        raise ConfigError(
            f"STREAM_FRAME_SLOTS must be within 0..1024 (0 = auto), got {s.stream_frame_slots}"
        )
    if s.retry_after_s < 0 or s.stream_max_bad_frames < 0:
        raise ConfigError("RETRY_AFTER_S and STREAM_MAX_BAD_FRAMES must be >= 0")
    if not s.temp_warm_c < s.temp_hot_c < s.temp_critical_c:
        raise ConfigError(
            "TEMP_WARM_C < TEMP_HOT_C < TEMP_CRITICAL_C must hold, got "
            f"{s.temp_warm_c}, {s.temp_hot_c}, {s.temp_critical_c}"
        )
    if not 0 < s.ram_warm_pct < s.ram_hot_pct < s.ram_critical_pct <= 100:
        raise ConfigError(
            "0 < RAM_WARM_PCT < RAM_HOT_PCT < RAM_CRITICAL_PCT <= 100 must hold, got "
            f"{s.ram_warm_pct}, {s.ram_hot_pct}, {s.ram_critical_pct}"
        )
    if s.temp_hysteresis_c < 0 or s.ram_hysteresis_pct < 0 or s.watchdog_min_dwell_s < 0:
        raise ConfigError(
            "TEMP_HYSTERESIS_C, RAM_HYSTERESIS_PCT, WATCHDOG_MIN_DWELL_S must be >= 0"
        )
    if s.identify_threshold is not None and not -1.0 <= s.identify_threshold <= 1.0:
        raise ConfigError(
            f"IDENTIFY_THRESHOLD must be within -1..1 (cosine), got {s.identify_threshold}"
        )
    if s.gallery_ann_min_faces < 0:
        raise ConfigError(f"GALLERY_ANN_MIN_FACES must be >= 0, got {s.gallery_ann_min_faces}")
    if not 0.0 < s.track_min_iou < 1.0:
        raise ConfigError(f"TRACK_MIN_IOU must be within 0..1 (exclusive), got {s.track_min_iou}")
    if s.track_better_view <= 1.0:
        raise ConfigError(f"TRACK_BETTER_VIEW must be > 1, got {s.track_better_view}")
    if s.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(
            f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {s.log_level}"
        )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, annotation: Any, raw: Any) -> Any:
    """Turn a raw env string or TOML value into the field's type, or raise ConfigError."""
    env = name.upper()
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            return None
        return _parse(name, args[0], raw)
    if origin is Literal:
        choices = get_args(annotation)
        value = str(raw).strip().lower()
        if value not in choices:
            raise ConfigError(f"{env} must be one of {', '.join(choices)}, got {raw!r}")
        return value
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        value = str(raw).strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ConfigError(f"{env} must be a boolean (1/0, true/false), got {raw!r}")
    if annotation is int or annotation is float:
        # TOML gives typed values: a boolean or a fraction where an integer belongs is a mistake,
        # not something to truncate.
        if isinstance(raw, bool) or (annotation is int and isinstance(raw, float)):
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"{env} must be {kind}, got {raw!r}")
        try:
            return annotation(raw)
        except (TypeError, ValueError):
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"{env} must be {kind}, got {raw!r}") from None
    if annotation is Path:
        return Path(str(raw)).expanduser()
    if annotation is str:
        return str(raw)
    if origin is tuple:
        item_types = get_args(annotation)
        parts: list[Any] = (
            [p.strip() for p in raw.split(",")] if isinstance(raw, str) else list(raw)
        )
        items = [i for i in parts if i != ""]
        if item_types and item_types[-1] is Ellipsis:
            return tuple(_parse(name, item_types[0], i) for i in items)
        if len(items) != len(item_types):
            raise ConfigError(
                f"{env} must have {len(item_types)} comma-separated values, got {raw!r}"
            )
        return tuple(_parse(name, a, i) for a, i in zip(item_types, items, strict=True))
    raise ConfigError(f"{env}: unsupported setting type {annotation!r}")  # pragma: no cover


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build Settings from a TOML file, then the environment, then explicit overrides."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(Settings)
    fields = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or (Path(env[CONFIG_FILE_ENV]) if env.get(CONFIG_FILE_ENV) else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{CONFIG_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{CONFIG_FILE_ENV}: {path} is not valid TOML: {exc}") from None
        for key, raw in data.items():
            if key not in fields:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[key] = _parse(key, hints[key], raw)

    for name in fields:
        if name.upper() in env:
            values[name] = _parse(name, hints[name], env[name.upper()])
    for name, value in overrides.items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = value
    try:
        return Settings(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the field check above
        raise ConfigError(str(exc)) from None


def settings_table() -> list[tuple[str, str, str]]:
    """(ENV_NAME, type, default) for every setting, for docs and `appliance config`."""
    hints = typing.get_type_hints(Settings)
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default_text = ",".join(str(x) for x in default)
        else:
            default_text = "" if default is None else str(default)
        rows.append((f.name.upper(), _type_name(hints[f.name]), default_text))
    return rows


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return f"{_type_name(inner[0])} (optional)"
    if origin is tuple:
        args = get_args(annotation)
        if args and args[-1] is Ellipsis:
            return f"comma-separated {_type_name(args[0])}s"
        return ",".join(_type_name(a) for a in args)
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
