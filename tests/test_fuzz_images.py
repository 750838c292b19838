"""Property-based fuzzing of image decoding (issue 12): every input decodes or raises
ImageError, never anything else, never past MAX_IMAGE_PIXELS or the pixel budget.

Each test prints how many inputs it tried and what they became; docs/RELIABILITY.md records a
run. Both decoding paths (turbojpeg and OpenCV) see every input.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_oracles import FUZZ_MAX_PIXELS, check_image, make_decoders
from tests.image_samples import (
    bombs,
    cmyk_jpeg,
    encode,
    noise,
    real_photos,
    rle_bmp,
    webp_vp8_header,
    webp_vp8l_header,
    webp_vp8x_header,
    with_jpeg_size,
    with_png_size,
)

# libjpeg's "Corrupt JPEG data" notices are expected on fuzzed input.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def seeds() -> dict[str, bytes]:
    """Small valid files of every accepted kind, for the mutation fuzzer to start from."""
    img = noise(24, 32)
    grey = noise(24, 32, channels=1)
    return {
        "jpeg": encode(".jpg", img),
        "jpeg_progressive": encode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "jpeg_grey": encode(".jpg", grey),
        "jpeg_cmyk": cmyk_jpeg(24, 32),
        "png": encode(".png", img),
        "png_grey": encode(".png", grey),
        "png_16bit": encode(".png", img.astype(np.uint16) * 257),
        "png_alpha": encode(".png", noise(24, 32, channels=4)),
        "bmp": encode(".bmp", img),
        "bmp_rle": rle_bmp(32, 24, rows=24),
        # OpenCV 5 writes lossless WebP by default; quality <= 100 gives lossy (VP8).
        "webp": encode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 80]),
        "webp_lossless": encode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101]),
    }


SEEDS = seeds()
MAGICS = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"GIF89a",
    b"II*\x00",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# No fuzzed input may cost more than a few largest images' worth of memory (12 MB each at
# FUZZ_MAX_PIXELS); before the PNG chunk check one 883-byte input took the peak to 4.2 GB.
MAX_PEAK_GROWTH_MB = 256


def report(
    capsys: pytest.CaptureFixture[str],
    name: str,
    outcomes: Counter[str],
    t0: float,
    rss0: float,
) -> None:
    grown = peak_rss_mb() - rss0
    with capsys.disabled():
        print(
            f"\nfuzz {name}: {sum(outcomes.values())} inputs, failures 0, "
            f"{time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB "
            f"(+{grown:.0f} MB), outcomes {dict(sorted(outcomes.items()))}"
        )
    assert grown < MAX_PEAK_GROWTH_MB


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with a few byte flips, overwrites, insertions and a possible truncation."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "big"]))
        # Headers live in the first bytes: weight positions towards them.
        limit = draw(st.sampled_from([64, 512, len(data)]))
        pos = draw(st.integers(0, max(0, min(limit, len(data)) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "big" and pos + 4 <= len(data):
            data[pos : pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"]))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def claimed_sizes(draw: st.DrawFn) -> bytes:
    """Headers of every accepted format claiming arbitrary sizes, from 0x0 to 2^32 a side."""
    w = draw(st.integers(0, 2**32 - 1) | st.integers(0, 5000))
    h = draw(st.integers(0, 2**32 - 1) | st.integers(0, 5000))
    kind = draw(st.sampled_from(["jpeg", "png", "bmp", "vp8", "vp8l", "vp8x"]))
    if kind == "jpeg":
        return with_jpeg_size(SEEDS["jpeg"], w & 0xFFFF, h & 0xFFFF)
    if kind == "png":
        return with_png_size(SEEDS["png"], w, h)
    if kind == "bmp":
        signed_h = h - 2**32 if h >= 2**31 else h
        return rle_bmp(w & 0x7FFFFFFF, signed_h, rows=4)
    if kind == "vp8":
        return webp_vp8_header(w & 0xFFFF, h & 0xFFFF)
    if kind == "vp8l":
        return webp_vp8l_header((w & 0x3FFF) + 1, (h & 0x3FFF) + 1)
    return webp_vp8x_header((w & 0xFFFFFF) + 1, (h & 0xFFFFFF) + 1)


def fuzz_decoders(
    capsys: pytest.CaptureFixture[str], name: str, inputs: st.SearchStrategy[bytes], examples: int
) -> Counter[str]:
    """Feed `examples` inputs to both decoding paths under the contract; returns the outcomes."""
    decoders, outcomes = make_decoders(), Counter[str]()
    t0, rss0 = time.perf_counter(), peak_rss_mb()

    @settings(FUZZ, max_examples=examples)
    @given(inputs)
    def run(data: bytes) -> None:
        for decoder in decoders:
            outcomes[check_image(decoder, data)] += 1

    run()
    report(capsys, name, outcomes, t0, rss0)
    return outcomes


def test_fuzz_arbitrary_bytes_decode_or_raise_image_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    behind_magic = st.sampled_from(MAGICS).flatmap(
        lambda magic: st.binary(max_size=2048).map(lambda tail: magic + tail)
    )
    outcomes = fuzz_decoders(
        capsys, "images/arbitrary", st.binary(max_size=4096) | behind_magic, 1500
    )
    codes = {"ok", "corrupt_image", "empty_image", "unsupported_format", "image_too_large"}
    assert set(outcomes) <= codes


def test_fuzz_mutated_images_decode_or_raise_image_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes = fuzz_decoders(capsys, "images/mutated", mutated(), 2000)
    # The mutator reaches both sides of the contract, not only early refusals.
    assert outcomes["ok"] > 100 and outcomes["corrupt_image"] > 100


def test_fuzz_claimed_sizes_never_decode_past_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    outcomes = fuzz_decoders(capsys, "images/claimed-sizes", claimed_sizes(), 1000)
    assert outcomes["image_too_large"] > 100


def test_bombs_in_every_format_refused_by_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    outcomes, t0, rss0 = Counter[str](), time.perf_counter(), peak_rss_mb()
    for decoder in make_decoders():
        for data in bombs(FUZZ_MAX_PIXELS).values():
            outcomes[check_image(decoder, data)] += 1
    report(capsys, "images/bombs", outcomes, t0, rss0)
    assert set(outcomes) == {"image_too_large"}


PHOTOS = real_photos()


@pytest.mark.skipif(not PHOTOS, reason="../shared/photos is absent (see ../shared/DATA.md)")
@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_real_photos_truncated_at_every_tenth_are_corrupt(
    photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = photo.read_bytes()
    outcomes, t0, rss0 = Counter[str](), time.perf_counter(), peak_rss_mb()
    for decoder in make_decoders():
        decoder.max_pixels = 10**8  # the photos are real: only the truncation should matter
        decoder.budget = type(decoder.budget)(10**8)
        assert check_image(decoder, data) == "ok"
        for tenth in range(10):
            outcome = check_image(decoder, data[: len(data) * tenth // 10])
            outcomes[outcome] += 1
            expected = "empty_image" if tenth == 0 else "corrupt_image"
            assert outcome == expected, (photo.name, tenth)
    report(capsys, f"images/truncated {photo.name}", outcomes, t0, rss0)
