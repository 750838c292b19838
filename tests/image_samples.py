"""Hand-built image files for the limit and fuzz tests: bombs, odd formats, real photos."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"


def encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return bytes(buf.tobytes())


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def rle_bmp(width: int, height: int, rows: int = 200) -> bytes:
    """An 8-bit RLE BMP claiming width x height whose data is `rows` short runs: ~1.5 KB."""
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    # Each row: one run of 4 pixels of colour 7, then end-of-line; then end-of-bitmap.
    pixels = b"\x04\x07\x00\x00" * rows + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


def os2_bmp_header(width: int, height: int) -> bytes:
    """A BMP with the 12-byte OS/2 core header (16-bit sizes) and no pixel data."""
    core = struct.pack("<IHHHH", 12, width, height, 1, 24)
    return b"BM" + struct.pack("<IHHI", 26, 0, 0, 26) + core


def webp_vp8l_header(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 16
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8_header(width: int, height: int) -> bytes:
    payload = b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\0" * 16
    chunk = b"VP8 " + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8x_header(width: int, height: int) -> bytes:
    payload = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little")
    payload += (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    pos = jpeg.find(b"\xff\xc0")
    assert pos > 0
    return jpeg[: pos + 5] + struct.pack(">HH", height, width) + jpeg[pos + 9 :]


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    # The IHDR CRC is left stale: the size must be refused before anything checks it.
    return png[:16] + struct.pack(">II", width, height) + png[24:]


def cmyk_jpeg(height: int = 40, width: int = 60) -> bytes:
    """A four-channel (Adobe YCCK) JPEG, which libjpeg-turbo's RGB fast path refuses."""
    from turbojpeg import TJPF_CMYK, TJSAMP_444, TurboJPEG

    data: bytes = TurboJPEG().encode(
        noise(height, width, 4), pixel_format=TJPF_CMYK, jpeg_subsample=TJSAMP_444
    )
    return data


def bombs(max_pixels: int) -> dict[str, bytes]:
    """One decompression bomb per accepted format: tiny files claiming far over `max_pixels`."""
    side = 1
    while side * side <= max_pixels:
        side *= 2
    side = min(side, 16383)  # VP8's 14-bit limit; still over any limit the tests use
    small_jpeg = encode(".jpg", noise(16, 16))
    small_png = encode(".png", noise(16, 16))
    return {
        "jpeg": with_jpeg_size(small_jpeg, side, side),
        "png": with_png_size(small_png, side, side),
        "bmp_rle": rle_bmp(12000, 12000),
        "bmp_os2": os2_bmp_header(65535, 65535),
        "webp_vp8": webp_vp8_header(side, side),
        "webp_vp8l": webp_vp8l_header(side, side),
        "webp_vp8x": webp_vp8x_header(1 << 24, 1 << 24),
    }


def real_photos() -> list[Path]:
    if not SHARED_PHOTOS.is_dir():
        return []
    return sorted(
        p for p in SHARED_PHOTOS.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
    )
