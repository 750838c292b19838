"""Admission from the header: formats, bombs in every accepted format, OpenCV's own limit,
CMYK, and the pixel budget (issue 12 defect 2, issue 11 item 4)."""

from __future__ import annotations

import os
import resource
import threading
from typing import Any

import cv2
import numpy as np
import pytest

from appliance.api import state
from appliance.pipeline import images
from appliance.pipeline.batcher import QueueFullError
from appliance.pipeline.budget import BudgetExceeded, PixelBudget
from appliance.pipeline.image_formats import JPEG_MAGIC, ImageInfo, is_jpeg
from appliance.pipeline.images import ImageDecoder, ImageError
from tests.helpers import b64, jpeg
from tests.image_samples import (
    bombs,
    cmyk_jpeg,
    encode,
    noise,
    os2_bmp_header,
    rle_bmp,
    webp_vp8_header,
    webp_vp8l_header,
    webp_vp8x_header,
)

LIMIT = 40_000_000


@pytest.fixture(params=["turbojpeg", "opencv"])
def decoder(request: pytest.FixtureRequest) -> ImageDecoder:
    if request.param == "turbojpeg":
        d = ImageDecoder.create(LIMIT)
        if d.turbo is None:
            pytest.skip("libturbojpeg is not installed")
        return d
    return ImageDecoder(max_pixels=LIMIT, turbo=None)


@pytest.fixture
def no_pixel_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("pixels were decoded despite the header's size")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (encode(".jpg", noise(30, 50)), ImageInfo("jpeg", 50, 30)),
        (encode(".png", noise(30, 50)), ImageInfo("png", 50, 30)),
        (encode(".bmp", noise(30, 50)), ImageInfo("bmp", 50, 30)),
        (encode(".bmp", noise(30, 50)[::-1].copy()), ImageInfo("bmp", 50, 30)),
        (encode(".webp", noise(30, 50), [cv2.IMWRITE_WEBP_QUALITY, 80]), ImageInfo("webp", 50, 30)),
        (
            encode(".webp", noise(30, 50), [cv2.IMWRITE_WEBP_QUALITY, 101]),
            ImageInfo("webp", 50, 30),
        ),
        (rle_bmp(12000, 12000), ImageInfo("bmp", 12000, 12000)),
        (rle_bmp(300, -200), ImageInfo("bmp", 300, 200)),  # top-down
        (os2_bmp_header(640, 480), ImageInfo("bmp", 640, 480)),
        (webp_vp8_header(16383, 2), ImageInfo("webp", 16383, 2)),
        (webp_vp8l_header(16384, 3), ImageInfo("webp", 16384, 3)),
        (webp_vp8x_header(1 << 24, 5), ImageInfo("webp", 1 << 24, 5)),
    ],
)
def test_probe_reads_format_and_size_from_the_header(data: bytes, expected: ImageInfo) -> None:
    decoder = ImageDecoder(max_pixels=10**15, turbo=None, budget=PixelBudget(10**15))
    assert decoder.probe(data) == expected


@pytest.mark.parametrize(
    ("ext", "name"),
    [(".gif", "GIF"), (".tiff", "TIFF"), (".ppm", "Netpbm"), (".hdr", "Radiance HDR")],
)
def test_formats_without_a_size_check_are_refused(
    decoder: ImageDecoder, no_pixel_decode: None, ext: str, name: str
) -> None:
    with pytest.raises(ImageError) as info:
        decoder.decode(encode(ext, noise(8, 8)))
    assert info.value.code == "unsupported_format"
    assert str(info.value) == f"{name} images are not accepted; send JPEG, PNG, BMP or WebP"


def test_one_jpeg_magic_for_rest_and_streams() -> None:
    assert images.JPEG_MAGIC is JPEG_MAGIC == b"\xff\xd8\xff"
    assert is_jpeg(jpeg(8, 8))
    assert not is_jpeg(b"\xff\xd8\x00\x00")


# ---------------------------------------------------------------- bombs


def test_defect2_rle_bmp_bomb_refused_from_header(
    decoder: ImageDecoder, no_pixel_decode: None
) -> None:
    """A 1.5 KB RLE BMP claiming 12000x12000 is refused before any decoder runs."""
    data = rle_bmp(12000, 12000)
    assert len(data) < 2048
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError) as info:
        decoder.decode(data)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert info.value.code == "image_too_large"
    assert str(info.value) == (
        "image is 12000x12000 = 144000000 pixels; the limit (MAX_IMAGE_PIXELS) is 40000000"
    )
    assert grown_kb < 10_000  # the 432 MB a decode would allocate never happened
    assert decoder.budget.in_use == 0 and decoder.budget.peak == 0


@pytest.mark.parametrize("kind", sorted(bombs(LIMIT)))
def test_bomb_in_every_accepted_format_is_refused_from_its_header(
    decoder: ImageDecoder, no_pixel_decode: None, kind: str
) -> None:
    data = bombs(LIMIT)[kind]
    with pytest.raises(ImageError) as info:
        decoder.decode(data)
    assert info.value.code == "image_too_large"
    assert "MAX_IMAGE_PIXELS" in str(info.value)


def test_opencv_limit_is_set_before_opencv_loads() -> None:
    """OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, at load: the package sets it first."""
    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == "40000000"
    # 6400x6400 = 41 M pixels: refused by OpenCV itself, from the header, before allocating.
    header = rle_bmp(6400, 6400)
    with pytest.raises(cv2.error, match="CV_IO_MAX_IMAGE_PIXELS"):
        cv2.imdecode(np.frombuffer(header, np.uint8), cv2.IMREAD_COLOR)


def test_opencv_limit_backs_ours_when_max_image_pixels_is_raised() -> None:
    decoder = ImageDecoder(max_pixels=50_000_000, turbo=None, budget=PixelBudget(50_000_000))
    with pytest.raises(ImageError) as info:
        decoder.decode(rle_bmp(6400, 6400))
    assert info.value.code == "image_too_large"
    assert "OPENCV_IO_MAX_IMAGE_PIXELS" in str(info.value)


# ---------------------------------------------------------------- odd but valid images


def test_cmyk_jpeg_falls_back_to_opencv(decoder: ImageDecoder) -> None:
    """Issue 11 item 4: libjpeg-turbo refuses CMYK/YCCK; OpenCV decodes it, as the peer does."""
    data = cmyk_jpeg(40, 60)
    if decoder.turbo is not None:
        with pytest.raises(OSError, match="color conversion"):
            decoder.turbo.decode(data)
    out = decoder.decode(data)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("ext", "params"),
    [
        (".jpg", []),
        (".png", []),
        (".bmp", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", []),
    ],
)
def test_one_pixel_images_decode(decoder: ImageDecoder, ext: str, params: list[int]) -> None:
    assert decoder.decode(encode(ext, noise(1, 1), params)).shape == (1, 1, 3)


def test_sixteen_bit_png_decodes_to_eight_bits(decoder: ImageDecoder) -> None:
    src = (np.arange(6 * 7 * 3, dtype=np.uint16).reshape(6, 7, 3) * 300).astype(np.uint16)
    out = decoder.decode(encode(".png", src))
    assert out.dtype == np.uint8 and out.shape == (6, 7, 3)
    np.testing.assert_array_equal(out, (src >> 8).astype(np.uint8))


def test_rle_bmp_of_honest_size_decodes(decoder: ImageDecoder) -> None:
    out = decoder.decode(rle_bmp(8, 5, rows=5))
    assert out.shape == (5, 8, 3)
    assert (out[:, :4] == 7).all()  # each row's run of colour 7 (grey 7 in the palette)


# ---------------------------------------------------------------- budget


def test_budget_reserves_releases_and_refuses_at_once() -> None:
    budget = PixelBudget(100)
    a = budget.reserve(60)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(41)
    assert isinstance(info.value, QueueFullError)  # the API's 503 + Retry-After path
    assert str(info.value).startswith("decode budget is full (60/100 pixels in flight")
    with budget.reserve(40):
        assert budget.in_use == 100
    a.release()
    a.release()  # idempotent
    assert (budget.in_use, budget.peak, budget.refused) == (0, 100, 1)
    with pytest.raises(ValueError, match="can never fit"):
        budget.reserve(101)


def test_budget_never_passes_capacity_under_threads() -> None:
    budget = PixelBudget(1000)
    granted = refused = 0
    lock = threading.Lock()

    def worker(seed: int) -> None:
        nonlocal granted, refused
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            try:
                with budget.reserve(int(rng.integers(1, 400))):
                    ok = 1
            except BudgetExceeded:
                ok = 0
            with lock:
                granted += ok
                refused += 1 - ok

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"budget threads: granted={granted} refused={refused} peak={budget.peak}")
    assert granted + refused == 16_000
    assert budget.in_use == 0
    assert budget.peak <= 1000


def test_decode_holds_budget_while_it_decodes(decoder: ImageDecoder) -> None:
    data = encode(".png", noise(100, 100))
    held = decoder.budget.reserve(decoder.budget.capacity - 9_999)
    with pytest.raises(BudgetExceeded):
        decoder.decode(data)  # needs 10 000 pixels, 9 999 are free
    held.release()
    assert decoder.decode(data).shape == (100, 100, 3)
    assert decoder.budget.in_use == 0
    assert decoder.budget.peak == decoder.budget.capacity - 9_999


def test_decode_under_the_callers_reservation_takes_no_more(decoder: ImageDecoder) -> None:
    data = encode(".jpg", noise(20, 30))
    info = decoder.probe(data)
    assert (info.format, info.width, info.height, info.pixels) == ("jpeg", 30, 20, 600)
    with decoder.budget.reserve(info.pixels) as held:
        assert decoder.decode(data, held).shape == (20, 30, 3)
        assert decoder.budget.in_use == 600
        with pytest.raises(ValueError, match="reservation holds 599"):
            decoder.decode(data, decoder.budget.reserve(599))
    assert decoder.budget.in_use == 599  # the test's leaked 599 only


def test_max_pixels_in_flight_must_hold_one_image(make_settings: Any) -> None:
    from appliance.config import ConfigError

    with pytest.raises(ConfigError, match="MAX_PIXELS_IN_FLIGHT must be >= MAX_IMAGE_PIXELS"):
        make_settings(max_image_pixels=1000, max_pixels_in_flight=999)


async def test_defect2_full_pixel_budget_answers_503_with_retry_after(serve: Any) -> None:
    client = await serve(
        max_image_pixels=1_000_000, max_pixels_in_flight=1_000_000, retry_after_s=3
    )
    budget = client.server.app[state.DECODER].budget
    assert budget.capacity == 1_000_000
    payload = {"images": {"data": [b64(jpeg(640, 480))]}}
    with budget.reserve(1_000_000 - 640 * 480 + 1):
        resp = await client.post("/extract", json=payload)
        body = await resp.json()
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"
    assert body["error"]["code"] == "overloaded"
    assert "decode budget is full" in body["error"]["message"]
    # Budget back: the same request succeeds, and nothing stays held.
    resp = await client.post("/extract", json=payload)
    assert resp.status == 200
    assert budget.in_use == 0


def test_png_chunk_claiming_4gb_is_refused_before_opencv(
    decoder: ImageDecoder, no_pixel_decode: None
) -> None:
    """Found by the fuzzer: OpenCV 5 allocated an IDAT's declared 4 GB before reading it."""
    data = bytearray(encode(".png", noise(24, 32)))
    idat = data.index(b"IDAT") - 4
    data[idat : idat + 4] = b"\xff\xff\xff\xff"
    assert len(data) < 5000
    with pytest.raises(ImageError) as info:
        decoder.decode(bytes(data))
    assert info.value.code == "corrupt_image"
    assert "PNG chunk b'IDAT' claims 4294967295 bytes" in str(info.value)


def test_png_chunk_flood_is_refused(decoder: ImageDecoder, no_pixel_decode: None) -> None:
    png = encode(".png", noise(4, 4))
    iend = png.index(b"IEND") - 4
    flood = png[:iend] + b"\x00\x00\x00\x00teXt\x00\x00\x00\x00" * 70_000 + png[iend:]
    with pytest.raises(ImageError, match="more than 65536 chunks"):
        decoder.decode(flood)


def test_jpeg_header_walk_is_capped(decoder: ImageDecoder, no_pixel_decode: None) -> None:
    """`probe` may run on the event loop: 100 000 comment segments must not make it slow."""
    src = encode(".jpg", noise(8, 8))
    flood = src[:2] + b"\xff\xfe\x00\x02" * 100_000 + src[2:]
    with pytest.raises(ImageError, match="more than 4096 markers before its scan"):
        decoder.probe(flood)
    fill = src[:2] + b"\xff" * 100_000 + src[2:]
    with pytest.raises(ImageError, match="more than 4096 markers"):
        decoder.probe(fill)
