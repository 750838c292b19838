"""The live view page in headless Chromium (fake webcam), driven over the DevTools Protocol.

Chromium is Debian's `chromium` package (requirements-apt.txt); the test skips, saying so,
where it is missing. It talks only to the appliance on 127.0.0.1, and the flags below keep
Chromium itself off the network (component updates, sync, background fetches).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest

from appliance.api import state
from appliance.api.policy import LoadPolicy
from tests.conftest import PLANTED
from tests.helpers import jpeg

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BOX_COLOUR = (0x00, 0xE5, 0xFF)  # the box colour of app.js, in RGB
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--window-size=1280,800",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs, over aiohttp's WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.console: list[str] = []
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self.pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"]["args"]
                self.console.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in args)
                )

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        assert "error" not in reply, f"{method}: {reply['error']}"
        result: dict[str, Any] = reply["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll a page expression until it is truthy (the page has no event we can await)."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, (
                f"page never satisfied {expression!r}; console: {self.console[-10:]}; "
                f"state: {await self.evaluate('JSON.stringify(window.liveView)')}"
            )
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[DevTools]:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "Chromium is not installed (apt-get install chromium; see requirements-apt.txt)"
        )
    profile = tmp_path / "profile"
    proc = await asyncio.create_subprocess_exec(
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        # Chromium writes its debugging port to this file once it listens.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.returncode is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                devtools = DevTools(ws)
                await devtools.call("Runtime.enable")
                await devtools.call("Page.enable")
                await devtools.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=1280,
                    height=800,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                try:
                    yield devtools
                finally:
                    await devtools.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def test_live_view_streams_the_webcam_and_draws_the_planted_faces(
    serve: Any, browser: DevTools
) -> None:
    server = await serve(api_token="view-token", stream_stats_interval_s=0.5)
    base = f"http://{server.server.host}:{server.server.port}"
    # The token comes in the page's query (a bookmark); the page sends it as ?token= on the
    # WebSocket, since browsers cannot set headers there.
    await browser.call("Page.navigate", url=f"{base}/?token=view-token&fps=10&autostart=1")

    live = json.loads(
        await browser.wait_for(
            "window.liveView && window.liveView.results >= 3 && window.liveView.serverStats"
            " && window.liveView.serverStats.processed >= 3"
            " && JSON.stringify(window.liveView)"
        )
    )
    assert live["connected"] is True
    # Chromium's fake camera is 640x480: letterboxed at scale 1, so every planted face comes
    # back at its planted box.
    assert live["frameSize"] == [640, 480]
    faces = live["lastResult"]["faces"]
    assert sorted(tuple(f["bbox"]) for f in faces) == sorted(
        tuple(round(v) for v in p.bbox) for p in PLANTED
    )
    assert all(len(f["landmarks"]) == 5 for f in faces)
    assert live["serverStats"]["processed"] >= 3
    assert live["status"]["state"] == "ok"

    # The stats panel shows the numbers.
    text = await browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('dd')].map(e => [e.id, e.textContent]))"
    )
    assert int(text["stat-results"]) >= 3
    assert text["stat-faces"] == "3"
    assert text["stat-latency"].endswith(" ms")
    assert float(text["stat-fps"]) > 0
    assert await browser.evaluate("document.getElementById('governor').textContent") == (
        "governor: ok"
    )

    # The boxes are drawn: the left edge of the first planted face is box-coloured on the canvas.
    x1, y1, _, y2 = (round(v) for v in PLANTED[0].bbox)
    pixel = await browser.evaluate(
        f"Array.from(document.getElementById('view').getContext('2d')"
        f".getImageData({x1}, {(y1 + y2) // 2}, 1, 1).data)"
    )
    assert np.abs(np.array(pixel[:3]) - BOX_COLOUR).max() <= 8, pixel

    shot = await browser.call("Page.captureScreenshot", format="png")
    ARTIFACTS.mkdir(exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "live_view.png").write_bytes(png)
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape[:2] == (800, 1280)

    # A governor change reaches the page: warm halves the stream's fps cap.
    server.server.app[state.POLICY].publish(LoadPolicy(state="warm", fps_factor=0.5))
    await browser.wait_for("document.getElementById('governor').textContent === 'governor: warm'")
    assert await browser.evaluate("document.getElementById('stat-max-fps').textContent") == "5"

    # Critical: the server sheds the stream with 1013 and the page says why.
    server.server.app[state.POLICY].publish(
        LoadPolicy(state="critical", fps_factor=0.0, inference_paused=True)
    )
    await browser.wait_for("window.liveView.closeCode === 1013")
    message = await browser.evaluate("document.getElementById('message').textContent")
    assert "critical" in message


async def test_live_view_shows_names_over_faces_when_identify_is_on(
    serve: Any, browser: DevTools
) -> None:
    # Any threshold passes: the one enrolled subject names every face, so the test shows the
    # page draws what the stream answers (tests/test_gallery_api.py checks who is who).
    server = await serve(identify_threshold=-1.0)
    resp = await server.post("/gallery/subjects", json={"subject": "ada"})
    assert resp.status == 201
    image = base64.b64encode(jpeg(640, 480)).decode()
    resp = await server.post("/gallery/subjects/ada/faces", json={"images": {"data": [image]}})
    assert resp.status == 201
    base = f"http://{server.server.host}:{server.server.port}"
    await browser.call("Page.navigate", url=f"{base}/?fps=10&identify=1&autostart=1")
    labels = json.loads(
        await browser.wait_for(
            "window.liveView && window.liveView.results >= 3"
            " && window.liveView.labels.length === 3 && JSON.stringify(window.liveView.labels)"
        )
    )
    faces = json.loads(await browser.evaluate("JSON.stringify(window.liveView.lastResult.faces)"))
    assert {f["identity"] for f in faces} == {"ada"}
    assert sorted(labels) == sorted(f"ada #{f['track_id']}" for f in faces)
    assert len({f["track_id"] for f in faces}) == 3
    shot = await browser.call("Page.captureScreenshot", format="png")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "live_view_identify.png").write_bytes(base64.b64decode(shot["data"]))


async def test_live_view_reports_a_wrong_token(serve: Any, browser: DevTools) -> None:
    server = await serve(api_token="right")
    base = f"http://{server.server.host}:{server.server.port}"
    await browser.call("Page.navigate", url=f"{base}/?token=wrong&autostart=1")
    error = await browser.wait_for("window.liveView && window.liveView.error")
    assert "token" in error
    assert await browser.evaluate("window.liveView.results") == 0


async def test_live_view_streams_a_local_video_file(
    serve: Any, browser: DevTools, tmp_path: Path
) -> None:
    video = tmp_path / "clip.webm"
    # VP8 in WebM: a format Chromium plays without proprietary codecs.
    fourcc = cv2.VideoWriter_fourcc(*"VP80")  # type: ignore[attr-defined]
    writer = cv2.VideoWriter(str(video), fourcc, 10, (640, 480))
    assert writer.isOpened()
    for i in range(30):
        frame = np.full((480, 640, 3), 40, np.uint8)
        cv2.circle(frame, (100 + 15 * i, 240), 40, (200, 120, 40), -1)
        writer.write(frame)
    writer.release()
    server = await serve()
    base = f"http://{server.server.host}:{server.server.port}"
    await browser.call("Page.navigate", url=f"{base}/?fps=10")
    await browser.wait_for("document.readyState === 'complete' && !!window.liveView")
    await browser.evaluate("document.querySelector('input[value=file]').click()")
    document = await browser.call("DOM.getDocument")
    node = await browser.call(
        "DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file"
    )
    await browser.call("DOM.setFileInputFiles", files=[str(video)], nodeId=node["nodeId"])
    await browser.evaluate("document.getElementById('start').click()")
    live = json.loads(
        await browser.wait_for("window.liveView.results >= 2 && JSON.stringify(window.liveView)")
    )
    assert live["frameSize"] == [640, 480]
    assert len(live["lastResult"]["faces"]) == 3
    assert live["error"] is None
