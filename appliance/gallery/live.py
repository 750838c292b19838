"""Identities on a live stream: detect every frame, track, recognise only the faces the
tracker asks for, and report each face's track id and smoothed identity.

The API's stream session owns one LiveIdentifier per stream; the gallery search runs in the
executor because it may wait on the gallery's lock or read 100 MB of embeddings.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import Executor

import numpy as np

from appliance.gallery.gallery import Gallery
from appliance.pipeline.faces import AnalyzeOptions, FaceAnalyzer
from appliance.pipeline.images import ImageArray
from appliance.pipeline.tracking import FaceTracker


@dataclasses.dataclass(frozen=True)
class LiveFace:
    bbox: tuple[float, float, float, float]
    prob: float
    track_id: int
    identity: str | None
    similarity: float | None
    recognized: bool  # the recognizer ran on this face in this frame


class LiveIdentifier:
    def __init__(
        self,
        analyzer: FaceAnalyzer,
        gallery: Gallery,
        tracker: FaceTracker,
        executor: Executor,
        det_threshold: float,
        identify_threshold: float | None = None,
    ) -> None:
        self._analyzer = analyzer
        self._gallery = gallery
        self.tracker = tracker
        self._executor = executor
        self._options = AnalyzeOptions(
            threshold=det_threshold,
            extract_embedding=False,
            # The aligned crops come back so the chosen faces can be embedded without
            # detecting again.
            return_face_data=True,
            source="stream",
        )
        self._identify_threshold = identify_threshold

    async def process(self, img: ImageArray) -> list[LiveFace]:
        result = await self._analyzer.analyze(img, self._options)
        tracked = self.tracker.update([f.bbox for f in result.faces])
        chosen = [
            (t, crop)
            for t in tracked
            if t.recognize and (crop := result.faces[t.index].crop) is not None
        ]
        if chosen:
            embedded = await asyncio.gather(
                *(self._analyzer.embed_only(crop, "stream") for _, crop in chosen)
            )
            vecs = np.stack([np.asarray(r.faces[0].vec, np.float32) for r in embedded])
            loop = asyncio.get_running_loop()
            answers = await loop.run_in_executor(
                self._executor, self._gallery.identify, vecs, 1, self._identify_threshold
            )
            for (t, _), answer, vec in zip(chosen, answers, vecs, strict=True):
                self.tracker.record(t.track_id, answer.identity, answer.similarity, vec)
        out = []
        for t in tracked:
            face = result.faces[t.index]
            identity, similarity = self.tracker.identity(t.track_id)
            out.append(
                LiveFace(face.bbox, face.prob, t.track_id, identity, similarity, t.recognize)
            )
        return out
