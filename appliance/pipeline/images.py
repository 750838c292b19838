"""Image decoding with limits, EXIF orientation, and the letterbox used by the detector.

JPEG goes through PyTurboJPEG when its library loads (several times faster than OpenCV on
the Orin's CPU); everything else, JPEG when libturbojpeg is missing, and JPEG that
libjpeg-turbo's fast path refuses (CMYK/YCCK, as InsightFace-REST does) through OpenCV.

Every decode starts from the header (`image_formats.read_header`): the format must be one we
can size from its header, and the pixel limit is checked before any pixel is decoded, so a
small file that claims to be enormous (a decompression bomb) is refused in microseconds.
OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS, set in `appliance/__init__.py` because OpenCV
reads it once, when the library loads) is a second line behind ours, and the decoded shape is
compared with the header's claim. Decoded pixels in flight are bounded by a `PixelBudget`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from appliance.pipeline import nvjpeg
from appliance.pipeline.budget import PixelBudget, Reservation
from appliance.pipeline.image_formats import (
    JPEG_MAGIC,
    PNG_MAGIC,
    ImageError,
    ImageInfo,
    check_png_chunks,
    is_jpeg,
    is_png,
    jpeg_segments,
    jpeg_size,
    png_size,
    read_header,
)
from appliance.pipeline.nvjpeg import GpuJpegDecoder

ImageArray = npt.NDArray[np.uint8]

# Four images at the default MAX_IMAGE_PIXELS: 480 MB of BGR pixels at most, a small share of
# an Orin's 32-64 GB that the models and the OS share.
DEFAULT_PIXELS_IN_FLIGHT = 160_000_000

__all__ = [
    "DEFAULT_PIXELS_IN_FLIGHT",
    "JPEG_MAGIC",
    "PNG_MAGIC",
    "Decoded",
    "ImageArray",
    "ImageDecoder",
    "ImageError",
    "ImageInfo",
    "apply_orientation",
    "dct_scale",
    "encode_jpeg",
    "exif_orientation",
    "is_jpeg",
    "is_png",
    "jpeg_size",
    "letterbox",
    "png_size",
]


def _load_turbojpeg() -> Any | None:
    try:
        from turbojpeg import TurboJPEG

        return TurboJPEG()
    except (ImportError, OSError, RuntimeError):
        # No libturbojpeg on this host (or an incompatible one): OpenCV decodes JPEG too.
        return None


@dataclasses.dataclass
class ImageDecoder:
    """Decodes bytes to BGR uint8 arrays; one per process, shared by all requests."""

    max_pixels: int
    turbo: Any | None = dataclasses.field(default=None)
    budget: PixelBudget = dataclasses.field(
        default_factory=lambda: PixelBudget(DEFAULT_PIXELS_IN_FLIGHT)
    )
    gpu: GpuJpegDecoder | None = None
    # USE_NVJPEG's outcome for /info: "in use", "off (...)" or "not available: why".
    nvjpeg_status: str = "off (USE_NVJPEG=0)"

    def __post_init__(self) -> None:
        if self.budget.capacity < self.max_pixels:
            raise ValueError("the pixel budget must hold at least one image of max_pixels")

    @classmethod
    def create(
        cls,
        max_pixels: int,
        use_turbojpeg: bool = True,
        max_pixels_in_flight: int = DEFAULT_PIXELS_IN_FLIGHT,
        use_nvjpeg: bool = False,
    ) -> ImageDecoder:
        gpu, status = nvjpeg.load(use_nvjpeg)
        return cls(
            max_pixels=max_pixels,
            turbo=_load_turbojpeg() if use_turbojpeg else None,
            budget=PixelBudget(max(max_pixels_in_flight, max_pixels)),
            gpu=gpu,
            nvjpeg_status=status,
        )

    @property
    def jpeg_library(self) -> str:
        if self.gpu is not None:
            return "nvjpeg"
        return "turbojpeg" if self.turbo is not None else "opencv"

    def probe(self, data: bytes) -> ImageInfo:
        """Format and size from the header, with the pixel limit checked; no pixel decoded."""
        if not data:
            raise ImageError("empty_image", "image data is empty")
        info = read_header(data)
        self._check_pixels(info.width, info.height)
        return info

    def decode(self, data: bytes, reservation: Reservation | None = None) -> ImageArray:
        """Decode under `reservation` (the caller's hold on the budget) or a hold of its own."""
        info = self.probe(data)
        if reservation is None:
            with self.budget.reserve(info.pixels):
                return self._decode(data, info)
        if reservation.released or reservation.pixels < info.pixels:
            raise ValueError(
                f"the reservation holds {reservation.pixels} pixels; this image needs {info.pixels}"
            )
        return self._decode(data, info)

    def decode_for(
        self,
        data: bytes,
        fit: tuple[int, int],
        reservation: Reservation | None = None,
        margin: float = 1.0,
    ) -> Decoded:
        """Decode for a detector input of `fit` (width, height): a JPEG at least twice as large
        decodes at the smallest libjpeg-turbo DCT scale that still leaves `margin` times the
        letterbox's size, so the letterbox still shrinks it. Most of a large JPEG's decoding
        cost is the inverse DCT of pixels the letterbox would throw away.
        """
        info = self.probe(data)
        if reservation is None:
            with self.budget.reserve(info.pixels):
                return self._decode_for(data, info, fit, margin)
        if reservation.released or reservation.pixels < info.pixels:
            raise ValueError(
                f"the reservation holds {reservation.pixels} pixels; this image needs {info.pixels}"
            )
        return self._decode_for(data, info, fit, margin)

    def _decode_for(
        self, data: bytes, info: ImageInfo, fit: tuple[int, int], margin: float
    ) -> Decoded:
        factor = None
        if info.format == "jpeg" and self.turbo is not None:
            factor = dct_scale(
                info.width,
                info.height,
                exif_orientation(data),
                fit,
                margin,
                self.turbo.scaling_factors,
            )
        if factor is None:
            return Decoded(self._decode(data, info), 1.0, 1.0)
        _check_complete_jpeg(data)
        img = self._decode_turbo(data, info, factor)
        turned = exif_orientation(data) in (5, 6, 7, 8)
        width, height = (info.height, info.width) if turned else (info.width, info.height)
        return Decoded(img, img.shape[1] / width, img.shape[0] / height)

    def _decode(self, data: bytes, info: ImageInfo) -> ImageArray:
        if info.format == "jpeg":
            # Before decoding: a truncated file is refused without paying for the decode.
            _check_complete_jpeg(data)
            if self.gpu is not None:
                img = self.gpu.decode(data)
                if img is not None:
                    return img
            if self.turbo is not None:
                return self._decode_turbo(data, info)
        return self._decode_opencv(data, info)

    def _check_pixels(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise ImageError(
                "corrupt_image", f"image header gives an invalid size {width}x{height}"
            )
        if width * height > self.max_pixels:
            raise ImageError(
                "image_too_large",
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit (MAX_IMAGE_PIXELS) is {self.max_pixels}",
            )

    def _decode_turbo(
        self, data: bytes, info: ImageInfo, factor: tuple[int, int] | None = None
    ) -> ImageArray:
        assert self.turbo is not None
        try:
            width, height, _, _ = self.turbo.decode_header(data)
        except OSError as exc:
            raise ImageError("corrupt_image", f"JPEG header cannot be read: {exc}") from None
        if (width, height) != (info.width, info.height):
            raise ImageError("corrupt_image", "JPEG frame headers disagree about its size")
        if factor is not None:
            # libjpeg-turbo rounds scaled sizes up (TJSCALED).
            width = -(-width * factor[0] // factor[1])
            height = -(-height * factor[0] // factor[1])
        try:
            img = self.turbo.decode(data, scaling_factor=factor)
        except OSError:
            # libjpeg-turbo's fast path refuses some valid files (CMYK and YCCK colour, as
            # InsightFace-REST found): OpenCV's libjpeg converts them.
            return self._decode_opencv(data, info)
        if img is None or img.ndim != 3 or img.shape[:2] != (height, width):
            raise ImageError("corrupt_image", "JPEG decoded to an unexpected shape")
        return apply_orientation(np.ascontiguousarray(img), exif_orientation(data))

    def _decode_opencv(self, data: bytes, info: ImageInfo) -> ImageArray:
        if info.format == "png":
            check_png_chunks(data)
        buf = np.frombuffer(data, dtype=np.uint8)
        try:
            # IMREAD_COLOR applies the EXIF orientation itself.
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        except cv2.error as exc:
            if "CV_IO_MAX_IMAGE" in str(exc):
                raise ImageError(
                    "image_too_large",
                    f"image is {info.width}x{info.height}, over OpenCV's limit "
                    "(OPENCV_IO_MAX_IMAGE_PIXELS)",
                ) from None
            raise ImageError("corrupt_image", f"{info.format.upper()} cannot be decoded") from None
        if img is None:
            raise ImageError("corrupt_image", f"{info.format.upper()} cannot be decoded")
        if img.ndim != 3 or sorted(img.shape[:2]) != sorted((info.height, info.width)):
            # EXIF may have swapped width and height; anything else means the decoder read a
            # different size than the header we checked.
            raise ImageError("corrupt_image", "image decoded to a size its header did not claim")
        return np.asarray(img, dtype=np.uint8)


def _check_complete_jpeg(data: bytes) -> None:
    """Refuse a JPEG cut short: its first scan must be followed by an end-of-image marker.

    libjpeg-turbo only warns about a truncated file and fills the rest with grey, so a missing
    end-of-image marker is how we notice it. Entropy-coded
    data never contains FF D9 (0xFF bytes are stuffed), so the first FF D9 after the scan header
    ends the image; bytes after it (phone trailers, motion-photo video) are allowed.
    """
    scan = next((pos for marker, pos, _ in jpeg_segments(data) if marker == 0xDA), None)
    if scan is None or data.find(b"\xff\xd9", scan) == -1:
        raise ImageError("corrupt_image", "JPEG is truncated (no end-of-image marker)")


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of a JPEG, 1 when absent or unreadable."""
    try:
        for marker, pos, length in jpeg_segments(data):
            segment = data[pos + 4 : pos + 2 + length]
            if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
                return _orientation_from_tiff(segment[6:])
    except (ImageError, struct.error):
        pass  # a broken header is reported by the decoder, not here
    return 1


def _orientation_from_tiff(tiff: bytes) -> int:
    if len(tiff) < 8:
        return 1
    endian = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if endian is None:
        return 1
    ifd = struct.unpack(endian + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack(endian + "H", tiff[ifd : ifd + 2])[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        tag, _type, _n = struct.unpack(endian + "HHI", tiff[entry : entry + 8])
        if tag == 0x0112:
            value = int(struct.unpack(endian + "H", tiff[entry + 8 : entry + 10])[0])
            return value if 1 <= value <= 8 else 1
    return 1


@dataclasses.dataclass(frozen=True)
class Decoded:
    """Decoded pixels and their size over the (upright) original's, per axis: 1.0 for a full
    decode. Coordinates found on `pixels` divided by these land on the original image."""

    pixels: ImageArray
    scale_x: float
    scale_y: float


def dct_scale(
    width: int,
    height: int,
    orientation: int,
    fit: tuple[int, int],
    margin: float,
    factors: Iterable[tuple[int, int]],
) -> tuple[int, int] | None:
    """The libjpeg-turbo scaling factor for a JPEG of `width` x `height` headed for a letterbox
    of `fit`, or None for a full decode (an image less than twice the letterbox)."""
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    ratio = min(fit[0] / width, fit[1] / height)  # the letterbox's own shrink factor
    if ratio > 0.5:
        return None
    # Only 1/2, 1/4 and 1/8: libjpeg-turbo has fast reduced IDCTs for those; the others
    # (3/8, 5/8, 3/4...) measured slower than a full decode (docs/BENCHMARKS.md).
    usable = [f for f in factors if f[0] == 1 and f[1] > 1 and margin * ratio <= 1 / f[1]]
    return min(usable, key=lambda f: f[0] / f[1]) if usable else None


def apply_orientation(img: ImageArray, orientation: int) -> ImageArray:
    """Rotate/flip so the image is upright, as EXIF orientation 1..8 asks."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.transpose(1, 0, 2)
    elif orientation == 6:
        img = np.rot90(img, k=-1)
    elif orientation == 7:
        img = img.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        img = np.rot90(img, k=1)
    return np.ascontiguousarray(img)


def letterbox(img: ImageArray, size: tuple[int, int]) -> tuple[ImageArray, float]:
    """Fit `img` into a (width, height) canvas at the top-left, keeping the aspect ratio.

    Same arithmetic as InsightFace's SCRFD.detect so that results match the reference
    implementation: the resized size is truncated with int() and the scale is new_h / h.
    """
    width, height = size
    im_ratio = img.shape[0] / img.shape[1]
    model_ratio = height / width
    if im_ratio > model_ratio:
        new_h = height
        new_w = int(new_h / im_ratio)
    else:
        new_w = width
        new_h = int(new_w * im_ratio)
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    scale = new_h / img.shape[0]
    resized = cv2.resize(img, (new_w, new_h))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, scale


def encode_jpeg(img: ImageArray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise ImageError("encode_failed", "JPEG encoding failed")
    return bytes(buf.tobytes())
