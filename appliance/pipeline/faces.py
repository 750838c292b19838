"""`FaceAnalyzer`: decoded images in, faces (box, score, landmarks, embedding) out.

CPU-bound steps (letterbox, decoding the detector's outputs, alignment) run in a thread
pool so the event loop stays free; model runs go through the two shared batchers. Both models
take uint8 BGR pixels (the loader prepends the float conversion to their graphs): the
letterboxed canvas and the aligned crops go to the batchers as they are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from appliance.models.registry import ModelInfo
from appliance.pipeline import align, embed
from appliance.pipeline.batcher import Demand, DynamicBatcher
from appliance.pipeline.detect import NMS_THRESHOLD, Detection, decode_scrfd
from appliance.pipeline.images import Decoded, ImageArray, letterbox

FloatArray = npt.NDArray[np.float32]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class AnalyzeOptions:
    threshold: float = 0.6
    extract_embedding: bool = True
    return_face_data: bool = False
    limit_faces: int = 0  # 0 = no limit
    min_face_size: float = 0.0
    # Optional smaller detection resolution (width, height) for this request.
    max_size: tuple[int, int] | None = None
    # Where the work comes from ("rest", "stream"); batch metrics count it.
    source: str = "rest"


@dataclasses.dataclass
class Face:
    bbox: tuple[float, float, float, float]
    prob: float
    landmarks: FloatArray | None
    vec: FloatArray | None = None
    norm: float | None = None
    crop: ImageArray | None = None

    @property
    def size(self) -> float:
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])


@dataclasses.dataclass
class ImageResult:
    faces: list[Face]
    timings_ms: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An image with its detector input already made (`FaceAnalyzer.prepare`), on the thread
    that decoded it: one executor hand-off less per image than letterboxing afterwards."""

    image: Decoded
    canvas: ImageArray
    scale: float
    # The request's max_size the canvas was made for; another one letterboxes again.
    max_size: tuple[int, int] | None
    prepare_ms: float


@dataclasses.dataclass(frozen=True)
class ModelSlot:
    """A model as the analyzer uses it: registry facts, the model's input size, its batcher."""

    info: ModelInfo
    batcher: DynamicBatcher
    output_names: tuple[str, ...]
    input_size: tuple[int, int]  # (width, height)
    normalizes_input: bool = False

    def ordered(self, outputs: dict[str, FloatArray]) -> list[FloatArray]:
        """Outputs in the meaning order the registry records (SCRFD: s8..s32 scores, boxes, kps)."""
        values = [outputs[name] for name in self.output_names]
        if self.info.output_order is None:
            return values
        return [values[i] for i in self.info.output_order]


class FaceAnalyzer:
    def __init__(
        self,
        detector: ModelSlot,
        recognizer: ModelSlot | None,
        executor: Executor,
        nms_threshold: float = NMS_THRESHOLD,
        demand: Demand | None = None,
    ) -> None:
        self.detector = detector
        # Shared with the batchers (`loader.build_analyzer`): how many analyses are running.
        self.demand = demand or Demand()
        self.recognizer = recognizer
        self.nms_threshold = nms_threshold
        self._executor = executor

    async def _cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def prepare(self, image: ImageArray | Decoded, max_size: tuple[int, int] | None) -> Prepared:
        """The detector input for `image` (blocking: call it on a worker thread, typically
        right after decoding there); `analyze_many` then goes straight to the detector."""
        t0 = time.perf_counter()
        decoded = image if isinstance(image, Decoded) else Decoded(image, 1.0, 1.0)
        canvas, scale = self._prepare_detection(decoded.pixels, max_size)
        return Prepared(decoded, canvas, scale, max_size, (time.perf_counter() - t0) * 1e3)

    def _prepare_detection(
        self, img: ImageArray, max_size: tuple[int, int] | None
    ) -> tuple[ImageArray, float]:
        full = self.detector.input_size
        if max_size is None or max_size == full:
            canvas, scale = letterbox(img, full)
        else:
            # A smaller max_size detects at a lower resolution: the image is letterboxed into
            # the top-left max_size corner of the (fixed) detector input, the rest stays zero.
            small, scale = letterbox(img, (min(max_size[0], full[0]), min(max_size[1], full[1])))
            canvas = np.zeros((full[1], full[0], 3), np.uint8)
            canvas[: small.shape[0], : small.shape[1]] = small
        return canvas, scale

    def _finish_detection(
        self, image: Decoded, outputs: dict[str, FloatArray], scale: float, options: AnalyzeOptions
    ) -> tuple[list[Face], ImageArray]:
        img = image.pixels
        detections = decode_scrfd(
            self.detector.ordered(outputs),
            self.detector.input_size,
            options.threshold,
            scale,
            self.nms_threshold,
        )
        # Faces are reported (and sized) on the original image; crops come from the pixels.
        pairs = [(d, _to_original(d, image)) for d in detections]
        height, width = img.shape[0] / image.scale_y, img.shape[1] / image.scale_x
        pairs = [p for p in pairs if _clip(p[1], width, height).size_ok(options.min_face_size)]
        if options.limit_faces > 0:
            pairs = pairs[: options.limit_faces]
        detections = [d for d, _ in pairs]
        faces = [Face(bbox=m.bbox, prob=m.score, landmarks=m.landmarks) for _, m in pairs]
        if not (options.extract_embedding or options.return_face_data):
            # Nobody asked for crops or embeddings: no alignment, no recognizer.
            return faces, np.empty((0, align.CROP_SIZE, align.CROP_SIZE, 3), np.uint8)
        return faces, _crops(img, detections)

    async def _detect(
        self, item: Decoded | Prepared, options: AnalyzeOptions
    ) -> tuple[list[Face], ImageArray, dict[str, float]]:
        if isinstance(item, Prepared) and item.max_size == options.max_size:
            # Letterboxed on the thread that decoded it: its time as measured there.
            pre_ms = item.prepare_ms
        else:
            t0 = time.perf_counter()
            image = item.image if isinstance(item, Prepared) else item
            item = await self._cpu(self.prepare, image, options.max_size)
            pre_ms = (time.perf_counter() - t0) * 1e3
        image, scale = item.image, item.scale
        t1 = time.perf_counter()
        outputs = await self.detector.batcher.submit(item.canvas, options.source)
        t2 = time.perf_counter()
        faces, crops = await self._cpu(self._finish_detection, image, outputs, scale, options)
        t3 = time.perf_counter()
        timings = {
            "detect_pre_ms": pre_ms,
            "detect_ms": (t2 - t1) * 1e3,
            "detect_post_ms": (t3 - t2) * 1e3,
        }
        if options.return_face_data:
            for face, crop in zip(faces, crops, strict=True):
                face.crop = crop
        return faces, crops, timings

    async def analyze(self, img: ImageArray | Decoded, options: AnalyzeOptions) -> ImageResult:
        """One image: decoded pixels, or a `Decoded` at a reduced scale (`decode_for`), whose
        faces are reported in the original image's coordinates."""
        return (await self.analyze_many([img], options))[0]

    async def analyze_many(
        self, images: Sequence[ImageArray | Decoded | Prepared], options: AnalyzeOptions
    ) -> list[ImageResult]:
        """Every image of a request: detections run concurrently (the detector's batcher
        groups them), then the crops of all images go to the recognizer in one submission."""
        with self.demand.analysis():
            return await self._analyze_many(images, options)

    async def _analyze_many(
        self, images: Sequence[ImageArray | Decoded | Prepared], options: AnalyzeOptions
    ) -> list[ImageResult]:
        decoded = [
            i if isinstance(i, (Decoded, Prepared)) else Decoded(i, 1.0, 1.0) for i in images
        ]
        detected = await _all_or_none([self._detect(image, options) for image in decoded])
        results = [ImageResult(faces, timings) for faces, _, timings in detected]
        faces = [face for found, _, _ in detected for face in found]
        if faces and options.extract_embedding:
            t0 = time.perf_counter()
            crops = np.concatenate([crops for _, crops, _ in detected])
            await self._embed_into(faces, crops, options.source)
            elapsed = (time.perf_counter() - t0) * 1e3
            for result in results:
                if result.faces:
                    result.timings_ms["embed_ms"] = elapsed
        return results

    async def embed_only(self, img: ImageArray, source: str = "rest") -> ImageResult:
        """The image is already an aligned crop: resize to 112x112 and embed it."""
        return (await self.embed_many([img], source))[0]

    async def embed_many(
        self, images: Sequence[ImageArray], source: str = "rest"
    ) -> list[ImageResult]:
        """Each image is already an aligned crop: all are embedded in one submission."""
        with self.demand.analysis():
            return await self._embed_many(images, source)

    async def _embed_many(self, images: Sequence[ImageArray], source: str) -> list[ImageResult]:
        t0 = time.perf_counter()
        crops = []
        for img in images:
            square = img.shape[:2] == (align.CROP_SIZE, align.CROP_SIZE)
            crops.append(img if square else await self._cpu(_resize_crop, img))
        faces = [
            Face(bbox=(0.0, 0.0, float(i.shape[1]), float(i.shape[0])), prob=1.0, landmarks=None)
            for i in images
        ]
        if faces:
            await self._embed_into(faces, crops, source)
        elapsed = (time.perf_counter() - t0) * 1e3
        return [ImageResult(faces=[face], timings_ms={"embed_ms": elapsed}) for face in faces]

    async def _embed_into(
        self, faces: list[Face], crops: ImageArray | list[ImageArray], source: str
    ) -> None:
        """Embed the uint8 (N, 112, 112, 3) BGR crops into `faces` (the recognizer's graph
        converts them; a graph that normalises itself was given no mean/std by the loader)."""
        rec = self.recognizer
        if rec is None:
            return
        # A crowd has more crops than the queue holds: submit a model run's worth at a time,
        # so one image never needs the whole queue at once (all or nothing would refuse it).
        chunk = min(rec.batcher.max_batch, rec.batcher.max_queue)
        results = []
        for start in range(0, len(crops), chunk):
            results += await rec.batcher.submit_many(list(crops[start : start + chunk]), source)
        raw = np.stack([rec.ordered(r)[0].reshape(-1) for r in results])
        vecs, norms = embed.normalize(raw)
        for face, vec, norm in zip(faces, vecs, norms, strict=True):
            face.vec = vec
            face.norm = float(norm)


async def _all_or_none(jobs: Sequence[Awaitable[T]]) -> list[T]:
    """Results in order; the first failure (a full queue) cancels the other jobs and waits for
    them, so the caller that then releases the images' pixels knows nothing still uses them
    (plain gather would leave the siblings running)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclasses.dataclass(frozen=True)
class _Clipped:
    width: float
    height: float

    def size_ok(self, min_size: float) -> bool:
        return min_size <= 0 or max(self.width, self.height) >= min_size


def _to_original(d: Detection, image: Decoded) -> Detection:
    if image.scale_x == image.scale_y == 1.0:
        return d
    sx, sy = image.scale_x, image.scale_y
    x1, y1, x2, y2 = d.bbox
    landmarks = None
    if d.landmarks is not None:
        landmarks = (d.landmarks / np.array([sx, sy], np.float32)).astype(np.float32)
    return Detection((x1 / sx, y1 / sy, x2 / sx, y2 / sy), d.score, landmarks)


def _clip(d: Detection, w: float, h: float) -> _Clipped:
    x1, y1 = max(d.bbox[0], 0.0), max(d.bbox[1], 0.0)
    x2, y2 = min(d.bbox[2], float(w)), min(d.bbox[3], float(h))
    return _Clipped(max(x2 - x1, 0.0), max(y2 - y1, 0.0))


def _crops(img: ImageArray, detections: list[Detection]) -> ImageArray:
    """(N, 112, 112, 3) crops: aligned on landmarks in one call, the box for faces without."""
    landmarks = [d.landmarks for d in detections if d.landmarks is not None]
    if len(landmarks) == len(detections):
        points = np.stack(landmarks) if landmarks else np.empty((0, 5, 2), np.float32)
        return align.align_faces(img, points)
    # A detector without landmark outputs gives none for any face.
    return np.stack([_center_crop(img, d) for d in detections])


def _resize_crop(img: ImageArray) -> ImageArray:
    import cv2

    return np.asarray(cv2.resize(img, (align.CROP_SIZE, align.CROP_SIZE)), np.uint8)


def _center_crop(img: ImageArray, d: Detection) -> ImageArray:
    """Crop for detectors without landmarks: the box, squared, resized to 112x112."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (round(v) for v in d.bbox)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if x2 <= x1 or y2 <= y1:
        return np.zeros((align.CROP_SIZE, align.CROP_SIZE, 3), np.uint8)
    return _resize_crop(img[y1:y2, x1:x2])
