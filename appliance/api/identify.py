"""`identify` on /extract, /gallery/search and streams: gallery answers onto the wire faces.

REST: every face of every image is searched in one gallery call (one matrix product), and
each `FaceOut` gains `identity` and `matches`. Streams: a `LiveIdentifier` per stream tracks
faces and recognises only those its tracker asks for; each face carries `track_id`,
`identity` and `similarity`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import msgspec

from appliance.api.face_wire import coordinates
from appliance.api.gallery_service import GalleryService
from appliance.api.request_body import ParsedExtract
from appliance.api.wire import FaceOut, ImageFailed, ImageOk, MatchOut
from appliance.config import Settings
from appliance.gallery import Identification
from appliance.gallery.live import LiveFace, LiveIdentifier
from appliance.gallery.records import FloatArray
from appliance.pipeline.faces import FaceAnalyzer, ImageResult
from appliance.pipeline.images import ImageArray
from appliance.pipeline.tracking import FaceTracker, TrackerConfig

# Subjects per face that /extract with `identify` lists (/gallery/search takes `top_k`).
DEFAULT_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class SearchParams:
    top_k: int = DEFAULT_TOP_K
    threshold: float | None = None  # None: the gallery's IDENTIFY_THRESHOLD


# Per image, per face: the search's answer, or None where there was nothing to search
# (an image that failed, or a face without an embedding).
Identities = list[list[Identification | None]]


async def identify_results(
    service: GalleryService, results: Sequence[object], params: SearchParams
) -> Identities:
    vecs: list[FloatArray] = []
    where: list[tuple[int, int]] = []
    out: Identities = []
    for i, result in enumerate(results):
        if not isinstance(result, ImageResult):
            out.append([])
            continue
        out.append([None] * len(result.faces))
        for j, face in enumerate(result.faces):
            if face.vec is not None:
                vecs.append(face.vec)
                where.append((i, j))
    answers = await service.identify(vecs, params.top_k, params.threshold)
    for (i, j), answer in zip(where, answers, strict=True):
        out[i][j] = answer
    return out


def match_out(answer: Identification) -> list[MatchOut]:
    return [MatchOut(m.subject, round(m.similarity, 6), m.face_id) for m in answer.matches]


def with_embeddings(req: ParsedExtract) -> ParsedExtract:
    if req.request.extract_embedding:
        return req
    request = msgspec.structs.replace(req.request, extract_embedding=True)
    return dataclasses.replace(req, request=request)


def apply_identities(
    entries: Sequence[ImageOk | ImageFailed], identities: Identities, show_vec: bool
) -> None:
    for entry, answers in zip(entries, identities, strict=True):
        if not isinstance(entry, ImageOk):
            continue
        for face, answer in zip(entry.faces, answers, strict=True):
            if not show_vec:  # computed for the search only
                face.vec = face.norm = None
            face.identity = answer.identity if answer is not None else None
            face.matches = match_out(answer) if answer is not None else []


class LiveFaces:
    """One stream's identification: a LiveIdentifier and the stream metrics it feeds."""

    def __init__(self, identifier: LiveIdentifier, service: GalleryService) -> None:
        self.identifier = identifier
        self.service = service

    async def faces(self, img: ImageArray, subpixel: bool) -> list[FaceOut]:
        live = await self.identifier.process(img)
        metrics = self.service.metrics
        metrics.stream_faces.inc(len(live))
        recognized = [f for f in live if f.recognized]
        metrics.stream_recognitions.inc(len(recognized))
        return [live_face_out(face, i, subpixel) for i, face in enumerate(live)]


def live_face_out(face: LiveFace, index: int, subpixel: bool) -> FaceOut:
    width = face.bbox[2] - face.bbox[0]
    return FaceOut(
        num_det=index,
        prob=round(float(face.prob), 6),
        bbox=coordinates(face.bbox, subpixel),
        size=round(float(width), 2) if subpixel else int(width),
        landmarks=None,
        norm=None,
        vec=None,
        facedata=None,
        identity=face.identity,
        track_id=face.track_id,
        similarity=round(face.similarity, 4) if face.similarity is not None else None,
    )


def live_factory(
    service: GalleryService, analyzer: FaceAnalyzer, settings: Settings, det_threshold: float
) -> LiveFaces | None:
    """A new stream identifier, or None while the gallery is unavailable."""
    if not service.available:
        return None
    return LiveFaces(
        LiveIdentifier(
            analyzer,
            service.require(),
            FaceTracker(TrackerConfig.from_settings(settings)),
            service.executor,
            det_threshold,
            settings.identify_threshold,
        ),
        service,
    )
