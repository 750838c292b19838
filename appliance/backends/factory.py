"""Choose and open an inference backend by name: `trt` on a Jetson, `onnx` everywhere else."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from appliance.backends.base import BackendError, InferenceBackend
from appliance.backends.cores import CoreGate
from appliance.backends.pool import BackendPool
from appliance.backends.threads import ModelThreads
from appliance.config import Settings
from appliance.models.onnx_graph import InputRewrite
from appliance.models.registry import ModelInfo

ResolvedBackend = Literal["trt", "onnx"]


def tensorrt_usable() -> tuple[bool, str]:
    """Whether TensorRT, pycuda and a CUDA GPU are all present, and why not if they are not."""
    try:
        from appliance.backends.tensorrt_build import tensorrt_available
    except ImportError as exc:  # the module itself must import everywhere; guard anyway
        return False, f"TensorRT backend unavailable: {exc}"
    return tensorrt_available()


def choose_backend(settings: Settings) -> tuple[ResolvedBackend, str]:
    """Map INFERENCE_BACKEND (auto | trt | onnx) to the backend that will run, and say why."""
    if settings.inference_backend == "onnx":
        return "onnx", "INFERENCE_BACKEND=onnx"
    usable, reason = tensorrt_usable()
    if settings.inference_backend == "trt":
        if not usable:
            raise BackendError(f"INFERENCE_BACKEND=trt but TensorRT cannot be used here: {reason}")
        return "trt", f"INFERENCE_BACKEND=trt: {reason}"
    if usable:
        return "trt", f"INFERENCE_BACKEND=auto: {reason}"
    return "onnx", f"INFERENCE_BACKEND=auto: TensorRT not usable ({reason})"


def resolve_backend(settings: Settings) -> ResolvedBackend:
    return choose_backend(settings)[0]


def image_shape_for(settings: Settings, info: ModelInfo) -> tuple[int, int, int]:
    """(C, H, W) one image has at this model's input: MAX_SIZE for detectors."""
    if info.family == "scrfd":
        width, height = settings.max_size
        return info.input_shape[0], height, width
    return info.input_shape


def open_backend(
    kind: ResolvedBackend,
    settings: Settings,
    info: ModelInfo,
    model_path: Path,
    max_batch: int,
    input_rewrite: InputRewrite | None = None,
    intra_op_threads: int | None = None,
) -> InferenceBackend:
    """One session or engine context. With `input_rewrite` it takes uint8 NHWC BGR pixels."""
    if kind == "onnx":
        from appliance.backends.ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            model_path,
            info,
            max_batch=max_batch,
            intra_op_threads=intra_op_threads,
            image_shape=image_shape_for(settings, info),
            input_rewrite=input_rewrite,
        )
    from appliance.backends.tensorrt import open_tensorrt_backend

    return open_tensorrt_backend(
        settings, info, model_path, max_batch=max_batch, input_rewrite=input_rewrite
    )


def open_pool(
    kind: ResolvedBackend,
    settings: Settings,
    info: ModelInfo,
    model_path: Path,
    max_batch: int,
    threads: ModelThreads,
    input_rewrite: InputRewrite | None,
    gate: CoreGate | None = None,
) -> BackendPool:
    """`threads.workers` sessions (ONNX Runtime) or execution contexts of one engine
    (TensorRT); on ONNX Runtime, with `threads.wide_threads`, one wide session more, run when
    `gate` gives a run every core."""
    if kind == "trt":
        from appliance.backends.tensorrt import open_tensorrt_backends

        return BackendPool(
            open_tensorrt_backends(
                settings, info, model_path, max_batch, threads.workers, input_rewrite=input_rewrite
            )
        )
    sizes = [threads.intra_op_threads] * threads.workers
    if threads.adaptive:
        if gate is None:
            raise BackendError(f"{info.name}: a wide session needs the process's core gate")
        sizes.append(threads.wide_threads)
    members: list[InferenceBackend] = []
    try:
        for intra_op_threads in sizes:
            members.append(
                open_backend(
                    kind, settings, info, model_path, max_batch, input_rewrite, intra_op_threads
                )
            )
    except BaseException:
        for member in members:
            member.close()
        raise
    if threads.adaptive:
        return BackendPool(members[:-1], wide=members[-1], gate=gate)
    return BackendPool(members)
