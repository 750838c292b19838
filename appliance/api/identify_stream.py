"""A stream with `identify` (issue 14): `{"type": "config", "identify": true}` makes each
result face carry `track_id`, `identity` and `similarity`, from a per-stream tracker that
asks for recognition only when a track appears, every TRACK_RECOGNIZE_EVERY frames or on a
better view (docs/GALLERY.md).

A subclass of the stream session rather than code inside it: the session's reader, worker,
writer and limits stay one module's job, and this one only swaps the per-frame analysis.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from appliance.api.identify import LiveFaces
from appliance.api.policy import LoadPolicy
from appliance.api.stream_frames import Frame
from appliance.api.stream_protocol import ResultMessage, StreamConfig
from appliance.api.stream_session import Stream, StreamDeps
from appliance.api.wire import FaceOut
from appliance.pipeline.faces import ImageResult
from appliance.pipeline.images import ImageArray

# A new identifier for a stream at this detection threshold; None without a gallery.
LiveFactory = Callable[[float], LiveFaces | None]


class IdentifyingStream(Stream):
    def __init__(
        self,
        deps: StreamDeps,
        ws: web.WebSocketResponse,
        stream_id: str,
        policy: LoadPolicy,
        live_factory: LiveFactory,
    ) -> None:
        super().__init__(deps, ws, stream_id, policy)
        self.live_factory = live_factory
        self.live: LiveFaces | None = None
        self.live_faces: list[FaceOut] | None = None  # the frame being answered

    def on_config(self, config: StreamConfig) -> None:
        # A new config starts new tracks: its detection threshold may differ.
        self.live = self.live_factory(config.options.threshold) if config.request.identify else None
        super().on_config(config)

    async def analyze(self, img: ImageArray) -> ImageResult:
        if self.live is None:
            self.live_faces = None
            return await super().analyze(img)
        self.live_faces = await self.live.faces(img, self.config.request.subpixel)
        return ImageResult(faces=[], timings_ms={})

    def result_message(self, frame: Frame, result: ImageResult, took_ms: float) -> ResultMessage:
        message = super().result_message(frame, result, took_ms)
        if self.live_faces is not None:
            message.faces, self.live_faces = self.live_faces, None
        return message
