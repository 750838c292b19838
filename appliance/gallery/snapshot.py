"""Gallery snapshots: one zip file holding `manifest.json` (format, recognizer name and
sha256, dimension, subjects with metadata and external ids, faces, checksum) and
`embeddings.f32` (little-endian float32, one row per face in manifest order).

The checksum is sha256 over the canonical manifest without its `checksum` field followed
by the embedding bytes, so a changed subject name or a flipped bit in a vector is caught.
Crops are never exported: a snapshot travels to other devices (privacy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sqlite3
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appliance.gallery.errors import RecognizerMismatch, SnapshotInvalid
from appliance.gallery.gallery import Gallery
from appliance.gallery.records import FloatArray, NewFace, Recognizer
from appliance.gallery.store import embedding_blob

FORMAT = "appliance-gallery-snapshot"
VERSION = 1
ImportMode = Literal["merge", "replace"]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    recognizer: Recognizer
    dim: int
    subjects: list[dict[str, Any]]
    faces: list[dict[str, Any]]
    embeddings: FloatArray
    checksum: str


@dataclasses.dataclass(frozen=True)
class ImportResult:
    subjects_added: int
    faces_added: int
    faces_skipped: int


def _digest(manifest: dict[str, Any], embeddings: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update(embeddings)
    return "sha256:" + h.hexdigest()


def export_bytes(gallery: Gallery) -> bytes:
    subjects, faces = gallery.store.export_rows()
    dim = gallery.dim or 0
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.time(),
        "recognizer": {"name": gallery.recognizer.name, "sha256": gallery.recognizer.sha256},
        "dim": dim,
        "subjects": [
            {"name": s[0], "metadata": json.loads(s[1]), "external_id": s[2], "created": s[3]}
            for s in subjects
        ],
        "faces": [{"id": f[0], "subject": f[1], "created": f[3]} for f in faces],
    }
    emb = b"".join(f[2] for f in faces)
    manifest["checksum"] = _digest(manifest, emb)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, sort_keys=True))
        zf.writestr("embeddings.f32", emb)
    return buf.getvalue()


def export_file(gallery: Gallery, path: Path) -> str:
    """Write the snapshot atomically; returns its checksum."""
    data = export_bytes(gallery)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return read(data).checksum


def read(data: bytes | Path) -> Snapshot:
    """Parse and verify a snapshot; SnapshotInvalid when it is not one or fails its checksum."""
    try:
        raw = data.read_bytes() if isinstance(data, Path) else data
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            manifest = json.loads(zf.read("manifest.json"))
            emb = zf.read("embeddings.f32")
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise SnapshotInvalid(f"not a gallery snapshot: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotInvalid("not a gallery snapshot (unknown format)")
    if manifest.get("version") != VERSION:
        raise SnapshotInvalid(f"snapshot version {manifest.get('version')} is not supported")
    if manifest.get("checksum") != _digest(manifest, emb):
        raise SnapshotInvalid("snapshot checksum does not match its contents (corrupt or edited)")
    try:
        rec = Recognizer(manifest["recognizer"]["name"], manifest["recognizer"]["sha256"])
        dim, faces = int(manifest["dim"]), manifest["faces"]
        # A checksum proves the file is intact, not that its writer was this program.
        for s in manifest["subjects"]:
            _fields(s, {"name": str, "created": (int, float)})
        for f in faces:
            _fields(f, {"id": int, "subject": str, "created": (int, float)})
        vecs = np.frombuffer(emb, "<f4").astype(np.float32)
        vecs = vecs.reshape(len(faces), dim) if faces else np.zeros((0, dim), np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotInvalid(f"snapshot manifest is malformed: {exc}") from None
    return Snapshot(rec, dim, manifest["subjects"], faces, vecs, manifest["checksum"])


def _fields(entry: Any, types: dict[str, Any]) -> None:
    if not isinstance(entry, dict) or any(
        not isinstance(entry.get(k), t) for k, t in types.items()
    ):
        raise ValueError(f"entry {str(entry)[:80]} lacks one of {sorted(types)}")


def import_snapshot(gallery: Gallery, snap: Snapshot, mode: ImportMode) -> ImportResult:
    """Merge (add subjects and faces not present; an identical embedding already on the same
    subject is skipped, so importing twice changes nothing) or replace the whole gallery."""
    if snap.recognizer.sha256 != gallery.recognizer.sha256:
        raise RecognizerMismatch(
            f"snapshot was made with {snap.recognizer.name} (sha256 "
            f"{snap.recognizer.sha256[:12]}...), this gallery uses {gallery.recognizer.name} "
            f"(sha256 {gallery.recognizer.sha256[:12]}...): embeddings of different "
            "recognizers cannot be compared"
        )
    if gallery.dim is not None and snap.faces and snap.dim != gallery.dim:
        raise RecognizerMismatch(f"snapshot has {snap.dim}-d embeddings, gallery {gallery.dim}-d")
    store = gallery.store
    counts = {"subjects": 0, "faces": 0, "skipped": 0}

    def load(db: sqlite3.Connection) -> None:
        if mode == "replace":
            store.delete_all(db)
        for s in snap.subjects:
            if db.execute("SELECT 1 FROM subjects WHERE name = ?", (s["name"],)).fetchone():
                continue
            store.insert_subject(
                db, s["name"], s.get("metadata"), s.get("external_id"), s["created"]
            )
            counts["subjects"] += 1
        for face, vec in zip(snap.faces, snap.embeddings, strict=True):
            sid = store.subject_id(db, face["subject"], create=True)
            blob = embedding_blob(vec)
            if (
                mode == "merge"
                and db.execute(
                    "SELECT 1 FROM faces WHERE subject_id = ? AND embedding = ?", (sid, blob)
                ).fetchone()
            ):
                counts["skipped"] += 1
                continue
            # Replace keeps the snapshot's face ids, so ids agree across a synced fleet.
            fid = face["id"] if mode == "replace" else None
            store.insert_faces(db, sid, [NewFace(vec)], snap.recognizer, [fid], face["created"])
            counts["faces"] += 1

    gallery.replace_contents(load)
    return ImportResult(counts["subjects"], counts["faces"], counts["skipped"])
