"""Small builders shared by the API tests."""

from __future__ import annotations

import base64
from pathlib import Path

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


def write_calm_sysfs(root: Path) -> Path:
    """A sysfs/procfs tree of a cool, idle device, for settings that must not read the host's.

    With TELEMETRY_SOURCE=auto a test would read the CI runner's real /sys and /proc/meminfo,
    and a hot or busy runner would change stream admission (issue 12 defect 8).
    """
    zone = root / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("45000\n")
    meminfo = root / "proc" / "meminfo"
    meminfo.parent.mkdir(parents=True, exist_ok=True)
    total_kb = 32 * 1024 * 1024
    meminfo.write_text(
        f"MemTotal: {total_kb} kB\nMemFree: {total_kb // 2} kB\n"
        f"MemAvailable: {total_kb // 2} kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n"
    )
    return root
