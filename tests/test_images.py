"""Image decoding (turbojpeg and OpenCV paths), limits, EXIF orientation and letterbox."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from appliance.pipeline import images
from appliance.pipeline.images import (
    ImageDecoder,
    ImageError,
    apply_orientation,
    exif_orientation,
    jpeg_size,
    letterbox,
    png_size,
)

# Non-square, and every quadrant a different flat colour, so each of the eight EXIF
# orientations gives a distinguishable result while JPEG noise stays small.
HEIGHT, WIDTH = 48, 80
QUADRANT_COLOURS = {
    "tl": (0, 0, 255),  # red (BGR)
    "tr": (0, 255, 0),  # green
    "bl": (255, 0, 0),  # blue
    "br": (255, 255, 255),  # white
}


def quadrant_image() -> np.ndarray:
    img = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    h2, w2 = HEIGHT // 2, WIDTH // 2
    img[:h2, :w2] = QUADRANT_COLOURS["tl"]
    img[:h2, w2:] = QUADRANT_COLOURS["tr"]
    img[h2:, :w2] = QUADRANT_COLOURS["bl"]
    img[h2:, w2:] = QUADRANT_COLOURS["br"]
    return img


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def exif_segment(orientation: int, endian: str = "<") -> bytes:
    """An APP1 Exif segment whose TIFF IFD0 holds only the Orientation tag (0x0112)."""
    order = b"II" if endian == "<" else b"MM"
    tiff = order + struct.pack(endian + "HI", 42, 8)  # magic 42, IFD0 at offset 8
    tiff += struct.pack(endian + "H", 1)  # one entry
    # tag, type SHORT (3), count 1, value left-aligned in the 4-byte field
    tiff += struct.pack(endian + "HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff += struct.pack(endian + "I", 0)  # no next IFD
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def with_exif(jpeg: bytes, orientation: int, endian: str = "<") -> bytes:
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + exif_segment(orientation, endian) + jpeg[2:]


def sof_offset(jpeg: bytes) -> int:
    pos = jpeg.find(b"\xff\xc0")
    assert pos > 0
    return pos


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    pos = sof_offset(jpeg)
    # SOF0: FF C0, length (2), precision (1), height (2), width (2)
    return jpeg[: pos + 5] + struct.pack(">HH", height, width) + jpeg[pos + 9 :]


def png_with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    return png[:16] + struct.pack(">II", width, height) + png[24:]


@pytest.fixture
def turbo_decoder() -> ImageDecoder:
    decoder = ImageDecoder.create(max_pixels=10_000_000)
    assert decoder.jpeg_library == "turbojpeg", "libturbojpeg should load on this machine"
    return decoder


@pytest.fixture
def cv_decoder() -> ImageDecoder:
    decoder = ImageDecoder(max_pixels=10_000_000, turbo=None)
    assert decoder.jpeg_library == "opencv"
    return decoder


@pytest.fixture(params=["turbojpeg", "opencv"])
def any_decoder(request: pytest.FixtureRequest) -> ImageDecoder:
    if request.param == "turbojpeg":
        return ImageDecoder.create(max_pixels=10_000_000)
    return ImageDecoder(max_pixels=10_000_000, turbo=None)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- decoding


def test_create_without_turbojpeg_uses_opencv() -> None:
    assert ImageDecoder.create(max_pixels=100, use_turbojpeg=False).jpeg_library == "opencv"


def test_decode_jpeg_both_paths(any_decoder: ImageDecoder) -> None:
    src = quadrant_image()
    out = any_decoder.decode(jpeg_bytes(src))
    assert out.dtype == np.uint8
    assert out.shape == (HEIGHT, WIDTH, 3)
    assert out.flags["C_CONTIGUOUS"]
    # Flat quadrants survive JPEG at quality 95 with only edge ringing.
    assert mean_abs_diff(out, src) < 4.0
    # Centre of each quadrant exactly its colour, within JPEG rounding.
    assert np.abs(out[12, 20].astype(int) - [0, 0, 255]).max() <= 6
    assert np.abs(out[12, 60].astype(int) - [0, 255, 0]).max() <= 6
    assert np.abs(out[36, 20].astype(int) - [255, 0, 0]).max() <= 6
    assert np.abs(out[36, 60].astype(int) - [255, 255, 255]).max() <= 6


def test_turbojpeg_and_opencv_agree(turbo_decoder: ImageDecoder, cv_decoder: ImageDecoder) -> None:
    data = jpeg_bytes(quadrant_image())
    assert mean_abs_diff(turbo_decoder.decode(data), cv_decoder.decode(data)) < 1.0


def test_decode_png_is_lossless(any_decoder: ImageDecoder) -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    out = any_decoder.decode(png_bytes(src))
    np.testing.assert_array_equal(out, src)


def test_decode_other_formats_through_opencv(any_decoder: ImageDecoder) -> None:
    src = quadrant_image()
    ok, buf = cv2.imencode(".bmp", src)
    assert ok
    np.testing.assert_array_equal(any_decoder.decode(buf.tobytes()), src)
    with pytest.raises(ImageError) as info:
        ImageDecoder(max_pixels=HEIGHT * WIDTH - 1, turbo=any_decoder.turbo).decode(buf.tobytes())
    assert info.value.code == "image_too_large"


def test_decode_grey_png_gives_three_channels(any_decoder: ImageDecoder) -> None:
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    out = any_decoder.decode(png_bytes(grey))
    assert out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out[..., 0], grey)
    np.testing.assert_array_equal(out[..., 2], grey)


def test_empty_image(any_decoder: ImageDecoder) -> None:
    with pytest.raises(ImageError) as info:
        any_decoder.decode(b"")
    assert info.value.code == "empty_image"


@pytest.mark.parametrize(
    "data",
    [
        b"this is certainly not an image",
        b"\xff\xd8" + b"\x00" * 64,  # JPEG magic, then nothing valid
        b"\xff\xd8\xff\xe0garbage garbage garbage garbage\xff\xd9",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 8,  # PNG magic, header cut short
    ],
)
def test_corrupt_bytes(any_decoder: ImageDecoder, data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        any_decoder.decode(data)
    assert info.value.code == "corrupt_image"


def test_png_with_broken_body_is_corrupt(any_decoder: ImageDecoder) -> None:
    data = png_bytes(quadrant_image())
    broken = data[:40] + bytes(b ^ 0x5A for b in data[40:-12]) + data[-12:]
    with pytest.raises(ImageError) as info:
        any_decoder.decode(broken)
    assert info.value.code == "corrupt_image"


@pytest.mark.filterwarnings("ignore:Premature end of JPEG file")
@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_truncated_jpeg_is_corrupt(any_decoder: ImageDecoder, keep: float) -> None:
    rng = np.random.default_rng(0)
    # Noise makes the entropy-coded data long, so the cut lands well inside the scan.
    data = jpeg_bytes(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    with pytest.raises(ImageError) as info:
        any_decoder.decode(data[: int(len(data) * keep)])
    assert info.value.code == "corrupt_image"


@pytest.mark.filterwarnings("ignore:Bogus marker length")
def test_jpeg_cut_inside_header_is_corrupt(any_decoder: ImageDecoder) -> None:
    data = jpeg_bytes(quadrant_image())
    with pytest.raises(ImageError) as info:
        any_decoder.decode(data[: sof_offset(data) + 4])
    assert info.value.code == "corrupt_image"


# ---------------------------------------------------------------- pixel limit


class _NoDecodeTurbo:
    """Wraps the real TurboJPEG: headers are read, but decoding the pixels is a test failure."""

    def __init__(self, real: object) -> None:
        self.real = real

    def decode_header(self, data: bytes) -> tuple[int, int, int, int]:
        return self.real.decode_header(data)  # type: ignore[attr-defined, no-any-return]

    def decode(self, data: bytes) -> np.ndarray:
        raise AssertionError("pixels were decoded despite the header's size")


def test_jpeg_bomb_refused_from_header_turbojpeg(turbo_decoder: ImageDecoder) -> None:
    data = with_jpeg_size(jpeg_bytes(quadrant_image()), 30000, 30000)
    decoder = ImageDecoder(max_pixels=40_000_000, turbo=_NoDecodeTurbo(turbo_decoder.turbo))
    with pytest.raises(ImageError) as info:
        decoder.decode(data)
    assert info.value.code == "image_too_large"
    assert "30000x30000" in str(info.value)
    assert "MAX_IMAGE_PIXELS" in str(info.value)


def test_jpeg_bomb_refused_from_header_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    data = with_jpeg_size(jpeg_bytes(quadrant_image()), 30000, 30000)
    assert jpeg_size(data) == (30000, 30000)

    def no_decode(*args: object) -> None:
        raise AssertionError("pixels were decoded despite the header's size")

    monkeypatch.setattr(images.cv2, "imdecode", no_decode)
    decoder = ImageDecoder(max_pixels=40_000_000, turbo=None)
    with pytest.raises(ImageError) as info:
        decoder.decode(data)
    assert info.value.code == "image_too_large"


def test_png_bomb_refused_from_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_with_ihdr_size(png_bytes(quadrant_image()), 30000, 30000)
    assert png_size(data) == (30000, 30000)

    def no_decode(*args: object) -> None:
        raise AssertionError("pixels were decoded despite the header's size")

    monkeypatch.setattr(images.cv2, "imdecode", no_decode)
    with pytest.raises(ImageError) as info:
        ImageDecoder(max_pixels=40_000_000, turbo=None).decode(data)
    assert info.value.code == "image_too_large"


def test_pixel_limit_is_inclusive(any_decoder: ImageDecoder) -> None:
    jpeg, png = jpeg_bytes(quadrant_image()), png_bytes(quadrant_image())
    exact = HEIGHT * WIDTH
    for data in (jpeg, png):
        ok = ImageDecoder(max_pixels=exact, turbo=any_decoder.turbo).decode(data)
        assert ok.shape == (HEIGHT, WIDTH, 3)
        with pytest.raises(ImageError) as info:
            ImageDecoder(max_pixels=exact - 1, turbo=any_decoder.turbo).decode(data)
        assert info.value.code == "image_too_large"


def test_zero_size_header_is_corrupt() -> None:
    data = png_with_ihdr_size(png_bytes(quadrant_image()), 0, 10)
    with pytest.raises(ImageError) as info:
        ImageDecoder(max_pixels=1000, turbo=None).decode(data)
    assert info.value.code == "corrupt_image"


def test_header_size_readers() -> None:
    assert jpeg_size(jpeg_bytes(quadrant_image())) == (WIDTH, HEIGHT)
    assert png_size(png_bytes(quadrant_image())) == (WIDTH, HEIGHT)
    # Exif before the frame header is skipped over.
    assert jpeg_size(with_exif(jpeg_bytes(quadrant_image()), 6)) == (WIDTH, HEIGHT)


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_read(orientation: int, endian: str) -> None:
    data = with_exif(jpeg_bytes(quadrant_image()), orientation, endian)
    assert exif_orientation(data) == orientation


def test_exif_orientation_absent_or_invalid_is_one() -> None:
    plain = jpeg_bytes(quadrant_image())
    assert exif_orientation(plain) == 1
    assert exif_orientation(with_exif(plain, 9)) == 1
    assert exif_orientation(with_exif(plain, 0)) == 1
    # An APP1 that is not Exif (XMP, say) is not read as orientation.
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x/>"
    app1 = b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp
    assert exif_orientation(plain[:2] + app1 + plain[2:]) == 1


# Where each source quadrant ends up, by hand from the EXIF definitions (the tag says how
# the stored pixels must be transformed for display): tl/tr/bl/br of the upright result.
UPRIGHT_QUADRANTS = {
    1: ("tl", "tr", "bl", "br"),
    2: ("tr", "tl", "br", "bl"),  # mirror left-right
    3: ("br", "bl", "tr", "tl"),  # rotate 180
    4: ("bl", "br", "tl", "tr"),  # mirror top-bottom
    5: ("tl", "bl", "tr", "br"),  # transpose
    6: ("bl", "tl", "br", "tr"),  # rotate 90 clockwise
    7: ("br", "tr", "bl", "tl"),  # transverse
    8: ("tr", "br", "tl", "bl"),  # rotate 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_by_hand(orientation: int) -> None:
    out = apply_orientation(quadrant_image(), orientation)
    expected_shape = (HEIGHT, WIDTH, 3) if orientation <= 4 else (WIDTH, HEIGHT, 3)
    assert out.shape == expected_shape
    assert out.flags["C_CONTIGUOUS"]
    h, w = out.shape[:2]
    corners = (out[0, 0], out[0, w - 1], out[h - 1, 0], out[h - 1, w - 1])
    for pixel, name in zip(corners, UPRIGHT_QUADRANTS[orientation], strict=True):
        assert tuple(pixel) == QUADRANT_COLOURS[name]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_turbojpeg_exif_matches_opencv(turbo_decoder: ImageDecoder, orientation: int) -> None:
    data = with_exif(jpeg_bytes(quadrant_image()), orientation)
    ours = turbo_decoder.decode(data)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert ours.shape == reference.shape
    assert mean_abs_diff(ours, reference) < 1.0
    # ...and not equal to any of the other seven orientations (the test image tells them apart).
    base = turbo_decoder.decode(jpeg_bytes(quadrant_image()))
    for other in range(1, 9):
        if other == orientation:
            continue
        candidate = apply_orientation(base, other)
        if candidate.shape == ours.shape:
            assert mean_abs_diff(candidate, ours) > 50


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_opencv_path_applies_exif(cv_decoder: ImageDecoder, orientation: int) -> None:
    out = cv_decoder.decode(with_exif(jpeg_bytes(quadrant_image()), orientation))
    expected = apply_orientation(quadrant_image(), orientation)
    assert mean_abs_diff(out, expected) < 4.0


# ---------------------------------------------------------------- letterbox


def test_letterbox_landscape() -> None:
    img = np.full((960, 1280, 3), 200, np.uint8)
    canvas, scale = letterbox(img, (640, 640))
    assert scale == 0.5
    assert canvas.shape == (640, 640, 3)
    assert canvas.dtype == np.uint8
    assert (canvas[:480] == 200).all()
    assert (canvas[480:] == 0).all()


def test_letterbox_portrait() -> None:
    img = np.full((1280, 960, 3), 77, np.uint8)
    canvas, scale = letterbox(img, (640, 640))
    assert scale == 0.5
    assert (canvas[:, :480] == 77).all()
    assert (canvas[:, 480:] == 0).all()


def test_letterbox_exact_ratio_fills_canvas() -> None:
    img = np.full((320, 320, 3), 9, np.uint8)
    canvas, scale = letterbox(img, (640, 640))
    # Same aspect ratio: the whole canvas is image, scaled up 2x as InsightFace does.
    assert scale == 2.0
    assert (canvas == 9).all()


def test_letterbox_non_square_canvas() -> None:
    # Square image into a 640 wide x 480 high input: height limits, 480x480 at the left.
    img = np.full((1000, 1000, 3), 50, np.uint8)
    canvas, scale = letterbox(img, (640, 480))
    assert canvas.shape == (480, 640, 3)
    assert scale == pytest.approx(0.48)
    assert (canvas[:, :480] == 50).all()
    assert (canvas[:, 480:] == 0).all()


def test_letterbox_keeps_content_top_left() -> None:
    # A marker block in the bottom-right corner of the source lands at the bottom-right of
    # the resized content: source (600..639, 1240..1279) -> canvas (300..319, 620..639).
    img = np.zeros((640, 1280, 3), np.uint8)
    img[600:, 1240:] = (10, 20, 30)
    canvas, scale = letterbox(img, (640, 640))
    assert scale == 0.5
    np.testing.assert_array_equal(canvas[300:320, 620:640], np.full((20, 20, 3), (10, 20, 30)))
    assert (canvas[:300] == 0).all()
    assert (canvas[320:] == 0).all()


def test_letterbox_decoded_coordinates_map_back() -> None:
    # A point at (x, y) in the canvas is (x / scale, y / scale) in the original image.
    img = np.zeros((720, 1280, 3), np.uint8)
    img[360, 640] = 255
    canvas, scale = letterbox(img, (640, 640))
    assert scale == 0.5
    ys, xs = np.nonzero(canvas[..., 0])
    assert abs(ys.mean() / scale - 360) <= 2
    assert abs(xs.mean() / scale - 640) <= 2


# ---------------------------------------------------------------- known bugs


def test_jpeg_with_trailer_after_eoi_decodes(any_decoder: ImageDecoder) -> None:
    src = quadrant_image()
    data = jpeg_bytes(src) + b"SEFH" + b"\x01\x02trailer bytes that follow the image" * 4
    out = any_decoder.decode(data)
    assert mean_abs_diff(out, src) < 4.0


def test_jpeg_fill_bytes_before_marker(cv_decoder: ImageDecoder) -> None:
    data = jpeg_bytes(quadrant_image())
    pos = sof_offset(data)
    filled = data[:pos] + b"\xff\xff" + data[pos:]
    assert jpeg_size(filled) == (WIDTH, HEIGHT)
    assert cv_decoder.decode(filled).shape == (HEIGHT, WIDTH, 3)
