"""Typed keys for everything the app keeps on its `web.Application`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web

from appliance.api.metrics import Metrics
from appliance.api.policy import PolicyBoard
from appliance.config import Settings
from appliance.pipeline.faces import FaceAnalyzer
from appliance.pipeline.images import ImageDecoder


@dataclasses.dataclass
class ModelsState:
    """What /info and /health/ready report about the loaded models."""

    backend: str
    detector: dict[str, Any]
    recognizer: dict[str, Any]
    backend_reason: str = ""
    loaded: bool = False


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DECODER = web.AppKey("decoder", ImageDecoder)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
ANALYZER = web.AppKey("analyzer", FaceAnalyzer)
MODELS = web.AppKey("models", ModelsState)
URL_SESSION = web.AppKey("url_session", aiohttp.ClientSession)
# Extra sections of /info and checks of /health/ready, filled by the parts that own them.
INFO_PROVIDERS = web.AppKey("info_providers", dict[str, Callable[[], Any]])
READINESS_CHECKS = web.AppKey("readiness_checks", dict[str, Callable[[], dict[str, Any]]])
POLICY = web.AppKey("policy", PolicyBoard)
