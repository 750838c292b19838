"""The gallery through the real server: real models, the shared photos, a real socket.

Enrolment, search, /extract with identify, verification, persistence across restarts,
deletion, export/import, concurrency, and identities on a live stream (DATA.md says who is
in which photo)."""

from __future__ import annotations

import asyncio
import base64
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import msgpack
import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from appliance.api.app import create_app
from tests.gallery_fixtures import PHOTOS, needs_shared, real_settings
from tests.helpers import jpeg
from tests.stream_fixtures import receive_until

pytestmark = needs_shared

# DATA.md: who each probe shows; None is a face of nobody in the gallery.
PROBES: dict[str, Counter[str | None]] = {
    "obama1.jpg": Counter(["obama"]),
    "alex_lacamoire1.jpg": Counter(["alex_lacamoire"]),
    "two_people.jpg": Counter(["biden", "obama"]),
    "obama_and_biden.jpg": Counter(["obama", "biden", None]),
    "lin-manuel-miranda.png": Counter([None]),
}
Client = TestClient[Any, Any]
Start = Callable[..., Any]


def b64_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture
def start(aiohttp_client: Callable[..., Any], tmp_path: Path, calm_sysfs: Path) -> Start:
    """A real server on the real models; `db` picks the GALLERY_DB (same path = restart)."""

    async def go(db: Path | None = None, **overrides: Any) -> Client:
        settings = real_settings(
            tmp_path,
            gallery_db=db or tmp_path / "gallery.db",
            telemetry_source="sysfs",
            sysfs_root=calm_sysfs,
            **overrides,
        )
        client: Client = await aiohttp_client(create_app(settings))
        return client

    return go


async def enrol_gallery(client: Client) -> dict[str, list[int]]:
    """Every gallery photo through the API: JSON for one subject, multipart for another,
    msgpack with raw bytes for the third."""
    ids: dict[str, list[int]] = {}
    for folder in sorted((PHOTOS / "gallery").iterdir()):
        name = folder.name
        resp = await client.post("/gallery/subjects", json={"subject": name, "metadata": {"n": 1}})
        assert resp.status == 201, await resp.text()
        files = sorted(folder.iterdir())
        if name == "obama":
            form = aiohttp.FormData()
            for f in files:
                form.add_field("images", f.read_bytes(), filename=f.name)
            resp = await client.post(f"/gallery/subjects/{name}/faces", data=form)
        elif name == "biden":
            body = msgpack.packb({"images": {"data": [f.read_bytes() for f in files]}})
            resp = await client.post(
                f"/gallery/subjects/{name}/faces",
                data=body,
                headers={"Content-Type": "application/msgpack"},
            )
        else:
            resp = await client.post(
                f"/gallery/subjects/{name}/faces",
                json={"images": {"data": [b64_file(f) for f in files]}},
            )
        answer = await resp.json()
        assert resp.status == 201, answer
        assert len(answer["face_ids"]) == len(files)
        assert [e["status"] for e in answer["data"]] == ["ok"] * len(files)
        ids[name] = answer["face_ids"]
    return ids


async def search(client: Client, probe: str, **extra: Any) -> list[dict[str, Any]]:
    body = {"images": {"data": [b64_file(PHOTOS / "probe" / probe)]}, **extra}
    resp = await client.post("/gallery/search", json=body)
    answer = await resp.json()
    assert resp.status == 200, answer
    faces: list[dict[str, Any]] = answer["data"][0]["faces"]
    return faces


async def identities(client: Client) -> dict[str, list[tuple[str | None, float]]]:
    """Probe -> (identity, best similarity) per face, detector order."""
    out = {}
    for probe in PROBES:
        faces = await search(client, probe)
        out[probe] = [(f["identity"], f["matches"][0]["similarity"]) for f in faces]
    return out


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_every_probe_is_identified_and_strangers_are_null(start: Start) -> None:
    client = await start()
    await enrol_gallery(client)
    resp = await client.post("/gallery/subjects", json={"subject": "obama"})
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "subject_exists"

    for probe, expected in PROBES.items():
        faces = await search(client, probe, top_k=3)
        assert Counter(f["identity"] for f in faces) == expected, probe
        for f in faces:
            sims = [m["similarity"] for m in f["matches"]]
            assert sims == sorted(sims, reverse=True) and len(sims) == 3
            if f["identity"] is None:
                assert sims[0] < 0.4  # DATA.md: strangers score at most 0.08
            else:
                assert f["matches"][0]["subject"] == f["identity"] and sims[0] >= 0.7
        # /extract with identify answers the same, face for face.
        body = {"images": {"data": [b64_file(PHOTOS / "probe" / probe)]}, "identify": True}
        extracted = (await (await client.post("/extract", json=body)).json())["data"][0]["faces"]
        default = await search(client, probe)  # the same top_k (5) as /extract
        assert [(f["identity"], f["matches"]) for f in extracted] == [
            (f["identity"], f["matches"]) for f in default
        ]

    # A raised threshold turns every answer into "unknown"; matches stay for review.
    faces = await search(client, "obama1.jpg", identify_threshold=0.999)
    assert faces[0]["identity"] is None and faces[0]["matches"][0]["subject"] == "obama"

    listing = await (await client.get("/gallery/subjects?limit=2")).json()
    assert listing["total_subjects"] == 3 and listing["total_faces"] == 5
    assert [s["subject"] for s in listing["subjects"]] == ["alex_lacamoire", "biden"]
    rest = await (await client.get("/gallery/subjects?offset=2")).json()
    assert [(s["subject"], s["face_count"]) for s in rest["subjects"]] == [("obama", 2)]

    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_gallery_subjects") == 3
    assert metric(text, "appliance_gallery_faces") == 5
    known = metric(text, 'appliance_identifications_total{outcome="known"}')
    unknown = metric(text, 'appliance_identifications_total{outcome="unknown"}')
    # Searches: 5 probes x 3 calls (search, extract, search) + the raised threshold one.
    assert (known, unknown) == (3 * 6, 3 * 2 + 1)
    assert metric(text, "appliance_gallery_search_duration_seconds_count") == 16


async def test_an_image_without_a_face_gets_its_own_error_entry(start: Start) -> None:
    client = await start()
    await client.post("/gallery/subjects", json={"subject": "obama"})
    photo = b64_file(PHOTOS / "gallery" / "obama" / "obama.jpg")
    grey = base64.b64encode(jpeg(320, 240)).decode()
    resp = await client.post(
        "/gallery/subjects/obama/faces", json={"images": {"data": [grey, photo]}}
    )
    answer = await resp.json()
    assert resp.status == 201
    assert answer["data"][0] == {
        "status": "error",
        "error": "no face found in the image",
        "code": "no_face",
    }
    assert answer["data"][1]["status"] == "ok" and len(answer["face_ids"]) == 1
    missing = await client.post("/gallery/subjects/nobody/faces", json={"embeddings": [[1.0]]})
    assert missing.status == 404
    wrong = await client.post("/gallery/subjects/obama/faces", json={"embeddings": [[1.0, 0.0]]})
    assert (wrong.status, (await wrong.json())["error"]["code"]) == (400, "invalid_embedding")


async def test_verify_two_images_and_image_against_subject(start: Start) -> None:
    client = await start()
    await enrol_gallery(client)

    async def verify(*names: str, subject: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"images": {"data": [b64_file(PHOTOS / n) for n in names]}}
        if subject is not None:
            body["subject"] = subject
        resp = await client.post("/gallery/verify", json=body)
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 200, answer
        return answer

    same = await verify("probe/obama1.jpg", "gallery/obama/obama.jpg")
    other = await verify("probe/obama1.jpg", "gallery/biden/biden.jpg")
    assert same["match"] and same["similarity"] >= 0.7
    assert not other["match"] and other["similarity"] < 0.3
    assert (await verify("probe/obama1.jpg", subject="obama"))["match"]
    assert not (await verify("probe/alex_lacamoire1.jpg", subject="biden"))["match"]
    stranger = await verify("probe/lin-manuel-miranda.png", subject="obama")
    assert not stranger["match"] and stranger["threshold"] == pytest.approx(0.4)
    resp = await client.post(
        "/gallery/verify", json={"images": {"data": [b64_file(PHOTOS / "probe/obama1.jpg")]}}
    )
    assert resp.status == 400


async def test_deletes_are_immediate_and_survive_a_restart(start: Start, tmp_path: Path) -> None:
    db = tmp_path / "kept.db"
    client = await start(db)
    ids = await enrol_gallery(client)
    before = await identities(client)
    resp = await client.delete("/gallery/subjects/biden")
    assert (await resp.json()) == {"subject": "biden", "faces_deleted": 2}
    resp = await client.delete(f"/gallery/faces/{ids['obama'][0]}")
    assert resp.status == 200
    assert (await client.delete(f"/gallery/faces/{ids['obama'][0]}")).status == 404
    assert (await client.get("/gallery/subjects/biden")).status == 404

    def no_biden(found: dict[str, list[tuple[str | None, float]]]) -> None:
        for probe, faces in found.items():
            names = [n for n, _ in faces]
            assert "biden" not in names, probe
        # Biden's faces are strangers now; Obama is still found from his other photo.
        assert Counter(n for n, _ in found["two_people.jpg"]) == Counter(["obama", None])

    no_biden(await identities(client))
    detail = await (await client.get("/gallery/subjects/obama")).json()
    assert [f["face_id"] for f in detail["faces"]] == ids["obama"][1:]
    await client.close()

    restarted = await start(db)
    after = await identities(restarted)
    no_biden(after)
    assert after["alex_lacamoire1.jpg"] == before["alex_lacamoire1.jpg"]
    listing = await (await restarted.get("/gallery/subjects")).json()
    assert (listing["total_subjects"], listing["total_faces"]) == (2, 2)
    text = await (await restarted.get("/metrics")).text()
    assert metric(text, "appliance_gallery_faces") == 2


async def test_export_import_gives_the_same_answers_and_another_recognizer_is_refused(
    start: Start, tmp_path: Path, serve: Start
) -> None:
    source = await start(tmp_path / "a.db")
    await enrol_gallery(source)
    await source.patch("/gallery/subjects/obama", json={"external_id": "emp-44"})
    expected = await identities(source)
    resp = await source.get("/gallery/export")
    assert resp.content_type == "application/zip"
    snapshot = await resp.read()
    await source.close()

    fresh = await start(tmp_path / "b.db")
    for mode in ("merge", "merge", "replace"):  # the second merge adds nothing
        resp = await fresh.post(f"/gallery/import?mode={mode}", data=snapshot)
        answer = await resp.json()
        assert resp.status == 200, answer
        assert (answer["total_subjects"], answer["total_faces"]) == (3, 5)
    assert answer["mode"] == "replace"
    assert await identities(fresh) == expected
    obama = await (await fresh.get("/gallery/subjects/obama")).json()
    assert obama["external_id"] == "emp-44"

    other = await serve()  # the generated test recognizer: another model, other embeddings
    resp = await other.post("/gallery/import", data=snapshot)
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["code"] == "recognizer_mismatch"
    assert "mobilefacenet_128" in error["message"]
    assert (await (await other.get("/gallery/subjects")).json())["total_faces"] == 0
    corrupt = snapshot[:-40] + bytes(40)
    resp = await fresh.post("/gallery/import", data=corrupt)
    assert (resp.status, (await resp.json())["error"]["code"]) == (400, "snapshot_invalid")


async def test_concurrent_enrolment_and_search_lose_nothing(start: Start) -> None:
    client = await start()
    await enrol_gallery(client)
    rng = np.random.default_rng(7)
    subjects = [f"s{i:02d}" for i in range(24)]
    # Bulk: subjects with the caller's external ids, one call, one transaction.
    resp = await client.post(
        "/gallery/bulk",
        json={
            "subjects": [
                {"subject": s, "external_id": f"ext-{s}", "embeddings": [[1.0] * 128]}
                for s in subjects[:4]
            ]
        },
    )
    assert resp.status == 201
    bulk = (await resp.json())["subjects"]
    assert [(b["subject"], b["external_id"], len(b["face_ids"])) for b in bulk] == [
        (s, f"ext-{s}", 1) for s in subjects[:4]
    ]

    async def enrol(name: str) -> list[int]:
        if name not in subjects[:4]:
            assert (await client.post("/gallery/subjects", json={"subject": name})).status == 201
        vecs = rng.standard_normal((3, 128)).tolist()
        resp = await client.post(f"/gallery/subjects/{name}/faces", json={"embeddings": vecs})
        assert resp.status == 201
        ids: list[int] = (await resp.json())["face_ids"]
        return ids

    async def probe() -> None:
        faces = await search(client, "obama1.jpg")
        assert faces[0]["identity"] == "obama"

    results = await asyncio.gather(*(enrol(s) for s in subjects), *(probe() for _ in range(12)))
    face_ids = [fid for ids in results[: len(subjects)] for fid in ids]
    assert len(set(face_ids)) == len(face_ids) == 3 * len(subjects)
    listing = await (await client.get("/gallery/subjects?limit=1000")).json()
    assert listing["total_faces"] == 5 + 4 + 3 * len(subjects)
    counts = {s["subject"]: s["face_count"] for s in listing["subjects"]}
    assert all(counts[s] == (4 if s in subjects[:4] else 3) for s in subjects)


@pytest.mark.slow
async def test_stream_with_identify_tracks_and_recognises_rarely(start: Start) -> None:
    client = await start(max_size=(640, 384))
    await enrol_gallery(client)
    await client.post("/gallery/subjects", json={"subject": "lin_manuel_miranda"})
    probe = b64_file(PHOTOS / "probe" / "lin-manuel-miranda.png")
    await client.post(
        "/gallery/subjects/lin_manuel_miranda/faces", json={"images": {"data": [probe]}}
    )
    cap = cv2.VideoCapture(str(PHOTOS / "short_hamilton_clip.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    cap.release()
    results: list[list[dict[str, Any]]] = []
    async with client.ws_connect("/ws/stream") as ws:
        await ws.send_json({"type": "config", "identify": True, "max_fps": 1000})
        await receive_until(ws, lambda m: m["type"] == "config")
        for seq, data in enumerate(frames, 1):
            # One frame at a time: none is replaced, so every frame is tracked.
            await ws.send_json({"type": "frame", "seq": seq})
            await ws.send_bytes(data)
            message, _ = await receive_until(
                ws, lambda m, seq=seq: m["type"] == "result" and m["seq"] == seq, timeout=60
            )
            results.append(message["faces"])
    assert len(results) == 275
    faces = [f for frame in results for f in frame]
    assert all({"track_id", "identity", "similarity"} <= set(f) for f in faces)
    spans = Counter(f["track_id"] for f in faces)
    # The main face keeps one track for most of the clip (DATA: 220 frames in one run).
    assert spans.most_common(1)[0][1] >= 150
    named = Counter(f["identity"] for f in faces if f["identity"] is not None)
    assert set(named) == {"lin_manuel_miranda"} and named["lin_manuel_miranda"] >= 50
    text = await (await client.get("/metrics")).text()
    seen = metric(text, "appliance_stream_identify_faces_total")
    recognitions = metric(text, "appliance_stream_recognitions_total")
    assert seen == len(faces) > 400
    assert 0 < recognitions < seen / 5
