"""Face tracking on one stream: associate faces across frames, decide which tracks need the
recognizer, and smooth each track's identity over its recent recognitions.

Association is greedy highest-IoU-first between each track's predicted box (last box moved
by its smoothed velocity) and the frame's detections. Why not a library: norfair pins
numpy < 2 (this project runs numpy 2) and supervision's ByteTrack brings matplotlib, Pillow
and SciPy onto the Jetson; and why greedy rather than the Hungarian method: faces in one
frame rarely overlap, so the highest-IoU pairs are the optimal assignment in practice, with
no SciPy dependency. Boxes only: the recognizer does not run on every frame, so embeddings
are not there to associate with (docs/GALLERY.md).

Per-stream object, used from one task at a time; it holds no locks.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from appliance.config import Settings

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    recognize_every: int = 15  # frames between recognitions of one track
    max_age: int = 10  # frames a track lives on without a detection
    min_iou: float = 0.3  # least overlap with the predicted box that continues a track
    better_view: float = 1.3  # recognise again when the face grew this much
    smoothing: int = 5  # recognitions the identity is voted over
    # Below this cosine between a track's consecutive recognitions the box was taken over by
    # another face (a scene cut, two people crossing): the identity history starts again.
    same_face_min_similarity: float = 0.3

    @classmethod
    def from_settings(cls, settings: Settings) -> TrackerConfig:
        return cls(
            recognize_every=settings.track_recognize_every,
            max_age=settings.track_max_age,
            min_iou=settings.track_min_iou,
            better_view=settings.track_better_view,
            smoothing=settings.track_smoothing,
        )


@dataclasses.dataclass(frozen=True)
class TrackedFace:
    index: int  # position of the face in the frame's input list
    track_id: int
    recognize: bool  # run the recognizer on this face now
    identity: str | None  # the track's smoothed identity so far
    similarity: float | None


@dataclasses.dataclass
class _Track:
    track_id: int
    box: Box
    last_seen: int
    velocity: tuple[float, float] = (0.0, 0.0)
    last_recognized: int | None = None
    recognized_size: float = 0.0
    votes: deque[tuple[str | None, float]] = dataclasses.field(default_factory=deque)
    embedding: npt.NDArray[np.float32] | None = None

    def predicted(self, frame: int) -> Box:
        dt = frame - self.last_seen
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        x1, y1, x2, y2 = self.box
        return (x1 + dx, y1 + dy, x2 + dx, y2 + dy)


def _size(box: Box) -> float:
    return max(box[2] - box[0], box[3] - box[1])


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> npt.NDArray[np.float64]:
    """(len(a), len(b)) intersection over union of boxes (x1, y1, x2, y2)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    A, B = np.asarray(a, np.float64)[:, None, :], np.asarray(b, np.float64)[None, :, :]
    w = np.clip(np.minimum(A[..., 2], B[..., 2]) - np.maximum(A[..., 0], B[..., 0]), 0, None)
    h = np.clip(np.minimum(A[..., 3], B[..., 3]) - np.maximum(A[..., 1], B[..., 1]), 0, None)
    inter = w * h
    area_a = (A[..., 2] - A[..., 0]) * (A[..., 3] - A[..., 1])
    area_b = (B[..., 2] - B[..., 0]) * (B[..., 3] - B[..., 1])
    union = area_a + area_b - inter
    return np.asarray(np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0), np.float64)


class FaceTracker:
    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._tracks: dict[int, _Track] = {}
        self._next_id = 1
        self._frame = -1
        self.faces_seen = 0
        self.recognitions = 0
        self.identity_resets = 0

    @property
    def active_tracks(self) -> int:
        return len(self._tracks)

    def update(self, boxes: Sequence[Box]) -> list[TrackedFace]:
        """Advance one frame with its detected face boxes; one TrackedFace per box, in order."""
        self._frame += 1
        frame, cfg = self._frame, self.config
        self.faces_seen += len(boxes)
        tracks = list(self._tracks.values())
        ious = iou_matrix([t.predicted(frame) for t in tracks], list(boxes))
        assigned: dict[int, _Track] = {}
        used: set[int] = set()
        # Highest overlap first; each track and each detection used once.
        for flat in np.argsort(-ious, axis=None, kind="stable"):
            ti, di = divmod(int(flat), max(len(boxes), 1))
            if ious[ti, di] < cfg.min_iou:
                break
            if ti in used or di in assigned:
                continue
            used.add(ti)
            assigned[di] = tracks[ti]
        out: list[TrackedFace] = []
        for di, box in enumerate(boxes):
            track = assigned.get(di)
            if track is None:
                track = _Track(self._next_id, box, frame)
                self._tracks[track.track_id] = track
                self._next_id += 1
            else:
                self._move(track, box, frame)
            recognize = self._needs_recognition(track, box, frame)
            if recognize:
                track.last_recognized = frame
                track.recognized_size = _size(box)
                self.recognitions += 1
            identity, similarity = self._vote(track)
            out.append(TrackedFace(di, track.track_id, recognize, identity, similarity))
        for tid in [t.track_id for t in tracks if frame - t.last_seen > cfg.max_age]:
            del self._tracks[tid]
        return out

    def _move(self, track: _Track, box: Box, frame: int) -> None:
        dt = max(frame - track.last_seen, 1)
        cx = ((box[0] + box[2]) - (track.box[0] + track.box[2])) / 2 / dt
        cy = ((box[1] + box[3]) - (track.box[1] + track.box[3])) / 2 / dt
        # Exponential smoothing: one jittery detection must not throw the prediction off.
        vx, vy = track.velocity
        track.velocity = (0.5 * vx + 0.5 * cx, 0.5 * vy + 0.5 * cy)
        track.box, track.last_seen = box, frame

    def _needs_recognition(self, track: _Track, box: Box, frame: int) -> bool:
        if track.last_recognized is None:
            return True
        if frame - track.last_recognized >= self.config.recognize_every:
            return True
        return _size(box) >= track.recognized_size * self.config.better_view

    def record(
        self,
        track_id: int,
        identity: str | None,
        similarity: float | None,
        embedding: npt.NDArray[np.float32] | None = None,
    ) -> None:
        """The recognizer's answer (and the unit embedding) for a face that update() marked
        `recognize`."""
        track = self._tracks.get(track_id)
        if track is None:
            return
        if embedding is not None:
            previous, track.embedding = track.embedding, embedding
            if (
                previous is not None
                and float(previous @ embedding) < self.config.same_face_min_similarity
            ):
                track.votes.clear()
                self.identity_resets += 1
        track.votes.append((identity, similarity if similarity is not None else 0.0))
        while len(track.votes) > self.config.smoothing:
            track.votes.popleft()

    def identity(self, track_id: int) -> tuple[str | None, float | None]:
        track = self._tracks.get(track_id)
        return self._vote(track) if track is not None else (None, None)

    @staticmethod
    def _vote(track: _Track) -> tuple[str | None, float | None]:
        """Majority over the recent recognitions ("unknown" is a candidate too); a tie goes
        to the label seen most recently. Similarity: the mean of the winner's votes."""
        if not track.votes:
            return None, None
        counts = Counter(label for label, _ in track.votes)
        best = max(counts.values())
        for label, _ in reversed(track.votes):
            if counts[label] == best:
                sims = [s for lab, s in track.votes if lab == label]
                return label, float(np.mean(sims))
        raise AssertionError("unreachable: a vote won")  # pragma: no cover
