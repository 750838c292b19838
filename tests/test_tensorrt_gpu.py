"""The pycuda buffers (gpu) and the TensorRT backend (tensorrt) on real hardware.

Both marks skip, with the reason, where pycuda, a GPU or TensorRT is missing. Only numpy,
pytest and pycuda are imported at module level beyond the package, so the file also runs on
a GPU machine that lacks the appliance's web dependencies (`pytest --noconftest`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.backends.cuda_buffers import CudaDevice, CudaError, IOBuffers, device_count


def _gpu_missing() -> str | None:
    try:
        if device_count() < 1:
            return "no CUDA GPU visible"
    except CudaError as exc:
        return str(exc)
    return None


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt
    except ImportError as exc:
        return f"the TensorRT Python bindings are not installed ({exc})"
    if not hasattr(tensorrt, "Runtime"):
        return "only TensorRT type stubs are installed"
    from appliance.backends.tensorrt_build import tensorrt_available

    usable, reason = tensorrt_available()
    return None if usable else reason


@pytest.fixture
def device() -> Iterator[CudaDevice]:
    reason = _gpu_missing()
    if reason:
        pytest.skip(reason)
    dev = CudaDevice(0)
    yield dev
    dev.release()


DET_MAX = (4, 3, 640, 640)
REC_MAX = (16, 3, 112, 112)


@pytest.mark.gpu
def test_full_batch_survives_host_device_device_host(device: CudaDevice) -> None:
    rng = np.random.default_rng(1)
    batch = rng.standard_normal(DET_MAX, dtype=np.float32)
    buffers = IOBuffers(device, {"a": (DET_MAX, np.float32), "b": (DET_MAX, np.float32)})
    try:
        with device.activate() as cuda:
            buffers.upload("a", batch)
            # Device-to-device copy: what comes back must have been in GPU memory.
            cuda.memcpy_dtod_async(
                buffers["b"].device, buffers["a"].device, buffers["a"].nbytes, buffers.stream
            )
            got = buffers.download("b", DET_MAX)
            buffers.synchronize()
        assert got.shape == DET_MAX
        np.testing.assert_array_equal(got, batch)
    finally:
        buffers.close()


@pytest.mark.gpu
def test_smaller_batches_move_only_their_part(device: CudaDevice) -> None:
    buffers = IOBuffers(device, {"rec": (REC_MAX, np.float32)})
    try:
        full = np.full(REC_MAX, 5.0, np.float32)
        buffers.round_trip("rec", full)
        part = np.arange(3 * 3 * 112 * 112, dtype=np.float32).reshape(3, 3, 112, 112)
        np.testing.assert_array_equal(buffers.round_trip("rec", part), part)
        # Images 3.. on the device still hold the earlier full batch.
        np.testing.assert_array_equal(buffers.round_trip("rec", full)[3:], full[3:])
        with pytest.raises(CudaError, match="does not fit"):
            buffers.round_trip("rec", np.zeros((17, 3, 112, 112), np.float32))
    finally:
        buffers.close()


@pytest.mark.gpu
def test_buffers_are_sized_for_max_batch_and_returned_on_close(device: CudaDevice) -> None:
    big = (64, 3, 640, 640)  # 300 MiB: well above allocation granularity noise
    nbytes = int(np.prod(big)) * 4
    free_before, _ = device.memory_info()
    buffers = IOBuffers(device, {"x": (big, np.float32)})
    assert buffers["x"].nbytes == nbytes
    assert buffers["x"].host.shape == big
    free_during, _ = device.memory_info()
    assert free_before - free_during >= nbytes
    buffers.close()
    buffers.close()  # idempotent
    free_after, _ = device.memory_info()
    assert free_before - free_after < 16 << 20


@pytest.mark.gpu
def test_buffers_work_from_another_thread(device: CudaDevice) -> None:
    # The batcher's worker thread runs inference on objects made on the start-up thread.
    buffers = IOBuffers(device, {"x": ((8, 512), np.float32)})
    data = np.random.default_rng(2).standard_normal((8, 512), dtype=np.float32)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(buffers.round_trip("x", data))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buffers.close()
    assert errors == []
    assert len(results) == 4
    for r in results:
        np.testing.assert_array_equal(r, data)


@pytest.mark.gpu
def test_device_reports_name_and_compute_capability(device: CudaDevice) -> None:
    assert device.name
    major, minor = device.compute_capability
    assert major >= 5
    assert device.compute_capability_text == f"{major}.{minor}"


# TensorRT: only where the bindings are installed (a Jetson, or a desktop with TensorRT 10).


@pytest.fixture
def trt_settings(tmp_path: Path) -> object:
    reason = _gpu_missing() or _tensorrt_missing()
    if reason:
        pytest.skip(reason)
    from appliance.config import load_settings

    return load_settings(
        env={},
        models_dir=tmp_path / "models",
        engines_dir=tmp_path / "engines",
        det_batch_size=2,
        rec_batch_size=4,
        force_fp16=True,
        trust_unverified=True,
    )


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_fp16_engine_matches_onnx_runtime_and_is_reused(
    trt_settings: object, tmp_path: Path
) -> None:
    from appliance.backends.ort import OnnxRuntimeBackend
    from appliance.backends.tensorrt import open_tensorrt_backend
    from appliance.commands.check import compare, sample_batch
    from appliance.commands.engines import ModelTarget
    from appliance.config import Settings
    from appliance.models.demo import build_arcface_model
    from appliance.models.registry import DEMO_MODELS, DEMO_RECOGNIZER

    assert isinstance(trt_settings, Settings)
    info = DEMO_MODELS[DEMO_RECOGNIZER]
    path = build_arcface_model(tmp_path / "models" / info.file, dynamic_batch=False)
    target = ModelTarget(info, path, 4)
    reference = OnnxRuntimeBackend(path, info, max_batch=4)
    engine = open_tensorrt_backend(trt_settings, info, path, max_batch=4)
    try:
        result = compare(target, reference, engine, sample_batch(trt_settings, target, 0))
        assert min(result.cosines) > 0.99
        assert engine.infer(sample_batch(trt_settings, target, 1)[:1])["fc1"].shape == (1, 512)
    finally:
        engine.close()
        reference.close()
    files = sorted((tmp_path / "engines").glob("*.engine"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = open_tensorrt_backend(trt_settings, info, path, max_batch=4)
    again.close()
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_detector_without_batch_axis_gets_one(trt_settings: object, tmp_path: Path) -> None:
    from appliance.backends.tensorrt import open_tensorrt_backend
    from appliance.config import Settings
    from appliance.models.demo import PlantedFace, build_scrfd_model
    from appliance.models.registry import DEMO_DETECTOR, DEMO_MODELS

    assert isinstance(trt_settings, Settings)
    info = DEMO_MODELS[DEMO_DETECTOR]
    path = build_scrfd_model(
        tmp_path / "models" / info.file,
        (PlantedFace.square(100, 100, 80),),
        dynamic_batch=False,
        batch_axis_on_outputs=False,
    )
    backend = open_tensorrt_backend(trt_settings, info, path, max_batch=2)
    try:
        out = backend.infer(np.zeros((2, 3, 640, 640), np.float32))
        shapes = [v.shape for v in out.values()]
        assert shapes[0] == (2, 80 * 80 * 2, 1)  # scores, stride 8
        assert all(s[0] == 2 for s in shapes)
    finally:
        backend.close()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_fixed_batch_real_recognizer_gets_a_profile_it_accepts_and_runs_in_pieces(
    trt_settings: object, real_models: Path
) -> None:
    from appliance.backends.ort import OnnxRuntimeBackend
    from appliance.backends.tensorrt import open_tensorrt_backend
    from appliance.config import Settings
    from appliance.models.registry import BUILTIN_MODELS

    assert isinstance(trt_settings, Settings)
    info = BUILTIN_MODELS["mobilefacenet_128"]
    path = real_models / info.file
    engine = open_tensorrt_backend(trt_settings, info, path, max_batch=4)
    reference = OnnxRuntimeBackend(path, info, max_batch=4)
    try:
        assert (engine.batch_plan.mode, engine.batch_plan.effective) == ("pieces", 1)
        x = np.random.default_rng(2).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
        got = engine.infer(x)["output0"]
        want = reference.infer(x)["output0"]
        assert got.shape == want.shape == (3, 128)
        cos = np.sum(got * want, axis=1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        )
        assert cos.min() > 0.99
    finally:
        engine.close()
        reference.close()
