"""Where TensorRT engines live on disk, and when one may be reused.

An engine is only valid for the exact ONNX file, TensorRT version, GPU, precision and
optimisation profile it was built with, so each engine file is named after a key made of
those facts (`EngineKey`). The file carries the key in a small header and a checksum of the
engine bytes, so a renamed, truncated or foreign file is detected and rebuilt, never used.

Writes are atomic (temporary file in the same directory, fsync, rename), and builders of the
same engine on one host take an `fcntl` lock first, so two processes starting at once build
it once and neither ever sees half a file. Nothing here imports TensorRT: the build and the
deserialisation are passed in as callables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

Precision = Literal["fp16", "fp32"]
T = TypeVar("T")

# Header: MAGIC, 4-byte big-endian header length, header JSON, engine bytes.
MAGIC = b"APPLIANCE-TRT-ENGINE/1\n"
_LEN_BYTES = 4
# A build of the largest models takes minutes on an Orin; a waiter gives up well after that.
DEFAULT_LOCK_TIMEOUT_S = 1800.0
_LOCK_POLL_S = 0.05


class EngineCacheError(RuntimeError):
    """The cache cannot produce an engine (lock timeout, build failure, unusable result)."""


class CacheMiss(Exception):
    """No usable engine file for a key; `reason` says why (missing, corrupt, stale)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ProfileShape:
    """The optimisation profile of one input: min, opt and max shapes (batch first)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "min": list(self.min),
            "opt": list(self.opt),
            "max": list(self.max),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileShape:
        return cls(
            name=str(data["name"]),
            min=tuple(int(d) for d in data["min"]),
            opt=tuple(int(d) for d in data["opt"]),
            max=tuple(int(d) for d in data["max"]),
        )


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two equal keys may share one engine file."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    # "major.minor", e.g. "8.7" for AGX Orin.
    compute_capability: str
    precision: Precision
    profiles: tuple[ProfileShape, ...]
    # The conversion prepended to the graph (`onnx_graph.InputRewrite.describe()`), "" for
    # none: the file's sha256 alone no longer names the graph the engine was built from.
    input_rewrite: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_sha256": self.onnx_sha256,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "profiles": [p.to_dict() for p in self.profiles],
            "input_rewrite": self.input_rewrite,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        precision = data["precision"]
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"unknown precision {precision!r}")
        return cls(
            onnx_sha256=str(data["onnx_sha256"]),
            tensorrt_version=str(data["tensorrt_version"]),
            gpu_name=str(data["gpu_name"]),
            compute_capability=str(data["compute_capability"]),
            precision=precision,
            profiles=tuple(ProfileShape.from_dict(p) for p in data["profiles"]),
            input_rewrite=str(data.get("input_rewrite", "")),
        )

    def digest(self) -> str:
        """sha256 of the canonical JSON form of the key."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def max_batch(self) -> int:
        return max((p.max[0] for p in self.profiles if p.max), default=1)

    def platform_digest(self) -> str:
        """sha256 of what a timing cache depends on: TensorRT version and GPU."""
        text = f"{self.tensorrt_version}|{self.gpu_name}|{self.compute_capability}"
        return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class CacheResult(Generic[T]):
    """What `get_or_build` produced: the accepted engine, its file, and whether it was built."""

    value: T
    path: Path
    built: bool
    # Why it was built ("missing", "corrupt: ...", "forced", ...); "" when reused.
    reason: str
    seconds: float


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"


def encode_engine(key: EngineKey, payload: bytes) -> bytes:
    header = json.dumps(
        {
            "key": key.to_dict(),
            "digest": key.digest(),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_bytes": len(payload),
        },
        sort_keys=True,
    ).encode()
    return MAGIC + len(header).to_bytes(_LEN_BYTES, "big") + header + payload


def decode_engine(data: bytes, key: EngineKey) -> bytes:
    """The engine bytes of a cache file, or CacheMiss when it is corrupt or for another key."""
    if not data.startswith(MAGIC):
        raise CacheMiss("corrupt: not an appliance engine file")
    start = len(MAGIC) + _LEN_BYTES
    size = int.from_bytes(data[len(MAGIC) : start], "big")
    try:
        header = json.loads(data[start : start + size])
        stored = EngineKey.from_dict(header["key"])
        expected_bytes = int(header["payload_bytes"])
        expected_sha = str(header["payload_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheMiss(f"corrupt: unreadable header ({exc})") from None
    if stored != key:
        changed = sorted(k for k, v in key.to_dict().items() if stored.to_dict().get(k) != v)
        raise CacheMiss(f"stale: built for another {', '.join(changed)}")
    payload = data[start + size :]
    if len(payload) != expected_bytes:
        raise CacheMiss(f"corrupt: {len(payload)} engine bytes, header says {expected_bytes}")
    if hashlib.sha256(payload).hexdigest() != expected_sha:
        raise CacheMiss("corrupt: engine bytes do not match their checksum")
    return payload


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class EngineCache:
    """Engine files in one directory (ENGINES_DIR), named `<label>.<precision>.b<N>.<key>.engine`."""

    def __init__(self, directory: Path, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        self.directory = directory
        self.lock_timeout_s = lock_timeout_s

    def path_for(self, label: str, key: EngineKey) -> Path:
        name = f"{_safe_label(label)}.{key.precision}.b{key.max_batch}.{key.digest()[:16]}.engine"
        return self.directory / name

    def timing_cache_path(self, key: EngineKey) -> Path:
        return self.directory / f"timing.{key.platform_digest()[:16]}.cache"

    def read(self, label: str, key: EngineKey) -> bytes:
        """The engine bytes for `key`; CacheMiss when the file is missing, corrupt or stale."""
        path = self.path_for(label, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheMiss("missing") from None
        except OSError as exc:
            raise CacheMiss(f"unreadable: {exc.strerror}") from None
        return decode_engine(data, key)

    def write(self, label: str, key: EngineKey, payload: bytes) -> Path:
        path = self.path_for(label, key)
        atomic_write(path, encode_engine(key, payload))
        return path

    def status(self, label: str, key: EngineKey) -> str:
        """ "ok", or the reason the engine would be (re)built."""
        try:
            self.read(label, key)
        except CacheMiss as miss:
            return miss.reason
        return "ok"

    @contextlib.contextmanager
    def lock(self, name: str, on_wait: Callable[[float], None] | None = None) -> Iterator[None]:
        """Hold an exclusive `fcntl.flock` on `<name>.lock` in the cache directory.

        flock locks belong to the open file description, so this excludes other processes
        and other threads of this process alike. The lock file is left in place: deleting it
        while another process waits on it would let a third one lock a new file.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            started = time.monotonic()
            notified = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                waited = time.monotonic() - started
                if waited > self.lock_timeout_s:
                    raise EngineCacheError(
                        f"another process has held {name}.lock in {self.directory} for more "
                        f"than {self.lock_timeout_s:.0f} s; is a build stuck?"
                    ) from None
                if on_wait is not None and not notified:
                    on_wait(waited)
                    notified = True
                time.sleep(_LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _remove_leftovers(self, path: Path) -> None:
        # Temporary files of a builder that died; only called under the engine's lock.
        for tmp in self.directory.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def get_or_build(
        self,
        label: str,
        key: EngineKey,
        build: Callable[[], bytes],
        accept: Callable[[bytes], T],
        force: bool = False,
        on_event: Callable[[str], None] | None = None,
    ) -> CacheResult[T]:
        """Reuse the engine for `key` if `accept` (deserialisation) takes it, else build it.

        `accept` raising any exception on a cached file means the file is not usable (a
        TensorRT that cannot deserialise it): it is rebuilt. The same failure on a freshly
        built engine raises EngineCacheError.
        """
        notify = on_event or (lambda _msg: None)
        started = time.monotonic()
        path = self.path_for(label, key)

        def try_cached() -> CacheResult[T] | str:
            """The reusable engine, or the reason there is none."""
            try:
                payload = self.read(label, key)
            except CacheMiss as miss:
                return miss.reason
            try:
                value = accept(payload)
            except Exception as exc:
                return f"cannot be deserialised: {exc}"
            return CacheResult(value, path, False, "", time.monotonic() - started)

        reason = "forced"
        if not force:
            found = try_cached()
            if isinstance(found, CacheResult):
                return found
            reason = found
        lock_name = path.name.removesuffix(".engine")
        with self.lock(lock_name, on_wait=lambda _s: notify("waiting for another builder")):
            if not force:
                # Another process may have built it while this one waited for the lock.
                found = try_cached()
                if isinstance(found, CacheResult):
                    return found
                reason = found
            self._remove_leftovers(path)
            notify(f"building ({reason})")
            try:
                payload = build()
            except EngineCacheError:
                raise
            except Exception as exc:
                raise EngineCacheError(f"building the engine for {label} failed: {exc}") from exc
            notify("writing")
            self.write(label, key, payload)
        try:
            value = accept(payload)
        except Exception as exc:
            raise EngineCacheError(
                f"the engine just built for {label} cannot be loaded: {exc}"
            ) from exc
        return CacheResult(value, path, True, reason, time.monotonic() - started)

    def read_timing_cache(self, key: EngineKey) -> bytes | None:
        try:
            return self.timing_cache_path(key).read_bytes()
        except OSError:
            return None

    def write_timing_cache(self, key: EngineKey, data: bytes) -> None:
        path = self.timing_cache_path(key)
        with self.lock(path.name):
            atomic_write(path, data)
