"""What an image is and how big it claims to be, read from its header before any pixel is decoded.

Accepted formats are the ones whose size can be read from a fixed place in the header: JPEG
(the first start-of-frame segment), PNG (IHDR), BMP (the DIB header, RLE-compressed included)
and WebP (the VP8, VP8L or VP8X chunk). A decoder allocates what the header says, so a 1.5 KB
RLE BMP that claims 12000x12000 would cost 430 MB before a pixel is read: the header is the
only place to refuse it cheaply. GIF and TIFF are refused, not decoded: a GIF's frames and a
TIFF's directories each carry their own sizes, and neither is a format cameras send.

Reading a header costs microseconds and no allocation proportional to the image, so the API
may call `probe` on the event loop to admit work before it decodes.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from typing import Literal

ImageFormat = Literal["jpeg", "png", "bmp", "webp"]
ACCEPTED_FORMATS: tuple[ImageFormat, ...] = ("jpeg", "png", "bmp", "webp")

# SOI followed by the first marker's FF: every JPEG starts so, and two bytes alone also match
# plenty of non-images. One definition for REST and streams.
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Formats OpenCV would decode but this appliance refuses, by their signatures.
_REFUSED_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"v/1\x01", "OpenEXR"),
)


class ImageError(ValueError):
    """An image that cannot be used; `code` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header claims; `pixels` is what a decode will allocate (times 3 bytes, BGR)."""

    format: ImageFormat
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def is_jpeg(data: bytes) -> bool:
    return data.startswith(JPEG_MAGIC)


def is_png(data: bytes) -> bool:
    return data.startswith(PNG_MAGIC)


def sniff_format(data: bytes) -> ImageFormat:
    """The accepted format `data` starts with; ImageError for anything else."""
    if is_jpeg(data):
        return "jpeg"
    if is_png(data):
        return "png"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    for signature, name in _REFUSED_SIGNATURES:
        if data.startswith(signature):
            raise ImageError(
                "unsupported_format",
                f"{name} images are not accepted; send JPEG, PNG, BMP or WebP",
            )
    # PBM/PGM/PPM/PAM/PFM: "P" and a digit or F/f, then whitespace.
    if len(data) >= 3 and data[0:1] == b"P" and data[1:2] in b"1234567Ff" and data[2:3].isspace():
        raise ImageError(
            "unsupported_format", "Netpbm images are not accepted; send JPEG, PNG, BMP or WebP"
        )
    raise ImageError("corrupt_image", "data is not a JPEG, PNG, BMP or WebP image")


def read_header(data: bytes) -> ImageInfo:
    """Format and claimed size; ImageError when the header is missing, short or nonsensical."""
    fmt = sniff_format(data)
    try:
        width, height = _SIZE_READERS[fmt](data)
    except struct.error:
        raise ImageError("corrupt_image", f"{fmt.upper()} header is truncated") from None
    if width <= 0 or height <= 0:
        raise ImageError("corrupt_image", f"image header gives an invalid size {width}x{height}")
    return ImageInfo(fmt, width, height)


# ---------------------------------------------------------------- JPEG

# Segments and fill bytes walked before the first scan; cameras write a few dozen.
MAX_JPEG_HEADER_STEPS = 4096


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, segment start, segment length) of each header segment up to the first scan.

    0xFF fill bytes before a marker are allowed by the JPEG standard and skipped. Real files
    have a few dozen segments before their scan; the cap keeps this walk (which the API may
    run on the event loop, through `probe`) a few microseconds whatever the file holds.
    """
    pos = 2
    for _ in range(MAX_JPEG_HEADER_STEPS):
        if pos + 4 > len(data):
            return
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
        if length < 2:
            raise ImageError("corrupt_image", "JPEG segment length is invalid")
        yield marker, pos, length
        if marker == 0xDA:
            return
        pos += 2 + length
    raise ImageError(
        "corrupt_image", f"JPEG has more than {MAX_JPEG_HEADER_STEPS} markers before its scan"
    )


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first start-of-frame marker (the one libjpeg uses)."""
    for marker, pos, _ in jpeg_segments(data):
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
    raise ImageError("corrupt_image", "JPEG has no frame header")


# ---------------------------------------------------------------- PNG, BMP, WebP


def png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageError("corrupt_image", "PNG header is truncated or has no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


# Encoders write IDAT in 8-64 KB chunks: a 32 MB PNG has a few thousand. A flood of tiny
# chunks only makes the walk below (and libpng) slow.
MAX_PNG_CHUNKS = 65_536


def check_png_chunks(data: bytes) -> None:
    """Every chunk's declared length must fit in the data, up to IEND.

    OpenCV 5's PNG reader allocates a chunk's declared length before reading it: one IDAT
    claiming 0xFFFFFFFF bytes in an 883-byte file cost 4 GB and 7 s (found by the fuzzer).
    Walking the chunk headers is cheap and refuses that before libpng sees it.
    """
    pos, count = len(PNG_MAGIC), 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if length > len(data) - pos - 12:
            raise ImageError(
                "corrupt_image",
                f"PNG chunk {kind!r} claims {length} bytes; only {len(data) - pos - 12} follow",
            )
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise ImageError("corrupt_image", f"PNG has more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IEND":
            return
        pos += 12 + length
    raise ImageError("corrupt_image", "PNG is truncated (no IEND chunk)")


def bmp_size(data: bytes) -> tuple[int, int]:
    """The DIB header's size; a negative height is a top-down bitmap of that many rows."""
    if len(data) < 26:
        raise ImageError("corrupt_image", "BMP header is truncated")
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
        width, height = struct.unpack("<HH", data[18:22])
        return int(width), int(height)
    # BITMAPINFOHEADER (40) and its extensions (52, 56, 64, 108, 124): signed 32-bit sizes.
    if not 16 <= dib_size <= 124:
        raise ImageError("corrupt_image", f"BMP info header has an unknown size {dib_size}")
    width, height = struct.unpack("<ii", data[18:26])
    return int(width), abs(int(height))


def webp_size(data: bytes) -> tuple[int, int]:
    """From the first chunk: lossy VP8 frame header, lossless VP8L header, or extended VP8X canvas."""
    chunk = data[12:16]
    if chunk == b"VP8 ":
        # Frame tag (3 bytes), start code 9D 01 2A, then 14-bit width and height.
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("corrupt_image", "WebP VP8 frame has no start code")
        width, height = struct.unpack("<HH", data[26:30])
        return int(width & 0x3FFF), int(height & 0x3FFF)
    if chunk == b"VP8L":
        if data[20:21] != b"\x2f":
            raise ImageError("corrupt_image", "WebP VP8L stream has no signature")
        (bits,) = struct.unpack("<I", data[21:25])
        return int((bits & 0x3FFF) + 1), int(((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        # Canvas width and height minus one, 24 bits each; every frame lies within the canvas.
        raw = data[24:30]
        if len(raw) < 6:
            raise ImageError("corrupt_image", "WebP VP8X header is truncated")
        width = int.from_bytes(raw[0:3], "little") + 1
        height = int.from_bytes(raw[3:6], "little") + 1
        return width, height
    raise ImageError("corrupt_image", "WebP has no VP8, VP8L or VP8X chunk")


_SIZE_READERS = {"jpeg": jpeg_size, "png": png_size, "bmp": bmp_size, "webp": webp_size}
