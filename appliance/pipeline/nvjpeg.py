"""JPEG decoding on the GPU (nvJPEG through NVIDIA's nvImageCodec), where it is installed.

nvImageCodec is NVIDIA's maintained Python binding of nvJPEG, with a Jetson build
(`pip install nvidia-nvimgcodec-tegra-cu12[nvjpeg]`); on the Orin it decodes on the hardware
JPEG engine instead of the CPU cores the rest of the pipeline needs. Where it is absent (this
development VM, any host without CUDA) `load` says why and the CPU decoders are used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

ImageArray = npt.NDArray[np.uint8]


class GpuJpegDecoder:
    """Decodes JPEG bytes to upright BGR uint8 host arrays with nvJPEG."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self._decoder = module.Decoder()
        # EXIF orientation applied by the decoder, like the CPU paths; BGR like OpenCV's.
        self._params = module.DecodeParams(
            apply_exif_orientation=True, color_spec=module.ColorSpec.RGB
        )

    def decode(self, data: bytes) -> ImageArray | None:
        """The image, or None when nvJPEG cannot decode it (the caller falls back to the CPU)."""
        image = self._decoder.decode(data, params=self._params)
        if image is None:
            return None
        rgb = np.asarray(image.cpu())
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            return None
        return np.ascontiguousarray(rgb[:, :, ::-1])


def load(wanted: bool) -> tuple[GpuJpegDecoder | None, str]:
    """The GPU decoder and its status line for /info ("in use", or why not)."""
    if not wanted:
        return None, "off (USE_NVJPEG=0)"
    try:
        from nvidia import nvimgcodec  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        return None, f"not available: nvImageCodec is not installed ({exc})"
    try:
        return GpuJpegDecoder(nvimgcodec), "in use"
    except Exception as exc:  # no CUDA device or driver: nvImageCodec raises its own types
        return None, f"not available: {type(exc).__name__}: {exc}"
