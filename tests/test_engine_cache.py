"""Engine cache: keys, file format, atomic writes, rebuild of bad engines, and the build lock.

Lock tests use real processes and threads; nothing is patched.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from appliance.backends.engine_cache import (
    MAGIC,
    CacheMiss,
    EngineCache,
    EngineCacheError,
    EngineKey,
    ProfileShape,
    atomic_write,
    decode_engine,
    encode_engine,
)

PROFILE = ProfileShape("input.1", (1, 3, 640, 640), (4, 3, 640, 640), (4, 3, 640, 640))
KEY = EngineKey(
    onnx_sha256="a" * 64,
    tensorrt_version="10.3.0",
    gpu_name="Orin (nvgpu)",
    compute_capability="8.7",
    precision="fp16",
    profiles=(PROFILE,),
)


def test_key_digest_is_stable_and_round_trips() -> None:
    assert KEY.digest() == EngineKey.from_dict(KEY.to_dict()).digest()
    assert len(KEY.digest()) == 64
    assert KEY.max_batch == 4


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "b" * 64},
        {"tensorrt_version": "10.7.0"},
        {"gpu_name": "NVIDIA H100"},
        {"compute_capability": "9.0"},
        {"precision": "fp32"},
        {
            "profiles": (
                ProfileShape("input.1", (1, 3, 640, 640), (8, 3, 640, 640), (8, 3, 640, 640)),
            )
        },
    ],
)
def test_every_key_field_changes_the_engine_file(change: dict[str, object], tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    other = dataclasses.replace(KEY, **change)  # type: ignore[arg-type]
    assert other.digest() != KEY.digest()
    assert cache.path_for("scrfd", other) != cache.path_for("scrfd", KEY)


def test_engine_file_name_says_model_precision_batch_and_key(tmp_path: Path) -> None:
    path = EngineCache(tmp_path).path_for("scrfd_10g/gnkps", KEY)
    assert path.parent == tmp_path
    assert path.name == f"scrfd_10g_gnkps.fp16.b4.{KEY.digest()[:16]}.engine"


def test_timing_cache_is_per_tensorrt_and_gpu_not_per_model(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    other_model = dataclasses.replace(KEY, onnx_sha256="c" * 64, precision="fp32")
    other_gpu = dataclasses.replace(KEY, gpu_name="NVIDIA H100", compute_capability="9.0")
    assert cache.timing_cache_path(other_model) == cache.timing_cache_path(KEY)
    assert cache.timing_cache_path(other_gpu) != cache.timing_cache_path(KEY)
    assert cache.read_timing_cache(KEY) is None
    cache.write_timing_cache(KEY, b"timings")
    assert cache.read_timing_cache(other_model) == b"timings"


def test_file_format_round_trips_and_rejects_damage() -> None:
    data = encode_engine(KEY, b"ENGINE" * 100)
    assert data.startswith(MAGIC)
    assert decode_engine(data, KEY) == b"ENGINE" * 100
    with pytest.raises(CacheMiss, match="corrupt: 594 engine bytes, header says 600"):
        decode_engine(data[:-6], KEY)
    flipped = data[:-1] + bytes([data[-1] ^ 0xFF])
    with pytest.raises(CacheMiss, match="checksum"):
        decode_engine(flipped, KEY)
    with pytest.raises(CacheMiss, match="not an appliance engine"):
        decode_engine(b"\x00plain TensorRT plan", KEY)
    with pytest.raises(CacheMiss, match="unreadable header"):
        decode_engine(MAGIC + (5).to_bytes(4, "big") + b"{{{{{", KEY)


def test_engine_for_another_key_is_stale_and_names_what_changed() -> None:
    upgraded = dataclasses.replace(KEY, tensorrt_version="10.7.0")
    with pytest.raises(CacheMiss, match=r"stale: built for another tensorrt_version"):
        decode_engine(encode_engine(KEY, b"x"), upgraded)


class Builder:
    """Counts builds; `accept` rejects payloads that start with b"bad"."""

    def __init__(self, payload: bytes = b"engine-v1") -> None:
        self.payload = payload
        self.builds = 0

    def build(self) -> bytes:
        self.builds += 1
        return self.payload

    @staticmethod
    def accept(payload: bytes) -> bytes:
        if payload.startswith(b"bad"):
            raise ValueError("Serialization assertion failed (version tag mismatch)")
        return payload


def test_missing_engine_is_built_once_then_reused(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path), Builder()
    first = cache.get_or_build("rec", KEY, builder.build, builder.accept)
    assert (first.built, first.reason, first.value) == (True, "missing", b"engine-v1")
    assert first.path.is_file()
    second = cache.get_or_build("rec", KEY, builder.build, builder.accept)
    assert (second.built, second.reason, second.value) == (False, "", b"engine-v1")
    assert builder.builds == 1
    assert cache.status("rec", KEY) == "ok"


def test_corrupt_engine_is_rebuilt_not_used(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path), Builder()
    path = cache.get_or_build("rec", KEY, builder.build, builder.accept).path
    path.write_bytes(path.read_bytes()[:-3])  # a torn copy
    assert cache.status("rec", KEY).startswith("corrupt")
    result = cache.get_or_build("rec", KEY, builder.build, builder.accept)
    assert result.built and result.reason.startswith("corrupt")
    assert builder.builds == 2
    assert cache.read("rec", KEY) == b"engine-v1"


def test_engine_the_runtime_cannot_deserialise_is_rebuilt(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.write("rec", KEY, b"bad engine from an older TensorRT")
    builder = Builder()
    result = cache.get_or_build("rec", KEY, builder.build, builder.accept)
    assert result.built
    assert result.reason == (
        "cannot be deserialised: Serialization assertion failed (version tag mismatch)"
    )
    assert cache.read("rec", KEY) == b"engine-v1"


def test_force_rebuilds_a_good_engine(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path), Builder()
    cache.get_or_build("rec", KEY, builder.build, builder.accept)
    builder.payload = b"engine-v2"
    result = cache.get_or_build("rec", KEY, builder.build, builder.accept, force=True)
    assert (result.built, result.reason, result.value) == (True, "forced", b"engine-v2")


def test_failed_build_leaves_the_old_engine_and_no_temporary_files(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path), Builder()
    path = cache.get_or_build("rec", KEY, builder.build, builder.accept).path

    def broken() -> bytes:
        raise RuntimeError("out of workspace memory")

    with pytest.raises(EngineCacheError, match="building the engine for rec failed: out of"):
        cache.get_or_build("rec", KEY, broken, builder.accept, force=True)
    assert cache.read("rec", KEY) == b"engine-v1"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert path.is_file()


def test_a_fresh_engine_that_cannot_be_loaded_is_an_error(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path), Builder(payload=b"bad build")
    with pytest.raises(EngineCacheError, match="just built for rec cannot be loaded"):
        cache.get_or_build("rec", KEY, builder.build, builder.accept)


def test_leftovers_of_a_crashed_builder_are_removed(tmp_path: Path) -> None:
    cache, builder = EngineCache(tmp_path), Builder()
    name = cache.path_for("rec", KEY).name
    leftover = tmp_path / f".{name}.k3j2h1.tmp"
    leftover.write_bytes(b"half an engine")
    cache.get_or_build("rec", KEY, builder.build, builder.accept)
    assert not leftover.exists()


def test_readers_never_see_a_partly_written_engine(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    payloads = [bytes([65 + i]) * (4 << 20) for i in range(2)]  # 4 MiB each
    cache.write("det", KEY, payloads[0])
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(cache.read("det", KEY)[:1])
            except CacheMiss as miss:
                errors.append(miss.reason)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(20):
        cache.write("det", KEY, payloads[i % 2])
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert set(seen) <= {b"A", b"B"}
    assert len(seen) > 0


def test_atomic_write_sets_readable_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.engine"
    atomic_write(target, b"data")
    assert target.read_bytes() == b"data"
    assert target.stat().st_mode & 0o777 == 0o644


def test_lock_excludes_other_threads(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    events: list[str] = []
    holding = threading.Event()

    def holder() -> None:
        with cache.lock("x"):
            events.append("a-in")
            holding.set()
            time.sleep(0.3)
            events.append("a-out")

    t = threading.Thread(target=holder)
    t.start()
    holding.wait()
    waits: list[float] = []
    with cache.lock("x", on_wait=waits.append):
        events.append("b-in")
    t.join()
    assert events == ["a-in", "a-out", "b-in"]
    assert len(waits) == 1


def test_lock_wait_gives_up_with_a_clear_message(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    impatient = EngineCache(tmp_path, lock_timeout_s=0.2)
    with (
        cache.lock("x"),
        pytest.raises(EngineCacheError, match=r"held x\.lock .* 0 s"),
        impatient.lock("x"),
    ):
        pass


def _build_in_process(directory: str, log: str, barrier_dir: str) -> str:
    """One of several processes that want the same engine at the same moment."""
    # Wait until every process has started, so they really compete.
    Path(barrier_dir, str(os.getpid())).touch()
    deadline = time.monotonic() + 30
    while len(list(Path(barrier_dir).iterdir())) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)

    def build() -> bytes:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # a build takes a while; the others must wait, not build too
        return f"engine built by {os.getpid()}".encode()

    result = EngineCache(Path(directory)).get_or_build("det", KEY, build, lambda p: p)
    return result.value.decode()


def test_concurrent_processes_build_the_engine_once(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    engines = tmp_path / "engines"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_build_in_process, [(str(engines), str(log), str(barrier))] * 4)
    builders = log.read_text().split()
    assert len(builders) == 1
    assert results == [f"engine built by {builders[0]}"] * 4
    assert [p.name for p in engines.iterdir() if p.suffix == ".engine"] == [
        EngineCache(engines).path_for("det", KEY).name
    ]
