"""pycuda plumbing for the TensorRT backend: device context, page-locked host buffers,
device buffers sized for the max batch, one stream per backend, and a clean release.

Only `appliance.backends.tensorrt` and `tensorrt_build` (and the GPU tests and benchmark) use
this module. pycuda is imported inside the functions, so importing this module never needs a
GPU.

Threading: the detector and the recogniser each run on their batcher's worker thread, while
the objects were made on the start-up thread. A CUDA context is current per thread, so every
operation runs inside `CudaDevice.activate()`, which pushes the device's primary context and
pops it again. Using the primary context (not a context of our own) lets both backends, and
TensorRT itself, share one context per device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt


class CudaError(RuntimeError):
    """pycuda is missing, no GPU is present, or a CUDA call failed."""


def import_pycuda_driver() -> Any:
    """`pycuda.driver`, initialised; CudaError with the reason when that is impossible."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise CudaError(f"pycuda is not installed ({exc})") from None
    except Exception as exc:  # pycuda raises other errors when libcuda.so cannot be loaded
        raise CudaError(f"pycuda cannot load the CUDA driver ({exc})") from None
    try:
        cuda.init()
    except Exception as exc:
        raise CudaError(f"CUDA driver initialisation failed ({exc})") from None
    return cuda


def device_count() -> int:
    return int(import_pycuda_driver().Device.count())


def has_fast_fp16(compute_capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs FP16 faster than FP32.

    TensorRT 10.5 deprecated `Builder.platform_has_fast_fp16` ("query data type support from
    CUDA directly"), so the answer comes from the compute capability: native FP16 arithmetic
    starts with 5.3 (Jetson TX1); 6.1 (consumer Pascal) has it at 1/64 rate only. Every Jetson
    since TX1, and the AGX Orin (8.7), is fast.
    """
    return compute_capability >= (5, 3) and compute_capability != (6, 1)


class CudaDevice:
    """One GPU's primary context, retained for the life of this object."""

    def __init__(self, index: int = 0) -> None:
        cuda = import_pycuda_driver()
        count = cuda.Device.count()
        if not 0 <= index < count:
            raise CudaError(f"CUDA device {index} requested but {count} device(s) present")
        self._cuda = cuda
        self.index = index
        self._device = cuda.Device(index)
        self.name: str = str(self._device.name())
        major, minor = self._device.compute_capability()
        self.compute_capability: tuple[int, int] = (int(major), int(minor))
        self._context: Any = self._device.retain_primary_context()
        self._released = False

    @property
    def driver(self) -> Any:
        """The initialised `pycuda.driver` module."""
        return self._cuda

    @property
    def compute_capability_text(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @contextlib.contextmanager
    def activate(self) -> Iterator[Any]:
        """Make this device's context current on the calling thread; yields pycuda.driver."""
        if self._released:
            raise CudaError(f"CUDA device {self.index} was already released")
        self._context.push()
        try:
            yield self._cuda
        finally:
            self._cuda.Context.pop()

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        with self.activate() as cuda:
            free, total = cuda.mem_get_info()
        return int(free), int(total)

    def release(self) -> None:
        """Drop this object's hold on the primary context (the driver counts holders)."""
        if not self._released:
            self._released = True
            self._context.detach()


@dataclasses.dataclass
class TensorBuffer:
    """One tensor's page-locked host array and device allocation, both of the max shape."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    host: npt.NDArray[Any]
    device: Any

    @property
    def nbytes(self) -> int:
        return int(self.host.nbytes)

    @property
    def device_ptr(self) -> int:
        return int(self.device)


class IOBuffers:
    """Host and device buffers for a set of named tensors plus the stream that moves them.

    Shapes given here are the largest each tensor will ever have (the max batch); a copy of a
    smaller batch moves only the leading part of each buffer.
    """

    def __init__(
        self, device: CudaDevice, tensors: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]]
    ) -> None:
        self.device = device
        self.buffers: dict[str, TensorBuffer] = {}
        self._lock = threading.Lock()
        self._closed = False
        with device.activate() as cuda:
            self.stream: Any = cuda.Stream()
            try:
                for name, (shape, dtype) in tensors.items():
                    dt = np.dtype(dtype)
                    host = cuda.pagelocked_empty(shape, dt)
                    nbytes = max(1, math.prod(shape) * dt.itemsize)
                    self.buffers[name] = TensorBuffer(
                        name, tuple(shape), dt, host, cuda.mem_alloc(nbytes)
                    )
            except Exception as exc:
                self._free(cuda)
                raise CudaError(f"cannot allocate buffers for {name}: {exc}") from exc

    def __getitem__(self, name: str) -> TensorBuffer:
        return self.buffers[name]

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def upload(self, name: str, array: npt.NDArray[Any]) -> None:
        """Queue `array` (a leading slice of the tensor's max shape) host -> device.

        The data is first copied into the page-locked buffer: only page-locked memory lets
        the copy run asynchronously on the stream (pageable memory is staged by the driver).
        Must be called inside `device.activate()`.
        """
        buf = self.buffers[name]
        count = array.shape[0] if array.ndim else 1
        if array.shape[1:] != buf.shape[1:] or count > buf.shape[0]:
            raise CudaError(f"{name}: array of shape {array.shape} does not fit {buf.shape}")
        staged = buf.host[:count]
        # The batcher assembles batches in the page-locked buffer itself (`host_view`): then
        # there is nothing to stage.
        if not (array.ctypes.data == staged.ctypes.data and array.strides == staged.strides):
            np.copyto(staged, array, casting="same_kind")
        self.device.driver.memcpy_htod_async(buf.device, staged, self.stream)

    def host_view(self, name: str, count: int) -> npt.NDArray[Any]:
        """The first `count` rows of the tensor's page-locked host buffer, to fill in place."""
        buf = self.buffers[name]
        if not 1 <= count <= buf.shape[0]:
            raise CudaError(f"{name}: {count} rows do not fit {buf.shape}")
        return buf.host[:count]

    def download(self, name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """Queue device -> host of the first prod(shape) elements; returns the host view.

        The view is only valid after `synchronize()` and until the next download of the same
        tensor; callers copy it. Must be called inside `device.activate()`.
        """
        buf = self.buffers[name]
        count = math.prod(shape)
        if count > buf.host.size:
            raise CudaError(f"{name}: output of shape {shape} exceeds its buffer {buf.shape}")
        view = buf.host.reshape(-1)[:count]
        self.device.driver.memcpy_dtoh_async(view, buf.device, self.stream)
        return view.reshape(shape)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def round_trip(self, name: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Upload then download one tensor on the stream; returns a copy (for tests/bench)."""
        with self._lock, self.device.activate():
            self.upload(name, array)
            out = self.download(name, tuple(array.shape))
            self.synchronize()
            copied: npt.NDArray[Any] = out.copy()
            return copied

    def _free(self, cuda: Any) -> None:
        for buf in self.buffers.values():
            buf.device.free()
            # Page-locked memory is returned to the driver at once, not left to the GC.
            base = getattr(buf.host, "base", None)
            if base is not None and hasattr(base, "free"):
                base.free()
        self.buffers.clear()

    def close(self) -> None:
        """Free device and page-locked memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self.device.activate() as cuda:
                self.stream.synchronize()
                self._free(cuda)
                self.stream = None
