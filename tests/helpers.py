"""Small builders shared by the API tests."""

from __future__ import annotations

import base64

import cv2
import numpy as np


def image(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (height, width, 3), dtype=np.uint8)


def jpeg(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    ok, buf = cv2.imencode(".jpg", image(width, height, seed))
    assert ok
    return bytes(buf.tobytes())


def png(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    ok, buf = cv2.imencode(".png", image(width, height, seed))
    assert ok
    return bytes(buf.tobytes())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
