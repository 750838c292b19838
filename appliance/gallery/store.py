"""SQLite storage of subjects and face embeddings (standard library sqlite3).

Durability choices, and why:
- WAL journal: readers never block the single writer, and a crash (kill -9, power loss)
  leaves either the old or the new state of each transaction, recovered on next open.
- synchronous=FULL: in WAL mode NORMAL is already crash-safe for the process, but after a
  power loss it may lose the last transactions. An enrolment is acknowledged to a client,
  so the acknowledgement must survive the device losing power: FULL fsyncs the WAL on every
  commit. Enrolment is rare next to search, so the cost (one fsync per commit) is fine.
- secure_delete=ON: deleted rows are overwritten with zeros in the database pages, and a
  delete ends with a TRUNCATE checkpoint so no copy of the old page stays in the WAL file.
  "Deleted" means the embedding bytes are gone from the files.
- Face ids use AUTOINCREMENT so an id is never reused after a delete: a client holding an
  old face id can never delete someone else's face with it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from appliance.gallery.errors import (
    ExternalIdExists,
    FaceNotFound,
    InvalidSubject,
    SubjectExists,
    SubjectNotFound,
)
from appliance.gallery.records import FaceRecord, FloatArray, NewFace, Recognizer, Subject

MAX_NAME_LEN = 256
# Faces read per block at start-up (4,096 x 2 KiB embeddings: 8 MiB of blobs at a time).
LOAD_BLOCK = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subjects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    external_id TEXT UNIQUE,
    metadata TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_id INTEGER NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL,
    recognizer TEXT NOT NULL,
    recognizer_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    crop BLOB
);
CREATE INDEX IF NOT EXISTS faces_by_subject ON faces(subject_id);
"""


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LEN:
        raise InvalidSubject(f"subject name must be 1..{MAX_NAME_LEN} characters, got {name!r}")


def _metadata_json(metadata: dict[str, Any] | None) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise InvalidSubject("metadata must be a JSON object")
    try:
        return json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidSubject(f"metadata must be JSON-serialisable: {exc}") from None


def embedding_blob(vec: FloatArray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


class GalleryStore:
    """One connection, used by one thread at a time (the lock); the gallery above serialises
    writes anyway, the lock makes the store safe on its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        for pragma in (
            # Only takes effect on a new file (before WAL). A 512-d embedding row is ~2.1 KB:
            # 4 KB pages hold one row each (half empty), 8 KB pages three, so the file and the
            # start-up read shrink by a third.
            "page_size=8192",
            "journal_mode=WAL",
            "synchronous=FULL",
            "secure_delete=ON",
            "foreign_keys=ON",
            "busy_timeout=5000",
        ):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def checkpoint(self) -> None:
        """Move every committed page into the database file and empty the WAL file, so a
        deleted embedding leaves no old page image behind in the WAL."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- meta ---------------------------------------------------------------------------

    def recognizer(self) -> Recognizer | None:
        with self._lock:
            rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if "recognizer" not in rows:
            return None
        return Recognizer(rows["recognizer"], rows["recognizer_sha256"])

    def bind(self, db: sqlite3.Connection, recognizer: Recognizer) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("recognizer", recognizer.name), ("recognizer_sha256", recognizer.sha256)],
        )

    # -- reads --------------------------------------------------------------------------

    def face_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM faces").fetchone()[0])

    def subject_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM subjects").fetchone()[0])

    def load_embeddings(
        self, spare_rows: int = 0
    ) -> tuple[np.ndarray[Any, np.dtype[np.int64]], list[str], FloatArray]:
        """(face ids, subject name per face, (faces + spare_rows, dim) float32 matrix whose
        first rows are the embeddings) of every face, for the index at start-up."""
        with self._lock:
            names = dict(self._db.execute("SELECT id, name FROM subjects").fetchall())
            n = int(self._db.execute("SELECT count(*) FROM faces").fetchone()[0])
            ids = np.empty(n, np.int64)
            owners: list[str] = []
            mat: FloatArray = np.empty((0, 0), np.float32)
            # Rowid order and no join (a join with ORDER BY costs several times the plain
            # scan). Rows come in blocks: one join of a block's blobs and one copy into the
            # preallocated matrix, instead of a numpy call per face (100,000 of those were
            # ~0.5 s of a 1.7 s start-up).
            cursor = self._db.execute("SELECT id, subject_id, embedding FROM faces ORDER BY id")
            done = 0
            while block := cursor.fetchmany(LOAD_BLOCK):
                fids, sids, blobs = zip(*block, strict=True)
                if done == 0:
                    mat = np.empty((n + spare_rows, len(blobs[0]) // 4), np.float32)
                stop = done + len(block)
                ids[done:stop] = fids
                owners.extend(map(names.__getitem__, sids))
                flat = np.frombuffer(b"".join(blobs), "<f4")
                mat[done:stop] = flat.reshape(len(block), mat.shape[1])
                done = stop
        return ids, owners, mat

    def _subject_row(self, db: sqlite3.Connection, name: str) -> tuple[Any, ...]:
        row = db.execute(
            "SELECT s.id, s.name, s.metadata, s.external_id, s.created, "
            "(SELECT count(*) FROM faces f WHERE f.subject_id = s.id) "
            "FROM subjects s WHERE s.name = ?",
            (name,),
        ).fetchone()
        if row is None:
            raise SubjectNotFound(f"no subject {name!r}")
        return tuple(row)

    @staticmethod
    def _subject(row: Sequence[Any]) -> Subject:
        return Subject(
            name=row[1],
            metadata=json.loads(row[2]),
            external_id=row[3],
            created=row[4],
            face_count=row[5],
        )

    def get_subject(self, name: str) -> Subject:
        with self._lock:
            return self._subject(self._subject_row(self._db, name))

    def list_subjects(self, offset: int, limit: int) -> list[Subject]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.id, s.name, s.metadata, s.external_id, s.created, "
                "(SELECT count(*) FROM faces f WHERE f.subject_id = s.id) "
                "FROM subjects s ORDER BY s.name LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [self._subject(r) for r in rows]

    def subject_faces(self, name: str) -> list[FaceRecord]:
        with self._lock:
            sid = self._subject_row(self._db, name)[0]
            rows = self._db.execute(
                "SELECT id, recognizer, recognizer_sha256, created, crop IS NOT NULL "
                "FROM faces WHERE subject_id = ? ORDER BY id",
                (sid,),
            ).fetchall()
        return [FaceRecord(r[0], name, r[1], r[2], r[3], bool(r[4])) for r in rows]

    def face_crop(self, face_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT crop FROM faces WHERE id = ?", (face_id,)).fetchone()
        if row is None:
            raise FaceNotFound(f"no face {face_id}")
        return row[0] if row[0] is None else bytes(row[0])

    def export_rows(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Subjects (name, metadata json, external id, created) and faces (id, subject name,
        embedding, created), for snapshots."""
        with self._lock:
            subjects = self._db.execute(
                "SELECT name, metadata, external_id, created FROM subjects ORDER BY name"
            ).fetchall()
            faces = self._db.execute(
                "SELECT f.id, s.name, f.embedding, f.created FROM faces f "
                "JOIN subjects s ON s.id = f.subject_id ORDER BY f.id"
            ).fetchall()
        return [tuple(s) for s in subjects], [tuple(f) for f in faces]

    # -- writes (inside transaction()) --------------------------------------------------

    def insert_subject(
        self,
        db: sqlite3.Connection,
        name: str,
        metadata: dict[str, Any] | None,
        external_id: str | None,
        created: float | None = None,
    ) -> int:
        _check_name(name)
        try:
            cur = db.execute(
                "INSERT INTO subjects (name, external_id, metadata, created) VALUES (?, ?, ?, ?)",
                (name, external_id, _metadata_json(metadata), created or time.time()),
            )
        except sqlite3.IntegrityError:
            if db.execute("SELECT 1 FROM subjects WHERE name = ?", (name,)).fetchone():
                raise SubjectExists(f"subject {name!r} already exists") from None
            raise ExternalIdExists(f"external id {external_id!r} is already in use") from None
        assert cur.lastrowid is not None
        return cur.lastrowid

    def subject_id(self, db: sqlite3.Connection, name: str, create: bool = False) -> int:
        row = db.execute("SELECT id FROM subjects WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        if not create:
            raise SubjectNotFound(f"no subject {name!r}")
        return self.insert_subject(db, name, None, None)

    def update_subject(
        self,
        db: sqlite3.Connection,
        name: str,
        metadata: dict[str, Any] | None,
        external_id: str | None,
        set_external_id: bool,
    ) -> None:
        sid = self.subject_id(db, name)
        if metadata is not None:
            db.execute(
                "UPDATE subjects SET metadata = ? WHERE id = ?", (_metadata_json(metadata), sid)
            )
        if set_external_id:
            try:
                db.execute("UPDATE subjects SET external_id = ? WHERE id = ?", (external_id, sid))
            except sqlite3.IntegrityError:
                raise ExternalIdExists(f"external id {external_id!r} is already in use") from None

    def delete_subject(self, db: sqlite3.Connection, name: str) -> list[int]:
        """Delete the subject and its faces; returns the deleted face ids."""
        sid = self.subject_id(db, name)
        ids = [r[0] for r in db.execute("SELECT id FROM faces WHERE subject_id = ?", (sid,))]
        db.execute("DELETE FROM faces WHERE subject_id = ?", (sid,))
        db.execute("DELETE FROM subjects WHERE id = ?", (sid,))
        return ids

    def insert_faces(
        self,
        db: sqlite3.Connection,
        subject_id: int,
        faces: Iterable[NewFace],
        recognizer: Recognizer,
        face_ids: Iterable[int | None] | None = None,
        created: float | None = None,
    ) -> list[int]:
        now = created or time.time()
        out: list[int] = []
        ids = iter(face_ids) if face_ids is not None else None
        for face in faces:
            fid = next(ids) if ids is not None else None
            cur = db.execute(
                "INSERT INTO faces (id, subject_id, embedding, recognizer, recognizer_sha256, "
                "created, crop) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    fid,
                    subject_id,
                    embedding_blob(face.embedding),
                    recognizer.name,
                    recognizer.sha256,
                    now,
                    face.crop_jpeg,
                ),
            )
            assert cur.lastrowid is not None
            out.append(cur.lastrowid)
        return out

    def delete_face(self, db: sqlite3.Connection, face_id: int) -> None:
        # Ids are SQLite rowids (1 .. 2**63 - 1): anything else names no face, and would make
        # sqlite3 raise OverflowError instead of answering.
        if not 0 < face_id < 2**63:
            raise FaceNotFound(f"no face {face_id}")
        if db.execute("DELETE FROM faces WHERE id = ?", (face_id,)).rowcount == 0:
            raise FaceNotFound(f"no face {face_id}")

    def delete_all(self, db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM faces")
        db.execute("DELETE FROM subjects")
