"""`Gallery`: subjects and their face embeddings, durable in SQLite, searchable in memory.

Thread safety: searches may run from any number of executor threads; writes are serialised
by `_write_lock` (one SQLite writer) and each write commits to the database first, then
updates the index under `_index_lock`, the lock searches hold. A search therefore sees a
write either completely or not at all, and never a face the database does not have.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from appliance.gallery.errors import InvalidEmbedding, RecognizerMismatch
from appliance.gallery.index import ApproximateIndex, ExactIndex, IntArray, VectorIndex
from appliance.gallery.records import (
    BulkSubject,
    FaceRecord,
    FloatArray,
    Identification,
    Match,
    NewFace,
    Recognizer,
    Subject,
    Verification,
)
from appliance.gallery.store import GalleryStore
from appliance.gallery.thresholds import effective_threshold

log = structlog.get_logger(__name__)

DEFAULT_ANN_MIN_FACES = 150_000


def normalize(
    vectors: FloatArray | Sequence[FloatArray] | Sequence[Sequence[float]] | Sequence[float],
    dim: int | None,
) -> FloatArray:
    """(m, d) unit-length float32 rows; raises InvalidEmbedding for a wrong dimension, a
    non-finite value or a zero vector."""
    try:
        arr = np.asarray(vectors, np.float32)
    except (ValueError, TypeError):  # ragged rows, or values that are not numbers
        raise InvalidEmbedding("embeddings must be vectors of one length") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidEmbedding(f"embeddings must be vectors, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InvalidEmbedding(
            f"embeddings have {arr.shape[1]} dimensions but this gallery's recognizer gives {dim}"
        )
    if not np.isfinite(arr).all():
        raise InvalidEmbedding("embeddings must be finite")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidEmbedding("an embedding is all zeros")
    return np.ascontiguousarray(arr / norms, np.float32)


class Gallery:
    def __init__(
        self,
        path: Path,
        recognizer: Recognizer,
        *,
        threshold: float | None = None,
        ann_min_faces: int = DEFAULT_ANN_MIN_FACES,
        keep_crops: bool = False,
        dim: int | None = None,
    ) -> None:
        self.recognizer = recognizer
        self.threshold = effective_threshold(threshold, recognizer.name)
        self.keep_crops = keep_crops
        self._ann_min_faces = ann_min_faces
        self._write_lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._store = GalleryStore(path)
        try:
            self._bind(recognizer)
            self._dim = dim
            self._index: VectorIndex | None = None
            self._face_subject: dict[int, str] = {}
            self._subject_faces: dict[str, set[int]] = {}
            self._load()
        except BaseException:
            self._store.close()
            raise

    # -- life cycle ---------------------------------------------------------------------

    def _bind(self, recognizer: Recognizer) -> None:
        bound = self._store.recognizer()
        if bound == recognizer:
            return
        if bound is not None and self._store.face_count() > 0:
            raise RecognizerMismatch(
                f"the gallery {self._store.path} holds embeddings of {bound.name} "
                f"(sha256 {bound.sha256[:12]}...), not of {recognizer.name} "
                f"(sha256 {recognizer.sha256[:12]}...): export it with the old model or "
                "start a new GALLERY_DB and re-enrol"
            )
        with self._store.transaction() as db:
            self._store.bind(db, recognizer)

    def _load(self) -> None:
        ids, names, mat = self._store.load_embeddings(spare_rows=1024)
        if len(ids):
            vecs = mat[: len(ids)]
            if self._dim is not None and vecs.shape[1] != self._dim:
                raise RecognizerMismatch(
                    f"stored embeddings have {vecs.shape[1]} dimensions, the recognizer "
                    f"gives {self._dim}"
                )
            self._dim = vecs.shape[1]
            if self._ann_min_faces > 0 and len(ids) >= self._ann_min_faces:
                self._index = ApproximateIndex(self._dim)
                self._index.add(ids, vecs)
            else:
                self._index = ExactIndex.adopt(ids, mat)
        fids = ids.tolist()
        self._face_subject.update(zip(fids, names, strict=True))
        by_subject = self._subject_faces
        for fid, name in zip(fids, names, strict=True):
            faces = by_subject.get(name)
            if faces is None:
                by_subject[name] = {fid}
            else:
                faces.add(fid)
        log.info(
            "gallery_loaded",
            path=str(self._store.path),
            faces=len(ids),
            index=type(self._index).__name__ if self._index else None,
        )

    def _new_index(self, size: int) -> VectorIndex:
        assert self._dim is not None
        if self._ann_min_faces > 0 and size >= self._ann_min_faces:
            return ApproximateIndex(self._dim)
        return ExactIndex(self._dim, capacity=max(1024, size))

    def close(self) -> None:
        with self._write_lock:
            self._store.close()

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def index_kind(self) -> str:
        return "approximate" if isinstance(self._index, ApproximateIndex) else "exact"

    # -- reads --------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(subjects, faces)."""
        return self._store.subject_count(), self._store.face_count()

    def get_subject(self, name: str) -> Subject:
        return self._store.get_subject(name)

    def list_subjects(self, offset: int = 0, limit: int = 100) -> list[Subject]:
        return self._store.list_subjects(offset, limit)

    def subject_faces(self, name: str) -> list[FaceRecord]:
        return self._store.subject_faces(name)

    def face_crop(self, face_id: int) -> bytes | None:
        return self._store.face_crop(face_id)

    def identify(
        self,
        embeddings: FloatArray | Sequence[Sequence[float]],
        top_k: int = 1,
        threshold: float | None = None,
    ) -> list[Identification]:
        """One Identification per query row: up to top_k subjects, best face each, best
        first; `identity` only when the best similarity reaches the threshold."""
        thr = self.threshold if threshold is None else threshold
        queries = normalize(embeddings, self._dim)
        top_k = max(1, top_k)
        with self._index_lock:
            index = self._index
            n = len(index) if index is not None else 0
            if index is None or n == 0:
                return [Identification((), None, thr) for _ in range(len(queries))]
            # Faces, not subjects, are indexed: ask for more faces than subjects wanted and
            # widen until every row has top_k distinct subjects or every face was seen.
            k = min(n, top_k * 4 + 8)
            while True:
                sims, ids = index.search(queries, k)
                rows = [self._per_subject(s, i, top_k) for s, i in zip(sims, ids, strict=True)]
                if k >= n or all(len(r) >= top_k for r in rows):
                    break
                k = min(n, k * 4)
        return [
            Identification(
                matches=tuple(r),
                identity=r[0].subject if r and r[0].similarity >= thr else None,
                threshold=thr,
            )
            for r in rows
        ]

    def _per_subject(self, sims: FloatArray, ids: IntArray, top_k: int) -> list[Match]:
        out: list[Match] = []
        seen: set[str] = set()
        for sim, fid in zip(sims.tolist(), ids.tolist(), strict=True):
            subject = self._face_subject.get(fid)
            if fid < 0 or subject is None or subject in seen:
                continue
            seen.add(subject)
            out.append(Match(subject, float(sim), int(fid)))
            if len(out) == top_k:
                break
        return out

    def verify(
        self,
        a: FloatArray | Sequence[float],
        b: FloatArray | Sequence[float],
        threshold: float | None = None,
    ) -> Verification:
        """1:1: the cosine similarity of two embeddings and whether it reaches the threshold."""
        thr = self.threshold if threshold is None else threshold
        va, vb = normalize(a, self._dim), normalize(b, self._dim)
        sim = float(va[0] @ vb[0])
        return Verification(sim, sim >= thr, thr)

    def verify_subject(
        self, embedding: FloatArray | Sequence[float], subject: str, threshold: float | None = None
    ) -> Verification:
        """1:1 against an enrolled subject: the best similarity over the subject's faces."""
        thr = self.threshold if threshold is None else threshold
        query = normalize(embedding, self._dim)[0]
        self._store.get_subject(subject)  # SubjectNotFound before anything else
        with self._index_lock:
            fids = np.fromiter(self._subject_faces.get(subject, ()), np.int64)
            if self._index is None or len(fids) == 0:
                return Verification(-1.0, False, thr)
            vecs = self._index.vectors(fids)
        sim = float(np.max(vecs @ query))
        return Verification(sim, sim >= thr, thr)

    # -- writes -------------------------------------------------------------------------

    def create_subject(
        self, name: str, metadata: dict[str, Any] | None = None, external_id: str | None = None
    ) -> Subject:
        with self._write_lock, self._store.transaction() as db:
            self._store.insert_subject(db, name, metadata, external_id)
        return self._store.get_subject(name)

    def update_subject(
        self,
        name: str,
        metadata: dict[str, Any] | None = None,
        external_id: str | None = None,
        *,
        set_external_id: bool = False,
    ) -> Subject:
        with self._write_lock, self._store.transaction() as db:
            self._store.update_subject(db, name, metadata, external_id, set_external_id)
        return self._store.get_subject(name)

    def add_faces(
        self, subject: str, faces: Sequence[NewFace], *, create: bool = False
    ) -> list[int]:
        """Enrol faces of one subject (created when `create`); returns their face ids once
        they are durable on disk and searchable."""
        return self.enrol_bulk([BulkSubject(subject, tuple(faces))], create=create)[0]

    def enrol_bulk(self, entries: Sequence[BulkSubject], *, create: bool = True) -> list[list[int]]:
        """Many subjects in one transaction (all or nothing); face ids per entry."""
        prepared = [(e, self._prepare(e.faces)) for e in entries]
        with self._write_lock:
            with self._store.transaction() as db:
                out: list[list[int]] = []
                for entry, faces in prepared:
                    exists = db.execute(
                        "SELECT 1 FROM subjects WHERE name = ?", (entry.subject,)
                    ).fetchone()
                    if exists is None and create:
                        sid = self._store.insert_subject(
                            db, entry.subject, entry.metadata, entry.external_id
                        )
                    else:
                        sid = self._store.subject_id(db, entry.subject)
                    out.append(self._store.insert_faces(db, sid, faces, self.recognizer))
            self._index_add(
                [
                    (e.subject, fid)
                    for (e, _), ids in zip(prepared, out, strict=True)
                    for fid in ids
                ],
                [f.embedding for _, faces in prepared for f in faces],
            )
        return out

    def _prepare(self, faces: Iterable[NewFace]) -> list[NewFace]:
        faces = list(faces)
        if not faces:
            return []
        vecs = normalize([np.asarray(f.embedding, np.float32) for f in faces], self._dim)
        return [
            NewFace(v, f.crop_jpeg if self.keep_crops else None)
            for v, f in zip(vecs, faces, strict=True)
        ]

    def _index_add(self, owners: list[tuple[str, int]], vecs: list[FloatArray]) -> None:
        if not owners:
            return
        ids = np.array([fid for _, fid in owners], np.int64)
        mat = np.stack(vecs)
        with self._index_lock:
            if self._dim is None:
                self._dim = mat.shape[1]
            if self._index is None:
                self._index = self._new_index(len(ids))
            elif isinstance(self._index, ExactIndex) and 0 < self._ann_min_faces <= len(
                self._index
            ) + len(ids):
                log.info("gallery_index_switch", faces=len(self._index) + len(ids))
                old_ids, old_vecs = self._index.all()
                self._index = ApproximateIndex(self._dim)
                self._index.add(old_ids, old_vecs)
            self._index.add(ids, mat)
            for subject, fid in owners:
                self._face_subject[fid] = subject
                self._subject_faces.setdefault(subject, set()).add(fid)

    def _index_remove(self, face_ids: list[int]) -> None:
        with self._index_lock:
            if self._index is not None:
                self._index.remove(np.array(face_ids, np.int64))
            for fid in face_ids:
                subject = self._face_subject.pop(fid, None)
                if subject is not None:
                    self._subject_faces.get(subject, set()).discard(fid)
                    if not self._subject_faces.get(subject):
                        self._subject_faces.pop(subject, None)

    def delete_subject(self, name: str) -> int:
        """Delete the subject and all its faces from disk and index; returns the face count."""
        with self._write_lock:
            with self._store.transaction() as db:
                ids = self._store.delete_subject(db, name)
            self._index_remove(ids)
            self._store.checkpoint()
        log.info("gallery_subject_deleted", faces=len(ids))
        return len(ids)

    def delete_face(self, face_id: int) -> None:
        with self._write_lock:
            with self._store.transaction() as db:
                self._store.delete_face(db, face_id)
            self._index_remove([face_id])
            self._store.checkpoint()

    # -- snapshots (snapshot.py does the file format) -----------------------------------

    @property
    def store(self) -> GalleryStore:
        return self._store

    def replace_contents(self, load: Callable[[sqlite3.Connection], None]) -> None:
        """Run `load(db)` in one write transaction, then rebuild the index from the database
        (imports are rare; a rebuild keeps index and database identical by construction)."""
        with self._write_lock:
            with self._store.transaction() as db:
                load(db)
            self._store.checkpoint()
            with self._index_lock:
                self._index = None
                self._face_subject.clear()
                self._subject_faces.clear()
                self._load()
