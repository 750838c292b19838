"""TensorRT 10 engines: plan (the batch profile the model accepts), build and cache them.

Build (`TensorRTToolchain.build`): a fixed-batch ONNX file is rewritten to a dynamic batch
where the graph allows it (`batching.plan_batch` proves the rewrite), parsed, and built with
one optimisation profile for the batch: min 1, opt = max = DET_BATCH_SIZE or REC_BATCH_SIZE;
or, for a graph that keeps its fixed batch N, min = opt = max = N and runs in pieces of N, so
the profile is always one the model accepts. FP16 when FORCE_FP16 is set and the GPU has fast
FP16, a workspace limit (TRT_WORKSPACE_MB) and a timing cache persisted next to the engines so
later builds on the same device are faster. Engines are cached by key in ENGINES_DIR
(`engine_cache`). Running them is `backends.tensorrt`.

Only APIs present from TensorRT 10.0 to the latest 10.x are used. Two deprecations are worked
around rather than followed: `Builder.platform_has_fast_fp16` (deprecated in 10.5) is replaced
by a compute-capability test, and `BuilderFlag.FP16` (deprecated in 10.12 in favour of strongly
typed networks, still present in every 10.x) is kept because JetPack 6.2 ships 10.3, which
has no alternative for an FP32 ONNX model.

`tensorrt` and `pycuda` are imported inside functions: this module imports everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from appliance.backends.base import (
    BackendError,
)
from appliance.backends.batching import BatchPlan, plan_batch
from appliance.backends.cuda_buffers import CudaDevice, CudaError, has_fast_fp16
from appliance.backends.engine_cache import (
    CacheResult,
    EngineCache,
    EngineKey,
    Precision,
    ProfileShape,
)
from appliance.backends.factory import image_shape_for
from appliance.config import Settings
from appliance.models import onnx_graph
from appliance.models.registry import ModelInfo

if TYPE_CHECKING:
    import onnx
    import tensorrt as trt

log = structlog.get_logger("appliance.tensorrt")

# A phase or step description from the build, for progress displays. Called from TensorRT's
# own threads during a build: implementations must be thread-safe.
ProgressFn = Callable[[str], None]

SUPPORTED_MAJOR = 10
INSTALL_HINT = (
    "on JetPack 6.2 install python3-libnvinfer (TensorRT 10.3) and pycuda "
    "(`pip install 'appliance[trt]'`), or set INFERENCE_BACKEND=onnx"
)


def _ignore(_message: str) -> None:
    return None


def tensorrt_available() -> tuple[bool, str]:
    """Whether the TensorRT 10 bindings, pycuda and a CUDA GPU are all present, and why not."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"the TensorRT Python bindings are not installed ({exc}); {INSTALL_HINT}"
    except Exception as exc:  # the bindings load libnvinfer and can fail in many ways
        return False, f"the TensorRT Python bindings fail to load ({exc}); {INSTALL_HINT}"
    # The `tensorrt-stubs` package (for mypy) installs a bare `tensorrt/` folder of .pyi files
    # that Python imports as an empty namespace package: that is not TensorRT.
    version = getattr(trt, "__version__", None)
    if version is None or not hasattr(trt, "Runtime"):
        return False, f"only type stubs of TensorRT are installed, not the library; {INSTALL_HINT}"
    major = str(version).split(".")[0]
    if major != str(SUPPORTED_MAJOR):
        return False, f"TensorRT {version} found; this appliance needs TensorRT 10.x"
    try:
        from appliance.backends.cuda_buffers import device_count

        count = device_count()
    except CudaError as exc:
        return False, f"{exc}; {INSTALL_HINT}"
    if count < 1:
        return False, "no CUDA GPU is visible (in a container: is the NVIDIA runtime in use?)"
    return True, f"TensorRT {version}, {count} CUDA device(s)"


def profile_shapes(
    model: onnx.ModelProto,
    max_batch: int,
    image_shape: tuple[int, int, int],
    min_batch: int = 1,
) -> tuple[ProfileShape, ...]:
    """One optimisation profile: batch min_batch..max_batch, opt = max (the batcher fills
    batches under load, which is when speed matters). Non-batch dimensions the model fixes are
    kept; dynamic ones come from `image_shape`. A graph that keeps a fixed batch N gets
    min = opt = max = N: the only batch it accepts.
    """
    if not 1 <= min_batch <= max_batch:
        raise BackendError(
            f"batch range must satisfy 1 <= min <= max, got {min_batch}..{max_batch}"
        )
    initializers = {i.name for i in model.graph.initializer}
    profiles = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape: list[int] = []
        for axis, dim in enumerate(dims[1:], start=1):
            fixed = dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
            if fixed is None:
                if axis > len(image_shape):
                    raise BackendError(f"input {value.name}: dimension {axis} has no size")
                fixed = image_shape[axis - 1]
            shape.append(fixed)
        profiles.append(
            ProfileShape(
                value.name,
                min=(min_batch, *shape),
                opt=(max_batch, *shape),
                max=(max_batch, *shape),
            )
        )
    if not profiles:
        raise BackendError("the model has no inputs")
    return tuple(profiles)


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """What to build for one model, and the cache key that names the result."""

    label: str
    model_path: Path
    onnx_bytes: bytes
    key: EngineKey
    workspace_bytes: int
    batch: BatchPlan

    @property
    def fp16(self) -> bool:
        return self.key.precision == "fp16"


class EngineToolchain(Protocol):
    """What builds and checks engines: TensorRT on a device; a stand-in in the CLI tests."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @property
    def fast_fp16(self) -> bool: ...

    def build(
        self, plan: EnginePlan, timing_cache: bytes | None, progress: ProgressFn
    ) -> tuple[bytes, bytes | None]:
        """Serialized engine and the updated timing cache (None if not kept)."""
        ...

    def check(self, engine: bytes) -> None:
        """Raise if this runtime cannot deserialise `engine`."""
        ...


def plan_engine(
    settings: Settings,
    info: ModelInfo,
    model_path: Path,
    max_batch: int,
    toolchain: EngineToolchain,
    input_rewrite: onnx_graph.InputRewrite | None = None,
) -> EnginePlan:
    """Read the ONNX model, settle its batch (`batching.plan_batch`), compute the engine's key."""
    if not model_path.is_file():
        raise BackendError(f"model file {model_path} does not exist")
    try:
        model = onnx_graph.load(model_path)
    except Exception as exc:
        raise BackendError(f"{model_path} is not a readable ONNX model: {exc}") from None
    image_shape = image_shape_for(settings, info)
    model, batch = plan_batch(model, max_batch, image_shape)
    if input_rewrite is not None:
        # The builder sees the same rewritten graph ONNX Runtime runs: the conversion to
        # float NCHW then runs on the GPU, and the input binding is uint8 NHWC.
        try:
            model = onnx_graph.prepend_input_conversion(model, input_rewrite)
        except ValueError as exc:
            raise BackendError(f"{model_path}: cannot take uint8 input: {exc}") from None
        image_shape = (image_shape[1], image_shape[2], image_shape[0])
    profiles = profile_shapes(model, batch.effective, image_shape, batch.min_batch)
    precision: Precision = "fp16" if settings.force_fp16 and toolchain.fast_fp16 else "fp32"
    key = EngineKey(
        onnx_sha256=onnx_graph.sha256_file(model_path),
        tensorrt_version=toolchain.tensorrt_version,
        gpu_name=toolchain.gpu_name,
        compute_capability=toolchain.compute_capability,
        precision=precision,
        profiles=profiles,
        input_rewrite=input_rewrite.describe() if input_rewrite is not None else "",
    )
    return EnginePlan(
        label=info.name,
        model_path=model_path,
        onnx_bytes=model.SerializeToString(),
        key=key,
        workspace_bytes=settings.trt_workspace_mb << 20,
        batch=batch,
    )


def engine_builder(
    cache: EngineCache, plan: EnginePlan, toolchain: EngineToolchain, progress: ProgressFn
) -> Callable[[], bytes]:
    def build() -> bytes:
        timing = cache.read_timing_cache(plan.key)
        engine, new_timing = toolchain.build(plan, timing, progress)
        if new_timing:
            cache.write_timing_cache(plan.key, new_timing)
        return engine

    return build


def ensure_engine(
    plan: EnginePlan,
    cache: EngineCache,
    toolchain: EngineToolchain,
    force: bool = False,
    progress: ProgressFn = _ignore,
) -> CacheResult[None]:
    """Make sure a usable engine for `plan` is in the cache; build it if not (or if forced)."""
    return cache.get_or_build(
        plan.label,
        plan.key,
        engine_builder(cache, plan, toolchain, progress),
        toolchain.check,
        force=force,
        on_event=progress,
    )


class TensorRTToolchain:
    """The TensorRT builder and runtime on one CUDA device."""

    def __init__(self, device: CudaDevice | None = None) -> None:
        usable, reason = tensorrt_available()
        if not usable:
            raise BackendError(f"TensorRT cannot be used here: {reason}")
        import tensorrt as trt

        self.device = device or CudaDevice(0)
        self.tensorrt_version: str = trt.__version__
        self.gpu_name: str = self.device.name
        self.compute_capability: str = self.device.compute_capability_text
        self._logger = trt.Logger(trt.Logger.WARNING)
        with self.device.activate():
            self._runtime = trt.Runtime(self._logger)

    @property
    def fast_fp16(self) -> bool:
        return has_fast_fp16(self.device.compute_capability)

    def build(
        self, plan: EnginePlan, timing_cache: bytes | None, progress: ProgressFn
    ) -> tuple[bytes, bytes | None]:
        import tensorrt as trt

        class Monitor(trt.IProgressMonitor):
            """Forwards TensorRT's top-level build phases (IProgressMonitor exists since 10.0)."""

            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
                if not parent_phase:
                    progress(f"{phase_name} ({num_steps} steps)")

            def step_complete(self, phase_name: str, step: int) -> bool:
                return True  # False would cancel the build

            def phase_finish(self, phase_name: str) -> None:
                return None

        with self.device.activate():
            progress("parsing ONNX")
            builder = trt.Builder(self._logger)
            # TensorRT 10 networks are always explicit-batch; the old flag is deprecated.
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, self._logger)
            if not parser.parse(plan.onnx_bytes, str(plan.model_path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise BackendError(f"TensorRT cannot parse {plan.model_path}: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
            if plan.fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            profile = builder.create_optimization_profile()
            for shape in plan.key.profiles:
                profile.set_shape(
                    shape.name,
                    trt.Dims(list(shape.min)),
                    trt.Dims(list(shape.opt)),
                    trt.Dims(list(shape.max)),
                )
            config.add_optimization_profile(profile)
            try:
                cache = config.create_timing_cache(timing_cache or b"")
                reused = cache is not None and config.set_timing_cache(cache, False)
            except Exception:  # a damaged cache file raises in some 10.x releases
                reused = False
            if not reused:
                # A timing cache from another TensorRT or GPU, or damaged: start afresh.
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, True)
            monitor = Monitor()
            config.progress_monitor = monitor
            progress(f"building {plan.key.precision} engine")
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise BackendError(
                    f"TensorRT failed to build an engine for {plan.model_path} "
                    "(see the TensorRT messages above)"
                )
            engine = bytes(memoryview(serialized))
            timing = bytes(memoryview(config.get_timing_cache().serialize()))
            # The config holds a raw pointer to the monitor: drop the TensorRT objects first.
            del serialized, config, parser, network, builder
            del monitor
        return engine, timing

    def deserialize(self, engine: bytes) -> trt.ICudaEngine:
        with self.device.activate():
            result = self._runtime.deserialize_cuda_engine(engine)
        if result is None:
            raise BackendError("TensorRT could not deserialise the engine")
        return result

    def check(self, engine: bytes) -> None:
        self.deserialize(engine)

    def close(self) -> None:
        self.device.release()
