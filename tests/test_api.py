"""The REST API end to end: a real server on 127.0.0.1, real ONNX models, real requests."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
from aiohttp import FormData, MultipartWriter, web

from appliance.pipeline.align import ARCFACE_TEMPLATE
from tests.conftest import PLANTED, write_models
from tests.helpers import b64, jpeg, png

# A 1280x960 image is letterboxed into 640x640 at scale 0.5: every planted face must come
# back at twice its detector-input coordinates.
SCALE = 0.5


def expected_bbox(i: int) -> np.ndarray:
    return np.array(PLANTED[i].bbox) / SCALE


def by_prob(faces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(faces, key=lambda f: -f["prob"])


def metric(text: str, name: str, **labels: str) -> float:
    label_re = "".join(f'(?=[^}}]*{k}="{v}")' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{label_re}[^}}]*\}})? ([0-9.e+-]+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    return sum(values)


async def test_planted_faces_come_back_at_their_boxes_and_landmarks(serve: Any) -> None:
    client = await serve()
    resp = await client.post(
        "/extract", json={"images": {"data": [b64(jpeg(1280, 960))]}, "return_landmarks": True}
    )
    assert resp.status == 200
    body = await resp.json()
    faces = body["data"][0]["faces"]
    assert body["data"][0]["status"] == "ok"
    assert len(faces) == 3
    # Sorted by score as NMS returns them: 0.95, 0.88, 0.72.
    assert [f["prob"] for f in faces] == pytest.approx([0.95, 0.88, 0.72], abs=1e-6)
    order = [0, 2, 1]
    for face, i in zip(faces, order, strict=True):
        assert np.abs(np.array(face["bbox"]) - expected_bbox(i)).max() <= 1.0
        landmarks = np.array(PLANTED[i].landmarks) / SCALE
        assert np.abs(np.array(face["landmarks"]) - landmarks).max() <= 1.0
        assert face["size"] == pytest.approx(expected_bbox(i)[2] - expected_bbox(i)[0], abs=1)
        vec = np.array(face["vec"])
        assert vec.shape == (512,)
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-3)
        assert face["norm"] > 0
    assert faces[0]["num_det"] == 0 and faces[2]["num_det"] == 2
    assert body["took"]["total_ms"] > 0


async def test_embeddings_follow_the_face_content(serve: Any) -> None:
    """Two different images give different embeddings; the same image the same one."""
    client = await serve()
    data = [
        b64(jpeg(1280, 960, seed=1)),
        b64(jpeg(1280, 960, seed=2)),
        b64(jpeg(1280, 960, seed=1)),
    ]
    body = await (await client.post("/extract", json={"images": {"data": data}})).json()
    vecs = [np.array(d["faces"][0]["vec"]) for d in body["data"]]
    assert float(vecs[0] @ vecs[2]) == pytest.approx(1.0, abs=1e-5)
    assert float(vecs[0] @ vecs[1]) < 0.99


async def test_threshold_limit_and_min_size_options(serve: Any) -> None:
    client = await serve()
    data = {"data": [b64(jpeg(1280, 960))]}
    high = await (await client.post("/extract", json={"images": data, "threshold": 0.9})).json()
    assert [f["prob"] for f in high["data"][0]["faces"]] == pytest.approx([0.95])
    limited = await (await client.post("/extract", json={"images": data, "limit_faces": 2})).json()
    assert len(limited["data"][0]["faces"]) == 2
    # Face sizes in the original image: 160, 80 and 400 px.
    big = await (await client.post("/extract", json={"images": data, "min_face_size": 100})).json()
    assert sorted(f["size"] for f in big["data"][0]["faces"]) == [160, 400]


async def test_output_options(serve: Any) -> None:
    client = await serve()
    data = {"data": [b64(jpeg(1280, 960))]}
    plain = await (
        await client.post("/extract", json={"images": data, "extract_embedding": False})
    ).json()
    face = plain["data"][0]["faces"][0]
    assert face["vec"] is None and face["norm"] is None
    assert face["landmarks"] is None and face["facedata"] is None
    assert "took" not in plain["data"][0]

    rich = await (
        await client.post(
            "/extract",
            json={
                "images": data,
                "return_face_data": True,
                "verbose_timings": True,
                "extract_ga": True,
                "detect_masks": True,
            },
        )
    ).json()
    face = rich["data"][0]["faces"][0]
    crop = cv2.imdecode(
        np.frombuffer(base64.b64decode(face["facedata"]), np.uint8), cv2.IMREAD_COLOR
    )
    assert crop.shape == (112, 112, 3)
    assert face["gender"] is None and face["age"] is None and face["mask_prob"] is None
    assert any("extract_ga" in w for w in rich["warnings"])
    assert any("detect_masks" in w for w in rich["warnings"])
    timings = rich["data"][0]["took"]
    assert {"detect_pre_ms", "detect_ms", "detect_post_ms", "embed_ms"} <= set(timings)


async def test_face_data_crop_is_the_aligned_face(serve: Any, tmp_path: Path) -> None:
    """The planted landmarks sit on the ArcFace template, so the crop is the face's box."""
    client = await serve()
    img = np.zeros((960, 1280, 3), np.uint8)
    x1, y1, x2, y2 = (int(v) for v in expected_bbox(0))
    img[y1:y2, x1:x2] = (40, 160, 220)
    _ok, buf = cv2.imencode(".png", img)
    body = await (
        await client.post(
            "/extract", json={"images": {"data": [b64(buf.tobytes())]}, "return_face_data": True}
        )
    ).json()
    face = by_prob(body["data"][0]["faces"])[0]
    crop = cv2.imdecode(
        np.frombuffer(base64.b64decode(face["facedata"]), np.uint8), cv2.IMREAD_COLOR
    )
    inner = crop[10:100, 10:100].reshape(-1, 3).mean(axis=0)
    assert np.abs(inner - np.array([40, 160, 220])).max() < 6


async def test_embed_only_embeds_the_crop_itself(serve: Any) -> None:
    client = await serve()
    crops = [b64(png(112, 112, seed=3)), b64(png(224, 224, seed=3))]
    body = await (
        await client.post("/extract", json={"images": {"data": crops}, "embed_only": True})
    ).json()
    assert [len(d["faces"]) for d in body["data"]] == [1, 1]
    assert body["data"][0]["faces"][0]["bbox"] == [0, 0, 112, 112]
    assert len(body["data"][0]["faces"][0]["vec"]) == 512


async def test_max_size_detects_at_a_lower_resolution(serve: Any) -> None:
    client = await serve()
    body = await (
        await client.post(
            "/extract", json={"images": {"data": [b64(jpeg(640, 640))]}, "max_size": [320, 320]}
        )
    ).json()
    # The image is letterboxed into the top-left 320x320 of the 640x640 input (scale 0.5): in
    # the original, the planted faces appear at twice their detector coordinates.
    face = by_prob(body["data"][0]["faces"])[0]
    assert np.abs(np.array(face["bbox"]) - np.array(PLANTED[0].bbox) * 2).max() <= 2
    bad = await client.post(
        "/extract", json={"images": {"data": [b64(jpeg())]}, "max_size": [2000, 10]}
    )
    assert bad.status == 400
    assert (await bad.json())["error"]["code"] == "invalid_field"


async def test_msgpack_in_and_out(serve: Any) -> None:
    client = await serve()
    payload = msgpack.packb(
        {"images": {"data": [jpeg(1280, 960)]}, "msgpack": True}, use_bin_type=True
    )
    resp = await client.post(
        "/extract", data=payload, headers={"Content-Type": "application/msgpack"}
    )
    assert resp.status == 200
    assert resp.content_type == "application/msgpack"
    body = msgpack.unpackb(await resp.read(), raw=False)
    assert len(body["data"][0]["faces"]) == 3
    assert (
        np.abs(np.array(by_prob(body["data"][0]["faces"])[0]["bbox"]) - expected_bbox(0)).max() <= 1
    )
    broken = await client.post(
        "/extract", data=b"\xc1\xc1", headers={"Content-Type": "application/msgpack"}
    )
    assert broken.status == 400
    assert (await broken.json())["error"]["code"] == "invalid_msgpack"


async def test_one_bad_image_does_not_fail_its_neighbours(serve: Any) -> None:
    client = await serve(max_image_pixels=1_000_000)
    good = jpeg(1024, 768)
    truncated = good[: len(good) // 2]
    corrupt = b"\xff\xd8" + b"not really a jpeg" * 20
    huge = jpeg(1200, 1000)  # 1.2 MP > 1 MP limit
    data = [
        b64(good),
        "%%%not-base64%%%",
        b64(truncated),
        b64(corrupt),
        b64(huge),
        b64(png(1024, 768)),
    ]
    resp = await client.post("/extract", json={"images": {"data": data}})
    assert resp.status == 200
    entries = (await resp.json())["data"]
    assert [e["status"] for e in entries] == ["ok", "error", "error", "error", "error", "ok"]
    assert [e.get("code") for e in entries] == [
        None,
        "invalid_base64",
        "corrupt_image",
        "corrupt_image",
        "image_too_large",
        None,
    ]
    assert "1200x1000" in entries[4]["error"]
    assert len(entries[0]["faces"]) == 3 and len(entries[5]["faces"]) == 3
    # The server keeps serving.
    again = await client.post("/extract", json={"images": {"data": [b64(good)]}})
    assert again.status == 200


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b'{"images": {"data": []}}', {"Content-Type": "application/json"}, 400, "no_images"),
        (b'{"images": "x"}', {"Content-Type": "application/json"}, 400, "invalid_field"),
        (
            b'{"images": {"data": ["a"]}, "threshold": 2}',
            {"Content-Type": "application/json"},
            400,
            "invalid_field",
        ),
        (
            b'{"images": {"data": ["a"]}, "limit_faces": "x"}',
            {"Content-Type": "application/json"},
            400,
            "invalid_field",
        ),
        (
            b'{"images": {"data": ["a"]}, "return_landmarks": "maybe"}',
            {"Content-Type": "application/json"},
            400,
            "invalid_field",
        ),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400, "invalid_body"),
        (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
        (b"", {"Content-Type": "application/json"}, 400, "invalid_body"),
        (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ],
)
async def test_bad_requests_get_json_errors(
    serve: Any, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    client = await serve()
    resp = await client.post("/extract", data=body, headers=headers)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["code"] == code
    assert error["message"]
    assert (await client.get("/health/live")).status == 200


async def test_too_many_images_and_oversized_body(serve: Any) -> None:
    client = await serve(max_images_per_request=2, max_body_bytes=200_000)
    resp = await client.post("/extract", json={"images": {"data": ["a", "b", "c"]}})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "too_many_images"
    big = {"images": {"data": ["A" * 300_000]}}
    resp = await client.post("/extract", json=big)
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["code"] == "payload_too_large"
    assert "MAX_BODY_BYTES" in error["message"]
    assert (
        await client.post("/extract", json={"images": {"data": [b64(jpeg(160, 120))]}})
    ).status == 200


async def test_unknown_routes_and_methods_are_json(serve: Any) -> None:
    client = await serve()
    resp = await client.get("/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/extract")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_concurrent_requests_share_batches(serve: Any, tmp_path: Path) -> None:
    # A detector slow enough (tens of ms) that requests pile up behind a running batch.
    write_models(tmp_path, trunk_layers=4, trunk_channels=16)
    client = await serve(models_dir=tmp_path, det_batch_size=8, batch_window_ms=20)
    payload = {"images": {"data": [b64(jpeg(seed=7))]}, "extract_embedding": False}
    n = 16
    responses = await asyncio.gather(*(client.post("/extract", json=payload) for _ in range(n)))
    assert [r.status for r in responses] == [200] * n
    text = await (await client.get("/metrics")).text()
    calls = metric(text, "appliance_backend_calls_total", model="detector")
    items = metric(text, "appliance_batch_size_sum", model="detector")
    assert items == n
    assert calls < n, f"{n} requests took {calls} detector calls: no batching happened"
    assert metric(text, "appliance_batch_items_total", model="detector", source="rest") == n
    assert metric(text, "appliance_faces_detected_total") == 3 * n
    assert (
        metric(
            text, "appliance_http_request_duration_seconds_count", route="/extract", status="200"
        )
        == n
    )


async def test_full_queue_answers_503_with_retry_after(serve: Any, tmp_path: Path) -> None:
    write_models(tmp_path, trunk_layers=6, trunk_channels=24)
    client = await serve(models_dir=tmp_path, det_batch_size=1, max_queue=1, retry_after_s=3)
    payload = {"images": {"data": [b64(jpeg(seed=9))]}, "extract_embedding": False}
    responses = await asyncio.gather(*(client.post("/extract", json=payload) for _ in range(8)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) >= 1
    assert statuses.count(503) >= 1
    for r in responses:
        if r.status == 503:
            assert r.headers["Retry-After"] == "3"
            assert (await r.json())["error"]["code"] == "overloaded"
    text = await (await client.get("/metrics")).text()
    assert metric(text, "appliance_errors_total", code="overloaded") == statuses.count(503)
    # Once the burst is over, the service answers again.
    assert (await client.post("/extract", json=payload)).status == 200


async def test_bearer_token(serve: Any) -> None:
    client = await serve(api_token="s3cret")
    payload = {"images": {"data": [b64(jpeg())]}}
    resp = await client.post("/extract", json=payload)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await resp.json())["error"]["code"] == "unauthorized"
    wrong = await client.post("/extract", json=payload, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    ok = await client.post("/extract", json=payload, headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200
    assert (await client.get("/info")).status == 401
    for public in ("/health/live", "/health/ready", "/metrics"):
        assert (await client.get(public)).status == 200
    info = await (await client.get("/info", headers={"Authorization": "Bearer s3cret"})).json()
    assert info["settings"]["api_token"] is True
    assert "s3cret" not in str(info)


async def test_url_inputs_are_off_by_default_and_refuse_private_targets(
    serve: Any, aiohttp_server: Any
) -> None:
    image = jpeg(1280, 960)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/jpeg")

    files = web.Application()
    files.router.add_get("/face.jpg", handler)
    server = await aiohttp_server(files)
    url = f"http://127.0.0.1:{server.port}/face.jpg"

    client = await serve()
    body = await (await client.post("/extract", json={"images": {"urls": [url]}})).json()
    assert body["data"][0]["code"] == "urls_disabled"

    client = await serve(allow_url_inputs=True)
    urls = [
        url,
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/x.jpg",
        "file:///etc/passwd",
        f"http://localhost:{server.port}/face.jpg",
    ]
    body = await (await client.post("/extract", json={"images": {"urls": urls}})).json()
    assert [d.get("code") for d in body["data"]] == ["url_refused"] * 5
    assert "URL_ALLOWLIST" in body["data"][0]["error"]

    client = await serve(allow_url_inputs=True, url_allowlist=("127.0.0.1/32",))
    body = await (await client.post("/extract", json={"images": {"urls": [url, url + "x"]}})).json()
    assert body["data"][0]["status"] == "ok"
    assert len(body["data"][0]["faces"]) == 3
    assert body["data"][1]["code"] == "url_fetch_failed"
    assert "404" in body["data"][1]["error"]


async def test_draw_detections_draws_the_planted_boxes(serve: Any) -> None:
    client = await serve()
    img = np.zeros((960, 1280, 3), np.uint8)
    _ok, buf = cv2.imencode(".png", img)
    resp = await client.post("/draw_detections", json={"images": {"data": [b64(buf.tobytes())]}})
    assert resp.status == 200
    assert resp.content_type == "image/jpeg"
    drawn = cv2.imdecode(np.frombuffer(await resp.read(), np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == (960, 1280, 3)
    x1, y1, x2, y2 = (int(v) for v in expected_bbox(0))
    edge = drawn[(y1 + y2) // 2, x1 - 1 : x1 + 3]
    assert edge[:, 1].max() > 150  # green box edge
    assert drawn[(y1 + y2) // 2, (x1 + x2) // 2 + 30].max() < 40  # inside stays dark
    bad = await client.post("/draw_detections", json={"images": {"data": [b64(b"garbage")]}})
    assert bad.status == 422
    assert (await bad.json())["error"]["code"] == "unprocessable_image"


async def test_multipart_variants(serve: Any) -> None:
    client = await serve()
    form = FormData()
    form.add_field("images", jpeg(1280, 960), filename="a.jpg", content_type="image/jpeg")
    form.add_field("images", b"garbage", filename="b.jpg", content_type="image/jpeg")
    form.add_field("return_landmarks", "true")
    form.add_field("threshold", "0.8")
    resp = await client.post("/multipart/extract", data=form)
    assert resp.status == 200
    entries = (await resp.json())["data"]
    assert [e["status"] for e in entries] == ["ok", "error"]
    assert [f["prob"] for f in entries[0]["faces"]] == pytest.approx([0.95, 0.88])
    assert entries[0]["faces"][0]["landmarks"] is not None

    form = FormData()
    form.add_field("images", jpeg(1280, 960), filename="a.jpg", content_type="image/jpeg")
    resp = await client.post("/multipart/draw_detections", data=form)
    assert resp.status == 200 and resp.content_type == "image/jpeg"

    resp = await client.post("/multipart/extract", json={"images": {}})
    assert resp.status == 415
    empty = MultipartWriter("form-data")
    empty.append("0.5").set_content_disposition("form-data", name="threshold")
    resp = await client.post("/multipart/extract", data=empty)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "no_images"


async def test_info_health_openapi_and_docs(serve: Any, models_dir: Path) -> None:
    client = await serve()
    info = await (await client.get("/info")).json()
    assert info["backend"] == "onnx"
    assert "TensorRT not usable" in info["backend_reason"]
    det = info["models"]["detector"]
    assert det["name"] == "test_scrfd" and det["input_size"] == [640, 640] and det["max_batch"] == 4
    import hashlib

    assert det["sha256"] == hashlib.sha256((models_dir / "det.onnx").read_bytes()).hexdigest()
    assert info["models"]["recognizer"]["normalizes_input"] is False
    assert info["jpeg_decoder"] in ("turbojpeg", "opencv")
    ready = await client.get("/health/ready")
    assert ready.status == 200
    assert (await ready.json())["checks"]["models"]["ok"] is True
    spec = await (await client.get("/openapi.json")).json()
    assert {
        "/extract",
        "/draw_detections",
        "/multipart/extract",
        "/info",
        "/health/ready",
        "/metrics",
    } <= set(spec["paths"])
    docs = await client.get("/docs")
    assert docs.status == 200 and "openapi.json" in await docs.text()
    metrics = await (await client.get("/metrics")).text()
    assert "appliance_queue_depth" in metrics


async def test_critical_policy_pauses_inference(serve: Any) -> None:
    from appliance.api import state
    from appliance.api.policy import LoadPolicy

    client = await serve(retry_after_s=5)
    board = client.app[state.POLICY]
    board.publish(
        LoadPolicy(
            state="critical",
            fps_factor=0,
            accept_new_streams=False,
            inference_paused=True,
            reason="tj 98 C",
        )
    )
    resp = await client.post("/extract", json={"images": {"data": [b64(jpeg())]}})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert (await resp.json())["error"]["code"] == "inference_paused"
    board.publish(LoadPolicy())
    assert (await client.post("/extract", json={"images": {"data": [b64(jpeg())]}})).status == 200


def test_landmark_template_sanity() -> None:
    # The planted faces use the template: the first face's left eye lands at a known pixel.
    face = PLANTED[0]
    assert face.landmarks[0] == pytest.approx(
        (100 + ARCFACE_TEMPLATE[0][0] * 80 / 112, 120 + ARCFACE_TEMPLATE[0][1] * 80 / 112)
    )
