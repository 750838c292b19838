"""Every typed key the app keeps on its `web.Application`, in one place (aiohttp AppKey)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web

from appliance.api.gallery_service import GalleryService
from appliance.api.metrics import Metrics, StreamMetrics
from appliance.api.policy import PolicyBoard
from appliance.api.stream_session import StreamRegistry
from appliance.config import Settings
from appliance.models.registry import DEMO_DETECTOR, DEMO_RECOGNIZER
from appliance.pipeline.faces import FaceAnalyzer
from appliance.pipeline.images import ImageDecoder
from appliance.watchdog import Watchdog


@dataclasses.dataclass
class ModelsState:
    """What /info and /health/ready report about the loaded models."""

    backend: str
    detector: dict[str, Any]
    recognizer: dict[str, Any]
    backend_reason: str = ""
    loaded: bool = False

    @property
    def demo(self) -> bool:
        """The generated demo models answer: responses must say their numbers mean nothing."""
        return (
            self.detector.get("name") == DEMO_DETECTOR
            or self.recognizer.get("name") == DEMO_RECOGNIZER
        )


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
# Set when shutdown begins: aiohttp then drops the bytes still arriving on open connections
# (RequestHandler.data_received ignores data once the connection is closing), so a body read
# in progress can never finish and must be answered at once (request_body.py).
STOPPING = web.AppKey("stopping", asyncio.Event)
STREAMS = web.AppKey("streams", StreamRegistry)
STREAM_METRICS = web.AppKey("stream_metrics", StreamMetrics)
WATCHDOG = web.AppKey("watchdog", Watchdog)
GALLERY = web.AppKey("gallery", GalleryService)
# /openapi.json, encoded once at start-up (the settings fill in defaults).
OPENAPI_SPEC = web.AppKey("openapi_spec", bytes)
