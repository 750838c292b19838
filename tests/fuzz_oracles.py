"""What every decoder and parser input must do, shared by the hypothesis tests and the atheris
target (tests/fuzz_target.py): decode, or raise the pipeline's typed bad-input error, never
anything else, and never hold more than the limits allow."""

from __future__ import annotations

import ipaddress

import numpy as np

from appliance.api.errors import BadRequest
from appliance.api.urls import UrlRefused, check_headers, literal_address, parse_target
from appliance.pipeline.budget import PixelBudget
from appliance.pipeline.images import ImageDecoder, ImageError

# Small enough that no fuzzed input can cost real memory: 4 M pixels is 12 MB of BGR.
FUZZ_MAX_PIXELS = 4_000_000
ALLOWLIST = ("10.20.0.0/16", "camera.local")
ALLOWED_NET = ipaddress.ip_network(ALLOWLIST[0])


def make_decoders() -> list[ImageDecoder]:
    """The turbojpeg and the OpenCV paths, each with a budget of exactly one largest image."""
    turbo = ImageDecoder.create(FUZZ_MAX_PIXELS, max_pixels_in_flight=FUZZ_MAX_PIXELS)
    plain = ImageDecoder(
        max_pixels=FUZZ_MAX_PIXELS, turbo=None, budget=PixelBudget(FUZZ_MAX_PIXELS)
    )
    return [turbo, plain] if turbo.turbo is not None else [plain]


def check_image(decoder: ImageDecoder, data: bytes) -> str:
    """Decode `data` under the contract; returns "ok" or the ImageError code."""
    try:
        img = decoder.decode(data)
    except ImageError as exc:
        outcome = exc.code
    else:
        assert isinstance(img, np.ndarray) and img.dtype == np.uint8
        assert img.ndim == 3 and img.shape[2] == 3, img.shape
        assert img.shape[0] * img.shape[1] <= decoder.max_pixels
        assert img.flags["C_CONTIGUOUS"]
        outcome = "ok"
    assert decoder.budget.in_use == 0, "a decode kept its budget"
    assert decoder.budget.peak <= decoder.budget.capacity
    return outcome


def check_url_text(url: str) -> str:
    """Parse and check a caller's URL without any traffic: a URL, or UrlRefused."""
    try:
        parsed = parse_target(url, ALLOWLIST)
    except UrlRefused:
        return "refused"
    assert parsed.scheme in ("http", "https") and parsed.raw_host
    address = literal_address(parsed.raw_host)
    if address is not None and parsed.raw_host.lower() != "camera.local":
        # Anything let through by address must be public or in the allow-listed network.
        assert address.is_global or address in ALLOWED_NET
    return "allowed"


def check_header_pair(name: str, value: str) -> str:
    try:
        out = check_headers({name: value})
    except BadRequest:
        return "refused"
    assert not any(c in value for c in "\r\n\x00")
    assert out == {name: value}
    return "allowed"
