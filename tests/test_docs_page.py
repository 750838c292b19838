"""Swagger UI at /docs in headless Chromium: served from the package's files (no CDN), it
renders every operation, and "Try it out" on /extract answers from the running server."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests import test_live_view
from tests.test_live_view import ARTIFACTS, DevTools

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# pytest finds fixtures by the name in the test module: reuse the live view's Chromium.
browser = test_live_view.browser


async def test_swagger_ui_renders_offline_and_try_it_out_runs_extract(
    serve: Any, browser: DevTools
) -> None:
    server = await serve()
    base = f"http://{server.server.host}:{server.server.port}"
    spec = await (await server.get("/openapi.json")).json()
    operations = sum(len(ops) for ops in spec["paths"].values())
    await browser.call("Page.navigate", url=f"{base}/docs")
    rendered = await browser.wait_for(
        f"document.querySelectorAll('.opblock').length >= {operations}"
        " && document.querySelectorAll('.opblock').length"
    )
    assert rendered == operations
    paths = await browser.evaluate(
        "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path)"
    )
    assert set(paths) == set(spec["paths"])
    # Everything the page loaded came from the appliance itself.
    resources = await browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(base) for url in resources), resources
    assert f"{base}/docs/static/swagger-ui-bundle.js" in resources

    # Try it out: open /extract, switch to editing, execute the shipped example.
    await browser.evaluate(
        "document.querySelector('#operations-default-extract .opblock-summary-control').click()"
    )
    await browser.wait_for("!!document.querySelector('#operations-default-extract .try-out__btn')")
    await browser.evaluate(
        "document.querySelector('#operations-default-extract .try-out__btn').click()"
    )
    await browser.wait_for("!!document.querySelector('#operations-default-extract .execute')")
    await browser.evaluate("document.querySelector('#operations-default-extract .execute').click()")
    status = await browser.wait_for(
        "(document.querySelector('#operations-default-extract .live-responses-table"
        " tr.response .response-col_status') || {}).textContent"
    )
    assert status.strip() == "200"
    text = await browser.evaluate(
        "document.querySelector('#operations-default-extract .live-responses-table"
        " .microlight, #operations-default-extract .live-responses-table pre').textContent"
    )
    answer = json.loads(text)
    assert answer["data"][0]["status"] == "ok"
    assert len(answer["data"][0]["faces"]) == 3  # the planted test detector's faces

    await browser.evaluate("document.querySelector('#operations-default-extract').scrollIntoView()")
    shot = await browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    ARTIFACTS.mkdir(exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "swagger-ui-try-extract.png").write_bytes(png)
    assert png.startswith(b"\x89PNG")
