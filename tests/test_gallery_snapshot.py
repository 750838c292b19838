"""Snapshots: export -> import gives the same answers; other recognizers and corrupt files are
refused with typed errors; merging twice changes nothing."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from appliance.gallery import (
    Gallery,
    NewFace,
    Recognizer,
    RecognizerMismatch,
    SnapshotInvalid,
    snapshot,
)
from tests.gallery_fixtures import RealFaces, needs_shared, real_faces

__all__ = ["real_faces"]


def enrol(gallery: Gallery, real: RealFaces) -> None:
    for subject, vecs in real.gallery().items():
        gallery.create_subject(subject, {"enrolled_from": subject}, external_id=f"ext-{subject}")
        gallery.add_faces(subject, [NewFace(v) for v in vecs])


def probes(real: RealFaces) -> list[np.ndarray]:  # type: ignore[type-arg]
    return [
        f.vec
        for key, faces in sorted(real.faces.items())
        if key.startswith("probe/")
        for f in faces
    ]


@needs_shared
@pytest.mark.parametrize("mode", ["replace", "merge"])
def test_export_then_import_into_a_fresh_gallery_gives_the_same_answers(
    tmp_path: Path, real_faces: RealFaces, mode: snapshot.ImportMode
) -> None:
    source = Gallery(tmp_path / "a.db", real_faces.recognizer)
    enrol(source, real_faces)
    path = tmp_path / "gallery.snapshot"
    checksum = snapshot.export_file(source, path)
    assert checksum.startswith("sha256:")

    target = Gallery(tmp_path / "b.db", real_faces.recognizer)
    result = snapshot.import_snapshot(target, snapshot.read(path), mode)
    assert (result.subjects_added, result.faces_added) == (3, 5)
    assert target.counts() == source.counts()
    assert target.get_subject("obama").metadata == {"enrolled_from": "obama"}
    assert target.get_subject("biden").external_id == "ext-biden"
    queries = probes(real_faces)
    for a, b in zip(
        source.identify(queries, top_k=3), target.identify(queries, top_k=3), strict=True
    ):
        assert a.identity == b.identity
        assert [(m.subject, round(m.similarity, 6)) for m in a.matches] == [
            (m.subject, round(m.similarity, 6)) for m in b.matches
        ]
        if mode == "replace":
            assert [m.face_id for m in a.matches] == [m.face_id for m in b.matches]


@needs_shared
def test_merge_twice_changes_nothing_and_replace_drops_what_the_snapshot_lacks(
    tmp_path: Path, real_faces: RealFaces
) -> None:
    source = Gallery(tmp_path / "a.db", real_faces.recognizer)
    enrol(source, real_faces)
    snap = snapshot.read(snapshot.export_bytes(source))
    target = Gallery(tmp_path / "b.db", real_faces.recognizer)
    target.add_faces("local_only", [NewFace(probes(real_faces)[0])], create=True)
    snapshot.import_snapshot(target, snap, "merge")
    again = snapshot.import_snapshot(target, snap, "merge")
    assert (again.subjects_added, again.faces_added, again.faces_skipped) == (0, 0, 5)
    assert target.counts() == (4, 6)
    snapshot.import_snapshot(target, snap, "replace")
    assert target.counts() == (3, 5)
    assert target.identify(probes(real_faces)[0], top_k=5)[0].matches[0].subject != "local_only"


def test_import_from_another_recognizer_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    made_with = Gallery(tmp_path / "a.db", Recognizer("glintr100", "1" * 64))
    made_with.add_faces("ada", [NewFace(rng.standard_normal(512).astype(np.float32))], create=True)
    data = snapshot.export_bytes(made_with)
    target = Gallery(tmp_path / "b.db", Recognizer("mobilefacenet_128", "2" * 64))
    with pytest.raises(RecognizerMismatch, match="glintr100"):
        snapshot.import_snapshot(target, snapshot.read(data), "replace")
    assert target.counts() == (0, 0)


def test_a_snapshot_that_fails_its_checksum_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    g = Gallery(tmp_path / "a.db", Recognizer("m", "3" * 64))
    g.add_faces("ada", [NewFace(rng.standard_normal(64).astype(np.float32))], create=True)
    data = snapshot.export_bytes(g)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        manifest, emb = zf.read("manifest.json"), bytearray(zf.read("embeddings.f32"))
    emb[5] ^= 0x01  # one flipped bit in one vector
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.json", manifest)
        zf.writestr("embeddings.f32", bytes(emb))
    with pytest.raises(SnapshotInvalid, match="checksum"):
        snapshot.read(buf.getvalue())
    with pytest.raises(SnapshotInvalid, match="not a gallery snapshot"):
        snapshot.read(b"not a zip file")


def test_a_well_checksummed_but_malformed_snapshot_is_refused() -> None:
    import json

    manifest = {
        "format": snapshot.FORMAT,
        "version": snapshot.VERSION,
        "recognizer": {"name": "m", "sha256": "3" * 64},
        "dim": 4,
        "subjects": [{"metadata": {}}],  # no name
        "faces": [],
    }
    manifest["checksum"] = snapshot._digest(manifest, b"")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        zf.writestr("embeddings.f32", b"")
    with pytest.raises(SnapshotInvalid, match="malformed"):
        snapshot.read(buf.getvalue())
