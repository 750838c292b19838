"""Face tracking: association, recognition schedule and identity smoothing, on hand-made
boxes and on the real clip through the real pipeline."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.commands.local_pipeline import open_pipeline
from appliance.gallery import Gallery
from appliance.gallery.enrol import enrolment_face
from appliance.gallery.live import LiveFace, LiveIdentifier
from appliance.pipeline.tracking import FaceTracker, TrackerConfig, iou_matrix
from tests.gallery_fixtures import PHOTOS, needs_shared, real_settings


def box(x: float, y: float, size: float = 50.0) -> tuple[float, float, float, float]:
    return (x, y, x + size, y + size)


def test_iou_matrix_by_hand() -> None:
    got = iou_matrix([box(0, 0, 10)], [box(0, 0, 10), box(5, 0, 10), box(20, 20, 10)])
    # Half-overlapping squares: 50 / (100 + 100 - 50) = 1/3.
    assert got[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_tracker_config_comes_from_settings() -> None:
    from appliance.config import load_settings

    cfg = TrackerConfig.from_settings(
        load_settings(env={"TRACK_RECOGNIZE_EVERY": "7", "TRACK_MIN_IOU": "0.5"})
    )
    assert (cfg.recognize_every, cfg.min_iou, cfg.max_age) == (7, 0.5, 10)


def test_two_moving_faces_keep_their_ids_and_a_short_gap_is_bridged() -> None:
    tracker = FaceTracker(TrackerConfig(max_age=5))
    ids: list[list[int]] = []
    for frame in range(30):
        boxes = [box(10 + 4 * frame, 100), box(400 - 4 * frame, 300)]
        if 10 <= frame < 13:
            boxes = boxes[1:]  # the first face is missed for three frames
        ids.append([t.track_id for t in tracker.update(boxes)])
    assert ids[0] == [1, 2]
    assert all(i == [2] for i in ids[10:13])
    # It moved 16 px while unseen: the velocity prediction still finds it.
    assert all(i == [1, 2] for i in ids[13:])


def test_a_face_gone_longer_than_max_age_comes_back_as_a_new_track() -> None:
    tracker = FaceTracker(TrackerConfig(max_age=3))
    assert tracker.update([box(0, 0)])[0].track_id == 1
    for _ in range(5):
        tracker.update([])
    assert tracker.update([box(0, 0)])[0].track_id == 2
    assert tracker.active_tracks == 1


def test_recognition_when_new_every_n_frames_and_on_a_larger_view() -> None:
    tracker = FaceTracker(TrackerConfig(recognize_every=10, better_view=1.3))
    schedule = [tracker.update([box(100, 100, 50)])[0].recognize for _ in range(25)]
    assert [i for i, r in enumerate(schedule) if r] == [0, 10, 20]
    # The face grows past 1.3x its size at the last recognition: recognise at once.
    grown = tracker.update([box(95, 95, 70)])[0]
    assert grown.recognize
    assert (tracker.faces_seen, tracker.recognitions) == (26, 4)


def test_identity_is_voted_and_does_not_flicker() -> None:
    tracker = FaceTracker(TrackerConfig(smoothing=5))
    (t,) = tracker.update([box(0, 0)])
    for identity, sim in [("ada", 0.7), ("ada", 0.6), (None, 0.3), ("ada", 0.65)]:
        tracker.record(t.track_id, identity, sim)
        assert tracker.identity(t.track_id)[0] == "ada"
    assert tracker.identity(t.track_id)[1] == pytest.approx(0.65)
    # Unknown must win the vote, not just one recognition, to take the name away.
    tracker.record(t.track_id, None, 0.2)
    assert tracker.identity(t.track_id)[0] == "ada"
    tracker.record(t.track_id, None, 0.2)
    tracker.record(t.track_id, None, 0.2)
    assert tracker.identity(t.track_id)[0] is None


def test_another_face_in_the_same_box_restarts_the_identity() -> None:
    tracker = FaceTracker(TrackerConfig(same_face_min_similarity=0.3))
    (t,) = tracker.update([box(0, 0)])
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    for _ in range(3):
        tracker.record(t.track_id, "ada", 0.8, a)
    tracker.record(t.track_id, None, 0.1, b)  # a scene cut: orthogonal embedding
    assert tracker.identity(t.track_id) == (None, pytest.approx(0.1))
    assert tracker.identity_resets == 1


async def _run_clip(tmp: Path) -> tuple[list[list[LiveFace]], FaceTracker]:
    # The clip is 640x360: a 640x384 detector input keeps every pixel at half the work.
    settings = real_settings(tmp, max_size=(640, 384))
    frames: list[list[LiveFace]] = []
    async with open_pipeline(settings) as pipe:
        gallery = Gallery(tmp / "g.db", pipe.recognizer)
        enrol = [(d.name, p) for d in (PHOTOS / "gallery").iterdir() for p in d.iterdir()]
        # The clip's main face: enrolled from the probe photo for this test only.
        enrol.append(("lin_manuel_miranda", PHOTOS / "probe" / "lin-manuel-miranda.png"))
        for subject, path in enrol:
            face = await enrolment_face(pipe.analyzer, cv2.imread(str(path)), 0.5)
            assert face is not None
            gallery.add_faces(subject, [face], create=True)
        tracker = FaceTracker(TrackerConfig())
        with ThreadPoolExecutor(1) as pool:
            live = LiveIdentifier(pipe.analyzer, gallery, tracker, pool, 0.5)
            cap = cv2.VideoCapture(str(PHOTOS / "short_hamilton_clip.mp4"))
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                frames.append(await live.process(frame))
            cap.release()
    return frames, tracker


@needs_shared
@pytest.mark.slow
def test_clip_gives_stable_tracks_and_few_recognitions(tmp_path: Path) -> None:
    frames, tracker = asyncio.run(_run_clip(tmp_path))
    assert len(frames) == 275
    faces = sum(len(f) for f in frames)
    assert tracker.faces_seen == faces > 400
    recognized = sum(face.recognized for f in frames for face in f)
    assert tracker.recognitions == recognized
    # Recognise on appearance and every 15 frames, not on every face.
    assert recognized < faces / 5

    spans: dict[int, list[int]] = defaultdict(list)
    names: dict[int, list[str | None]] = defaultdict(list)
    for i, faces_in_frame in enumerate(frames):
        ids = [f.track_id for f in faces_in_frame]
        assert len(ids) == len(set(ids)), "one track per face in a frame"
        for f in faces_in_frame:
            spans[f.track_id].append(i)
            names[f.track_id].append(f.identity)
    # Few tracks for many faces: ids persist instead of being re-issued every frame.
    assert len(spans) < faces / 20
    main = max(spans, key=lambda t: len(spans[t]))
    assert len(spans[main]) > 150
    # Lin-Manuel Miranda is the clip's main face; his name holds for most of his track and
    # changes at most a few times (a name, then unknown after the scene cut takes the box).
    votes = Counter(names[main])
    assert votes.most_common(1)[0][0] == "lin_manuel_miranda"
    changes = sum(a != b for a, b in zip(names[main], names[main][1:], strict=False))
    assert changes <= 3
    # Nobody else in the clip is in the gallery: no other track gets a name.
    others = {n for t, ns in names.items() if t != main for n in ns}
    assert others == {None}
