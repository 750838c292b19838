"""Identification and verification with the real models on the real photos (DATA.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.gallery import Gallery, NewFace
from tests.gallery_fixtures import RealFaces, iou, needs_shared, real_faces, reference

pytestmark = needs_shared
__all__ = ["real_faces"]

# DATA.md: who is in each probe, in reference.json's face order; None = not in the gallery.
EXPECTED = {
    "probe/obama1.jpg": ["obama"],
    "probe/alex_lacamoire1.jpg": ["alex_lacamoire"],
    "probe/two_people.jpg": ["biden", "obama"],
    "probe/obama_and_biden.jpg": ["obama", "biden", None],
    "probe/lin-manuel-miranda.png": [None],
}


def enrolled(tmp_path: Path, real_faces: RealFaces, **kwargs: object) -> Gallery:
    gallery = Gallery(tmp_path / "g.db", real_faces.recognizer, **kwargs)  # type: ignore[arg-type]
    for subject, vecs in real_faces.gallery().items():
        gallery.create_subject(subject, {"source": "DATA.md"})
        gallery.add_faces(subject, [NewFace(v) for v in vecs])
    return gallery


def probe_faces(real_faces: RealFaces, probe: str) -> list[tuple[dict[str, object], object]]:
    """Each reference face of the probe paired with our embedding of the same face (IoU)."""
    ours = real_faces.faces[probe]
    pairs = []
    for ref in reference()["identities"][f"photos/{probe}"]:
        best = max(ours, key=lambda f: iou(f.bbox, tuple(ref["bbox"])))
        assert iou(best.bbox, tuple(ref["bbox"])) > 0.9, f"{probe}: reference face not detected"
        pairs.append((ref, best.vec))
    return pairs


def test_gallery_enrolment_holds_every_photo(tmp_path: Path, real_faces: RealFaces) -> None:
    gallery = enrolled(tmp_path, real_faces)
    assert gallery.counts() == (3, 5)
    assert gallery.dim == 128
    assert {s.name: s.face_count for s in gallery.list_subjects()} == {
        "alex_lacamoire": 1,
        "biden": 2,
        "obama": 2,
    }


@pytest.mark.parametrize("probe", sorted(EXPECTED))
def test_probe_faces_are_identified_and_strangers_are_none(
    tmp_path: Path, real_faces: RealFaces, probe: str
) -> None:
    gallery = enrolled(tmp_path, real_faces)
    pairs = probe_faces(real_faces, probe)
    results = gallery.identify([vec for _, vec in pairs], top_k=3)  # type: ignore[misc]
    assert [r.identity for r in results] == EXPECTED[probe]
    for (ref, _), result in zip(pairs, results, strict=True):
        expected = ref["best_similarity_per_identity"]
        assert isinstance(expected, dict)
        got = {m.subject: m.similarity for m in result.matches}
        assert set(got) == set(expected), "top_k=3 returns every subject once"
        for subject, sim in expected.items():
            assert got[subject] == pytest.approx(sim, abs=0.01), (probe, subject)
        sims = [m.similarity for m in result.matches]
        assert sims == sorted(sims, reverse=True)


def test_identity_needs_the_threshold(tmp_path: Path, real_faces: RealFaces) -> None:
    gallery = enrolled(tmp_path, real_faces)
    ((_, obama),) = probe_faces(real_faces, "probe/obama1.jpg")
    assert gallery.identify([obama])[0].identity == "obama"  # type: ignore[list-item]
    # Reference: obama1 scores 0.804 against obama; a stricter operator threshold refuses it.
    strict = gallery.identify([obama], threshold=0.9)[0]  # type: ignore[list-item]
    assert strict.identity is None
    assert strict.matches[0].subject == "obama"


def test_verify_answers_match_and_no_match(tmp_path: Path, real_faces: RealFaces) -> None:
    gallery = enrolled(tmp_path, real_faces)
    ((_, obama1),) = probe_faces(real_faces, "probe/obama1.jpg")
    (_, biden_tp), (_, obama_tp) = probe_faces(real_faces, "probe/two_people.jpg")
    ((_, stranger),) = probe_faces(real_faces, "probe/lin-manuel-miranda.png")

    same = gallery.verify(obama1, obama_tp)  # type: ignore[arg-type]
    assert same.match and same.similarity > 0.6
    assert not gallery.verify(obama1, biden_tp).match  # type: ignore[arg-type]
    assert not gallery.verify(obama1, stranger).match  # type: ignore[arg-type]

    to_subject = gallery.verify_subject(obama1, "obama")  # type: ignore[arg-type]
    assert to_subject.match
    assert to_subject.similarity == pytest.approx(0.804, abs=0.01)
    assert not gallery.verify_subject(obama1, "biden").match  # type: ignore[arg-type]
    assert not gallery.verify_subject(stranger, "alex_lacamoire").match  # type: ignore[arg-type]


def test_approximate_index_gives_the_exact_answers(tmp_path: Path, real_faces: RealFaces) -> None:
    exact = enrolled(tmp_path / "a", real_faces)
    approx = enrolled(tmp_path / "b", real_faces, ann_min_faces=2)
    assert (exact.index_kind, approx.index_kind) == ("exact", "approximate")
    for probe in EXPECTED:
        vecs = [vec for _, vec in probe_faces(real_faces, probe)]
        a = exact.identify(vecs, top_k=3)  # type: ignore[arg-type]
        b = approx.identify(vecs, top_k=3)  # type: ignore[arg-type]
        assert [r.identity for r in a] == [r.identity for r in b]
        for ra, rb in zip(a, b, strict=True):
            assert [m.subject for m in ra.matches] == [m.subject for m in rb.matches]
            # float16 storage in the HNSW index.
            for ma, mb in zip(ra.matches, rb.matches, strict=True):
                assert ma.similarity == pytest.approx(mb.similarity, abs=2e-3)
