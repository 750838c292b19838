"""Gallery storage: persistence, deletion for good, typed errors, concurrency, recognizers."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from appliance.gallery import (
    BulkSubject,
    ExternalIdExists,
    FaceNotFound,
    Gallery,
    InvalidEmbedding,
    InvalidSubject,
    NewFace,
    Recognizer,
    RecognizerMismatch,
    SubjectExists,
    SubjectNotFound,
)
from appliance.gallery.thresholds import FALLBACK_THRESHOLD

REC = Recognizer("mobilefacenet_128", "a" * 64)
OTHER = Recognizer("glintr100", "b" * 64)
DIM = 128


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:  # type: ignore[type-arg]
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def files_bytes(db: Path) -> bytes:
    """The database and any WAL/shared-memory file beside it, as they are on disk."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_faces_and_subjects_survive_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vecs = unit(rng, 3)
    g = Gallery(tmp_path / "g.db", REC)
    g.create_subject("ada", {"team": "blue"}, external_id="emp-1")
    ids = g.add_faces("ada", [NewFace(v) for v in vecs])
    g.close()

    g = Gallery(tmp_path / "g.db", REC)
    subject = g.get_subject("ada")
    assert (subject.metadata, subject.external_id, subject.face_count) == (
        {"team": "blue"},
        "emp-1",
        3,
    )
    result = g.identify(vecs[1])[0]
    assert result.identity == "ada"
    assert result.matches[0].face_id == ids[1]
    assert result.matches[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_start_up_reads_faces_in_blocks_and_keeps_every_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.gallery import store

    monkeypatch.setattr(store, "LOAD_BLOCK", 4)  # 11 faces: blocks of 4, 4 and 3
    rng = np.random.default_rng(11)
    vecs = unit(rng, 11)
    g = Gallery(tmp_path / "g.db", REC)
    ids = [g.add_faces(f"s{i % 3}", [NewFace(v)], create=i < 3)[0] for i, v in enumerate(vecs)]
    g.delete_face(ids[5])
    g.close()

    g = Gallery(tmp_path / "g.db", REC)
    for i, v in enumerate(vecs):
        best = g.identify(v, top_k=3)[0].matches
        if i == 5:
            assert ids[5] not in [m.face_id for m in best]
        else:
            assert (best[0].subject, best[0].face_id) == (f"s{i % 3}", ids[i])
    assert [len(g.subject_faces(f"s{j}")) for j in range(3)] == [4, 4, 2]


def test_delete_subject_is_gone_from_search_at_once_and_from_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    keep, gone = unit(rng), unit(rng, 2)
    db = tmp_path / "g.db"
    g = Gallery(db, REC, threshold=0.5)
    g.add_faces("keep", [NewFace(keep[0])], create=True)
    g.add_faces("gone", [NewFace(v) for v in gone], create=True)
    blob = gone[0].astype("<f4").tobytes()
    assert blob in files_bytes(db)

    assert g.delete_subject("gone") == 2
    result = g.identify(gone[0], top_k=5)[0]
    assert result.identity is None
    assert [m.subject for m in result.matches] == ["keep"]
    with pytest.raises(SubjectNotFound):
        g.get_subject("gone")
    # secure_delete zeroes the freed pages; the checkpoint leaves no copy in the WAL file.
    assert blob not in files_bytes(db)
    assert gone[1].astype("<f4").tobytes() not in files_bytes(db)
    g.close()

    g = Gallery(db, REC, threshold=0.5)
    assert g.identify(gone[1])[0].identity is None
    assert g.counts() == (1, 1)
    assert blob not in files_bytes(db)


def test_delete_face_keeps_the_subjects_other_faces(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vecs = unit(rng, 2)
    g = Gallery(tmp_path / "g.db", REC)
    first, second = g.add_faces("ada", [NewFace(v) for v in vecs], create=True)
    g.delete_face(first)
    assert g.identify(vecs[0], threshold=0.99)[0].identity is None
    assert g.identify(vecs[1])[0].matches[0].face_id == second
    assert vecs[0].astype("<f4").tobytes() not in files_bytes(tmp_path / "g.db")
    with pytest.raises(FaceNotFound):
        g.delete_face(first)
    # Ids outside SQLite's rowid range name no face (schemathesis sent 2**63 as a path id).
    for bad in (0, -1, 2**63, 10**30):
        with pytest.raises(FaceNotFound):
            g.delete_face(bad)
    # Ids are never reused: a stale id cannot hit a later face.
    (third,) = g.add_faces("ada", [NewFace(vecs[0])])
    assert third > second


def test_typed_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    g = Gallery(tmp_path / "g.db", REC)
    g.create_subject("ada", external_id="x1")
    with pytest.raises(SubjectExists):
        g.create_subject("ada")
    with pytest.raises(ExternalIdExists):
        g.create_subject("bob", external_id="x1")
    with pytest.raises(SubjectNotFound):
        g.add_faces("nobody", [NewFace(unit(rng)[0])])
    with pytest.raises(SubjectNotFound):
        g.delete_subject("nobody")
    with pytest.raises(InvalidSubject):
        g.create_subject("  ")
    g.add_faces("ada", [NewFace(unit(rng)[0])])
    with pytest.raises(InvalidEmbedding):
        g.add_faces("ada", [NewFace(np.ones(512, np.float32))])
    with pytest.raises(InvalidEmbedding):
        g.identify(np.zeros(DIM, np.float32))
    with pytest.raises(InvalidEmbedding):
        g.identify(np.full(DIM, np.nan, np.float32))
    # Faces of one call with different lengths (schemathesis sent these to /gallery/bulk).
    with pytest.raises(InvalidEmbedding):
        g.add_faces("ada", [NewFace(unit(rng)[0]), NewFace(np.ones(3, np.float32))])


def test_update_subject_metadata_and_external_id(tmp_path: Path) -> None:
    g = Gallery(tmp_path / "g.db", REC)
    g.create_subject("ada", {"a": 1})
    s = g.update_subject("ada", {"a": 2}, "emp-9", set_external_id=True)
    assert (s.metadata, s.external_id) == ({"a": 2}, "emp-9")
    assert g.update_subject("ada", set_external_id=True).external_id is None


def test_a_gallery_of_another_recognizer_is_refused(tmp_path: Path) -> None:
    g = Gallery(tmp_path / "g.db", REC)
    g.add_faces("ada", [NewFace(unit(np.random.default_rng(5))[0])], create=True)
    g.close()
    with pytest.raises(RecognizerMismatch, match="mobilefacenet_128"):
        Gallery(tmp_path / "g.db", OTHER)
    # An empty gallery simply adopts the new recognizer.
    Gallery(tmp_path / "empty.db", REC).close()
    Gallery(tmp_path / "empty.db", OTHER).close()


def test_threshold_defaults_per_recognizer(tmp_path: Path) -> None:
    assert Gallery(tmp_path / "a.db", REC).threshold == 0.4
    assert Gallery(tmp_path / "b.db", Recognizer("my_model", "c" * 64)).threshold == (
        FALLBACK_THRESHOLD
    )
    assert Gallery(tmp_path / "c.db", REC, threshold=0.55).threshold == 0.55


def test_crops_are_kept_only_when_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    off = Gallery(tmp_path / "off.db", REC)
    (fid,) = off.add_faces("ada", [NewFace(unit(rng)[0], b"\xff\xd8jpeg")], create=True)
    assert off.face_crop(fid) is None
    assert b"\xff\xd8jpeg" not in files_bytes(tmp_path / "off.db")
    on = Gallery(tmp_path / "on.db", REC, keep_crops=True)
    (fid,) = on.add_faces("ada", [NewFace(unit(rng)[0], b"\xff\xd8jpeg")], create=True)
    assert on.face_crop(fid) == b"\xff\xd8jpeg"


def test_top_k_gives_distinct_subjects_best_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    g = Gallery(tmp_path / "g.db", REC)
    base = unit(rng)[0]
    # Ten faces of "near" all closer to the query than anyone else: top_k must skip them.
    near = [base + 0.05 * unit(rng)[0] for _ in range(10)]
    g.add_faces("near", [NewFace(v) for v in near], create=True)
    for i, scale in enumerate((0.5, 0.8, 1.2)):
        g.add_faces(f"s{i}", [NewFace(base + scale * unit(rng)[0])], create=True)
    result = g.identify(base, top_k=4)[0]
    assert [m.subject for m in result.matches] == ["near", "s0", "s1", "s2"]


def test_bulk_enrolment_is_all_or_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    g = Gallery(tmp_path / "g.db", REC)
    ids = g.enrol_bulk(
        [
            BulkSubject("a", (NewFace(unit(rng)[0]),), {"k": 1}, "ext-a"),
            BulkSubject("b", (NewFace(unit(rng)[0]), NewFace(unit(rng)[0])), None, "ext-b"),
        ]
    )
    assert [len(i) for i in ids] == [1, 2]
    with pytest.raises(ExternalIdExists):
        g.enrol_bulk(
            [
                BulkSubject("c", (NewFace(unit(rng)[0]),), None, "ext-c"),
                BulkSubject("d", (NewFace(unit(rng)[0]),), None, "ext-a"),
            ]
        )
    assert g.counts() == (2, 3)
    assert g.identify(unit(rng)[0], top_k=10)[0].matches[0].subject in {"a", "b"}


def test_concurrent_enrolment_and_search_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    g = Gallery(db, REC)
    writers, per_writer = 4, 25
    errors: list[BaseException] = []
    acknowledged: dict[int, np.ndarray] = {}  # type: ignore[type-arg]
    ack_lock = threading.Lock()
    stop = threading.Event()

    def write(w: int) -> None:
        rng = np.random.default_rng(100 + w)
        try:
            for i in range(per_writer):
                v = unit(rng)[0]
                (fid,) = g.add_faces(f"w{w}-{i}", [NewFace(v)], create=True)
                with ack_lock:
                    acknowledged[fid] = v
        except BaseException as exc:
            errors.append(exc)

    def search() -> None:
        rng = np.random.default_rng(0)
        try:
            while not stop.is_set():
                g.identify(unit(rng, 4), top_k=3)
        except BaseException as exc:
            errors.append(exc)

    searchers = [threading.Thread(target=search) for _ in range(2)]
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in searchers + threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in searchers:
        t.join()
    assert errors == []
    assert g.counts() == (writers * per_writer, writers * per_writer)
    for fid, v in acknowledged.items():
        assert g.identify(v)[0].matches[0].face_id == fid
    g.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM faces").fetchone()[0] == writers * per_writer


def test_gallery_settings_are_read_and_validated() -> None:
    from appliance.config import ConfigError, load_settings

    s = load_settings(
        env={
            "GALLERY_DB": "/data/g.db",
            "IDENTIFY_THRESHOLD": "0.45",
            "GALLERY_KEEP_CROPS": "1",
            "GALLERY_ANN_MIN_FACES": "0",
            "TRACK_RECOGNIZE_EVERY": "30",
        }
    )
    assert (s.gallery_db, s.identify_threshold, s.gallery_keep_crops) == (
        Path("/data/g.db"),
        0.45,
        True,
    )
    assert (s.gallery_ann_min_faces, s.track_recognize_every) == (0, 30)
    assert load_settings(env={}).identify_threshold is None
    for env in (
        {"IDENTIFY_THRESHOLD": "1.5"},
        {"GALLERY_ANN_MIN_FACES": "-1"},
        {"TRACK_MIN_IOU": "0"},
        {"TRACK_BETTER_VIEW": "1"},
        {"TRACK_SMOOTHING": "0"},
    ):
        with pytest.raises(ConfigError, match=next(iter(env))):
            load_settings(env=env)


def test_approximate_index_adds_removes_and_ranks_like_exact() -> None:
    from appliance.gallery.index import ApproximateIndex, ExactIndex

    rng = np.random.default_rng(9)
    data = unit(rng, 2000)
    ids = np.arange(10, 2010, dtype=np.int64)
    approx, exact = ApproximateIndex(DIM, rerank=50), ExactIndex(DIM)
    for index in (approx, exact):
        index.add(ids, data)
        index.remove(ids[100:200])
    assert len(approx) == len(exact) == 1900
    noisy = data[[5, 300, 1999]] + 0.05 * unit(rng, 3)
    queries = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    sa, ia = approx.search(queries, 3)
    se, ie = exact.search(queries, 3)
    assert ia[:, 0].tolist() == ie[:, 0].tolist() == [15, 310, 2009]
    np.testing.assert_allclose(sa[:, 0], se[:, 0], atol=2e-3)  # float16 re-rank vectors
    # A removed face is never returned, even for its own vector.
    _, gone = approx.search(data[150][None], 5)
    assert 160 not in gone[0].tolist()
