"""Image decoding with limits, EXIF orientation, and the letterbox used by the detector.

JPEG goes through PyTurboJPEG when its library loads (several times faster than OpenCV on
the Orin's CPU); everything else, and JPEG when libturbojpeg is missing, through OpenCV.
The pixel limit is checked from the header before any pixel is decoded, so a small file that
claims to be enormous (a decompression bomb) is refused cheaply.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

ImageArray = npt.NDArray[np.uint8]


class ImageError(ValueError):
    """An image that cannot be used; `code` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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

    @classmethod
    def create(cls, max_pixels: int, use_turbojpeg: bool = True) -> ImageDecoder:
        return cls(max_pixels=max_pixels, turbo=_load_turbojpeg() if use_turbojpeg else None)

    @property
    def jpeg_library(self) -> str:
        return "turbojpeg" if self.turbo is not None else "opencv"

    def decode(self, data: bytes) -> ImageArray:
        if not data:
            raise ImageError("empty_image", "image data is empty")
        if data.startswith(JPEG_MAGIC):
            return self._decode_jpeg(data)
        if data.startswith(PNG_MAGIC):
            width, height = png_size(data)
            self._check_pixels(width, height)
        return self._decode_opencv(data)

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

    def _decode_jpeg(self, data: bytes) -> ImageArray:
        if self.turbo is None:
            width, height = jpeg_size(data)
            self._check_pixels(width, height)
            return self._decode_opencv(data)
        try:
            width, height, _, _ = self.turbo.decode_header(data)
        except OSError as exc:
            raise ImageError("corrupt_image", f"JPEG header cannot be read: {exc}") from None
        self._check_pixels(width, height)
        try:
            img = self.turbo.decode(data)
        except OSError as exc:
            raise ImageError("corrupt_image", f"JPEG cannot be decoded: {exc}") from None
        if img is None or img.ndim != 3 or img.shape[0] != height:
            raise ImageError("corrupt_image", "JPEG decoded to an unexpected shape")
        # libjpeg-turbo reports a truncated file as a warning and fills the rest with grey; a
        # missing end-of-image marker is how we notice it.
        _check_complete_jpeg(data)
        return apply_orientation(np.ascontiguousarray(img), exif_orientation(data))

    def _decode_opencv(self, data: bytes) -> ImageArray:
        buf = np.frombuffer(data, dtype=np.uint8)
        # IMREAD_COLOR applies the EXIF orientation itself.
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if img is None:
            raise ImageError(
                "corrupt_image", "data is not a decodable image (JPEG, PNG, BMP, WebP...)"
            )
        self._check_pixels(img.shape[1], img.shape[0])
        if data.startswith(JPEG_MAGIC):
            _check_complete_jpeg(data)
        return np.asarray(img, dtype=np.uint8)


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, segment start, segment length) of each header segment up to the first scan.

    0xFF fill bytes before a marker are allowed by the JPEG standard and skipped.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError("corrupt_image", "JPEG marker structure is broken")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        yield marker, pos, length
        if marker == 0xDA:
            return
        pos += 2 + length


def _check_complete_jpeg(data: bytes) -> None:
    """Refuse a JPEG cut short: its first scan must be followed by an end-of-image marker.

    libjpeg-turbo only warns about a truncated file and fills the rest with grey. Entropy-coded
    data never contains FF D9 (0xFF bytes are stuffed), so the first FF D9 after the scan header
    ends the image; bytes after it (phone trailers, motion-photo video) are allowed.
    """
    scan = next((pos for marker, pos, _ in _jpeg_segments(data) if marker == 0xDA), None)
    if scan is None or data.find(b"\xff\xd9", scan) == -1:
        raise ImageError("corrupt_image", "JPEG is truncated (no end-of-image marker)")


def png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageError("corrupt_image", "PNG header is truncated or has no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first start-of-frame marker."""
    for marker, pos, _ in _jpeg_segments(data):
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
    raise ImageError("corrupt_image", "JPEG has no frame header")


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of a JPEG, 1 when absent or unreadable."""
    try:
        for marker, pos, length in _jpeg_segments(data):
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
