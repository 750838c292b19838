"""Which backend the appliance picks at start-up, and the TensorRT backend's pure helpers.

This machine has no TensorRT: the selection runs for real here. To see the choice on a
machine that has TensorRT, one test plants minimal `tensorrt` and `pycuda` packages (the
facts JETSON.md states: TensorRT 10.3 bindings, one CUDA device) on a child interpreter's path
and runs the real selection code there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from appliance.backends.base import BackendError, InferenceBackend
from appliance.backends.batching import with_batch_axis
from appliance.backends.cuda_buffers import has_fast_fp16
from appliance.backends.factory import (
    image_shape_for,
    open_backend,
    resolve_backend,
    tensorrt_usable,
)
from appliance.backends.tensorrt_build import (
    EnginePlan,
    plan_engine,
    profile_shapes,
    tensorrt_available,
)
from appliance.config import Settings, load_settings
from appliance.models import onnx_graph
from appliance.models.demo import build_arcface_model, build_scrfd_model
from appliance.models.registry import DEMO_DETECTOR, DEMO_MODELS, DEMO_RECOGNIZER

REPO = Path(__file__).resolve().parents[1]


def settings(**values: Any) -> Settings:
    return load_settings(env={}, **values)


def test_onnx_is_used_when_asked_for() -> None:
    assert resolve_backend(settings(inference_backend="onnx")) == "onnx"


def test_auto_falls_back_to_onnx_runtime_without_tensorrt() -> None:
    usable, reason = tensorrt_usable()
    assert not usable
    assert "TensorRT" in reason
    assert resolve_backend(settings(inference_backend="auto")) == "onnx"


def test_forcing_trt_without_tensorrt_fails_at_start_with_the_reason() -> None:
    with pytest.raises(BackendError) as info:
        resolve_backend(settings(inference_backend="trt"))
    message = str(info.value)
    assert message.startswith("INFERENCE_BACKEND=trt but TensorRT cannot be used here: ")
    assert "INFERENCE_BACKEND=onnx" in message  # says how to get going


def test_type_stubs_are_not_mistaken_for_tensorrt() -> None:
    # `pip install tensorrt-stubs` leaves an importable, empty `tensorrt` namespace package.
    usable, reason = tensorrt_available()
    assert not usable
    assert "stubs" in reason or "not installed" in reason


FAKE_TENSORRT = """
__version__ = "{version}"
class Runtime: ...
"""
FAKE_PYCUDA_DRIVER = """
class Device:
    @staticmethod
    def count():
        return {count}
def init():
    {init}
"""


def _select_in_child(
    tmp_path: Path, version: str, count: int, init: str = "pass"
) -> dict[str, str]:
    site = tmp_path / "site"
    (site / "tensorrt").mkdir(parents=True)
    (site / "pycuda").mkdir()
    (site / "tensorrt" / "__init__.py").write_text(FAKE_TENSORRT.format(version=version))
    (site / "pycuda" / "__init__.py").write_text("")
    (site / "pycuda" / "driver.py").write_text(
        textwrap.dedent(FAKE_PYCUDA_DRIVER).format(count=count, init=init)
    )
    code = textwrap.dedent(
        """
        import json
        from appliance.backends.factory import resolve_backend, tensorrt_usable
        from appliance.config import load_settings
        usable, reason = tensorrt_usable()
        print(json.dumps({"auto": resolve_backend(load_settings(env={})), "reason": reason}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_auto_picks_tensorrt_where_tensorrt_pycuda_and_a_gpu_are_present(tmp_path: Path) -> None:
    # JETSON.md: "TensorRT 10.3 (Python bindings for the system Python ...)".
    result = _select_in_child(tmp_path, "10.3.0.30", count=1)
    assert result == {"auto": "trt", "reason": "TensorRT 10.3.0.30, 1 CUDA device(s)"}


@pytest.mark.parametrize(
    ("version", "count", "init", "why"),
    [
        ("8.6.2", 1, "pass", "TensorRT 8.6.2 found; this appliance needs TensorRT 10.x"),
        ("10.3.0", 0, "pass", "no CUDA GPU is visible"),
        ("10.3.0", 1, "raise RuntimeError('cuInit failed: no CUDA-capable device')", "cuInit"),
    ],
)
def test_auto_keeps_onnx_runtime_and_says_why(
    tmp_path: Path, version: str, count: int, init: str, why: str
) -> None:
    result = _select_in_child(tmp_path, version, count, init)
    assert result["auto"] == "onnx"
    assert why in result["reason"]


def test_onnx_backend_opens_through_the_factory(tmp_path: Path) -> None:
    info = DEMO_MODELS[DEMO_RECOGNIZER]
    path = build_arcface_model(tmp_path / info.file)
    backend = open_backend("onnx", settings(), info, path, max_batch=3)
    try:
        assert isinstance(backend, InferenceBackend)
        out = backend.infer(np.zeros((3, 3, 112, 112), np.float32))
        assert out["fc1"].shape == (3, 512)
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("capability", "fast"),
    [
        ((8, 7), True),
        ((7, 2), True),
        ((6, 2), True),
        ((6, 1), False),
        ((5, 3), True),
        ((5, 2), False),
        ((9, 0), True),
    ],
)
def test_fast_fp16_follows_the_compute_capability(capability: tuple[int, int], fast: bool) -> None:
    # 8.7 AGX Orin, 7.2 Xavier, 6.2 TX2, 5.3 TX1; 6.1 consumer Pascal runs FP16 at 1/64.
    assert has_fast_fp16(capability) is fast


def test_outputs_without_a_batch_axis_get_one() -> None:
    flat = np.arange(2 * 6 * 4, dtype=np.float32).reshape(12, 4)  # (N*A, K) for N=2
    out = with_batch_axis(flat, 2)
    assert out.shape == (2, 6, 4)
    np.testing.assert_array_equal(out[1, 0], flat[6])
    emb = np.ones((3, 512), np.float32)
    assert with_batch_axis(emb, 3) is emb
    assert with_batch_axis(np.ones(8, np.float32), 2).shape == (2, 4)


def test_profile_covers_batch_one_to_max_with_opt_at_max(tmp_path: Path) -> None:
    info = DEMO_MODELS[DEMO_RECOGNIZER]
    path = build_arcface_model(tmp_path / "rec.onnx", dynamic_batch=False)
    model = onnx_graph.make_batch_dynamic(onnx_graph.load(path))
    (profile,) = profile_shapes(model, 4, image_shape_for(settings(), info))
    assert profile.name == "data"
    assert (profile.min, profile.opt, profile.max) == (
        (1, 3, 112, 112),
        (4, 3, 112, 112),
        (4, 3, 112, 112),
    )


def test_detector_with_dynamic_size_takes_max_size_width_then_height(tmp_path: Path) -> None:
    path = build_scrfd_model(tmp_path / "det.onnx", input_size=(640, 480))
    model = onnx_graph.load(path)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "height"
    dims[3].Clear()
    dims[3].dim_param = "width"
    shape = image_shape_for(settings(max_size=(640, 480)), DEMO_MODELS[DEMO_DETECTOR])
    assert shape == (3, 480, 640)
    (profile,) = profile_shapes(model, 2, shape)
    assert profile.max == (2, 3, 480, 640)


class StandInToolchain:
    """The facts a TensorRT toolchain reports, for planning (no build here)."""

    tensorrt_version = "10.3.0"
    gpu_name = "Orin (nvgpu)"
    compute_capability = "8.7"

    def __init__(self, fast: bool = True) -> None:
        self._fast = fast

    @property
    def fast_fp16(self) -> bool:
        return self._fast

    def build(self, plan: EnginePlan, timing: bytes | None, progress: object) -> tuple[bytes, None]:
        raise AssertionError("not built in these tests")

    def check(self, engine: bytes) -> None:
        return None


@pytest.mark.parametrize(
    ("force_fp16", "fast", "precision"),
    [(True, True, "fp16"), (False, True, "fp32"), (True, False, "fp32")],
)
def test_precision_is_fp16_only_when_forced_and_fast(
    tmp_path: Path, force_fp16: bool, fast: bool, precision: str
) -> None:
    info = DEMO_MODELS[DEMO_RECOGNIZER]
    path = build_arcface_model(tmp_path / "rec.onnx")
    plan = plan_engine(
        settings(force_fp16=force_fp16, trt_workspace_mb=512),
        info,
        path,
        4,
        StandInToolchain(fast),
    )
    assert plan.key.precision == precision
    assert plan.workspace_bytes == 512 * 1024 * 1024
    assert plan.key.onnx_sha256 == onnx_graph.sha256_file(path)
    assert plan.key.compute_capability == "8.7"


def test_plan_rewrites_a_fixed_batch_model_to_a_dynamic_batch(tmp_path: Path) -> None:
    info = DEMO_MODELS[DEMO_DETECTOR]
    path = build_scrfd_model(
        tmp_path / "det.onnx", dynamic_batch=False, batch_axis_on_outputs=False
    )
    assert not onnx_graph.has_dynamic_batch(onnx_graph.load(path))
    plan = plan_engine(settings(det_batch_size=2), info, path, 2, StandInToolchain())
    rewritten = onnx.load_from_string(plan.onnx_bytes)
    assert onnx_graph.has_dynamic_batch(rewritten)
    assert plan.batch.mode == "rewritten"
    assert plan.key.profiles[0].min == (1, 3, 640, 640)
    assert plan.key.profiles[0].max == (2, 3, 640, 640)


def test_plan_keeps_the_fixed_batch_of_a_graph_that_bakes_it_in(
    real_models: Path,
) -> None:
    # MobileFaceNet reshapes to [1, -1]: a rewritten batch of 4 would come out as one row of
    # 512 numbers. The engine must then be built for the batch the model accepts, 1 only.
    info = DEMO_MODELS[DEMO_RECOGNIZER]
    path = real_models / "mobilefacenet_128.onnx"
    plan = plan_engine(settings(rec_batch_size=4), info, path, 4, StandInToolchain())
    assert plan.batch.mode == "pieces"
    assert (plan.batch.configured, plan.batch.effective) == (4, 1)
    assert not onnx_graph.has_dynamic_batch(onnx.load_from_string(plan.onnx_bytes))
    (profile,) = plan.key.profiles
    assert profile.min == profile.opt == profile.max == (1, 3, 112, 112)


def test_plan_of_the_real_scrfd_takes_max_size_for_its_open_height_and_width(
    real_models: Path,
) -> None:
    info = DEMO_MODELS[DEMO_DETECTOR]
    path = real_models / "scrfd_2.5g_bnkps.onnx"
    plan = plan_engine(
        settings(det_batch_size=2, max_size=(640, 480)), info, path, 2, StandInToolchain()
    )
    assert plan.batch.mode == "pieces"
    (profile,) = plan.key.profiles
    assert profile.min == profile.max == (1, 3, 480, 640)


def test_plan_of_a_missing_model_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"model file .*nope\.onnx does not exist"):
        plan_engine(
            settings(), DEMO_MODELS[DEMO_DETECTOR], tmp_path / "nope.onnx", 1, StandInToolchain()
        )
