"""The URL guard against real listeners on loopback that record every hit (issue 12 defect 1).

The origin server (127.0.0.3, allow-listed) redirects wherever a test asks; recorders on
127.0.0.1, 127.0.0.2 and ::1 stand for the appliance's own network and must never be hit
when the guard refuses. Link-local, metadata and private addresses are checked without any
traffic: only loopback is ever contacted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from appliance.api.errors import BadRequest
from appliance.api.urls import (
    UrlFetchFailed,
    UrlRefused,
    UrlTimeout,
    check_url,
    fetch_image,
    literal_address,
    make_session,
    parse_target,
)
from tests.helpers import jpeg

ORIGIN_HOST = "127.0.0.3"
ORIGIN_ALLOW = (f"{ORIGIN_HOST}/32",)
IMAGE = jpeg(32, 24)


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Listener:
    server: TestServer
    hits: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


@dataclass
class Net:
    origin: Listener
    recorders: dict[str, Listener]
    release: asyncio.Event

    def origin_url(self, path: str) -> str:
        return f"http://{ORIGIN_HOST}:{self.origin.port}{path}"

    def redirect(self, target: str, status: int = 302) -> str:
        return str(URL(self.origin_url("/redirect")).with_query(to=target, status=str(status)))

    def all_hits(self) -> dict[str, list[str]]:
        return {host: rec.hits for host, rec in self.recorders.items() if rec.hits}


async def start_listener(host: str, release: asyncio.Event) -> Listener:
    listener: Listener

    async def record(request: web.Request) -> web.StreamResponse:
        listener.hits.append(request.path_qs)
        listener.headers.append(dict(request.headers))
        if request.path == "/redirect":
            status = int(request.query.get("status", "302"))
            return web.Response(status=status, headers={"Location": request.query["to"]})
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        if request.path == "/slow-headers":
            await asyncio.wait_for(release.wait(), 10)
        if request.path == "/slow-body":
            resp = web.StreamResponse(headers={"Content-Length": str(len(IMAGE))})
            await resp.prepare(request)
            await resp.write(IMAGE[:10])
            await asyncio.wait_for(release.wait(), 10)
            return resp
        if request.path == "/big":
            return web.Response(body=b"\xff" * 5000, content_type="image/jpeg")
        return web.Response(body=IMAGE, content_type="image/jpeg")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", record)
    listener = Listener(TestServer(app, host=host))
    await listener.server.start_server()
    return listener


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    release = asyncio.Event()
    hosts = ["127.0.0.1", "127.0.0.2"] + (["::1"] if ipv6_loopback_available() else [])
    origin = await start_listener(ORIGIN_HOST, release)
    recorders = {h: await start_listener(h, release) for h in hosts}
    yield Net(origin, recorders, release)
    release.set()
    for listener in [origin, *recorders.values()]:
        await listener.server.close()


def loopback_spellings(net: Net) -> list[str]:
    """127.0.0.2 in every spelling a resolver accepts, ::1, and a name that resolves to loopback."""
    port = net.recorders["127.0.0.2"].port
    urls = [
        f"http://127.0.0.2:{port}/dotted",
        f"http://2130706434:{port}/decimal",
        f"http://0x7f000002:{port}/hex",
        f"http://0177.0.0.2:{port}/octal",
        f"http://0x7f.0.0.2:{port}/mixed",
        f"http://127.2:{port}/short",
        f"http://127.0.0.2.:{port}/trailing-dot",
        f"http://[::ffff:127.0.0.2]:{port}/mapped",
        f"http://[::ffff:7f00:2]:{port}/mapped-hex",
        f"http://localhost:{net.recorders['127.0.0.1'].port}/name",
    ]
    if "::1" in net.recorders:
        urls.append(f"http://[::1]:{net.recorders['::1'].port}/ipv6")
    return urls


async def test_defect1_literal_loopback_in_every_spelling_is_refused_unhit(net: Net) -> None:
    async with make_session(ORIGIN_ALLOW, 5) as session:
        for url in loopback_spellings(net):
            with pytest.raises(UrlRefused) as info:
                await fetch_image(session, url, 1 << 20, ORIGIN_ALLOW)
            assert info.value.status == 403
            assert "URL_ALLOWLIST" in info.value.message
    assert net.all_hits() == {}


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_defect1_redirects_to_loopback_are_checked_and_unhit(net: Net, status: int) -> None:
    targets = loopback_spellings(net)
    async with make_session(ORIGIN_ALLOW, 5) as session:
        for target in targets:
            with pytest.raises(UrlRefused):
                await fetch_image(session, net.redirect(target, status), 1 << 20, ORIGIN_ALLOW)
    assert net.all_hits() == {}
    assert len(net.origin.hits) == len(targets)  # the first hop was fetched, nothing after


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/latest/meta-data/",
        "http://0xa9fea9fe/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fe80::1]/",
        "http://[fe80::1%25eth0]/",
        "file:///etc/passwd",
        "gopher://127.0.0.2:70/",
    ],
)
async def test_defect1_redirects_to_link_local_or_other_schemes_are_refused(
    net: Net, target: str
) -> None:
    async with make_session(ORIGIN_ALLOW, 5) as session:
        with pytest.raises(UrlRefused):
            await fetch_image(session, net.redirect(target), 1 << 20, ORIGIN_ALLOW)
    assert len(net.origin.hits) == 1
    assert net.all_hits() == {}


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",  # cloud metadata
        "2852039166",  # the same, decimal
        "0xa9.0xfe.0xa9.0xfe",
        "10.0.0.1",
        "012.0.0.1",  # octal 10.0.0.1
        "172.16.5.4",
        "192.168.1.1",
        "3232235777",  # 192.168.1.1
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "0",
        "224.0.0.1",
        "255.255.255.255",
        "[::]",
        "[::1]",
        "[fc00::1]",
        "[fe80::1]",
        "[ff02::1]",
        "[::ffff:10.0.0.1]",
        "[64:ff9b::a9fe:a9fe]",  # NAT64 of the metadata address
        "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
        "[::127.0.0.1]",  # IPv4-compatible
    ],
)
def test_private_link_local_and_special_addresses_are_refused_without_traffic(host: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(URL(f"http://{host}/x.jpg"), ())


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("example.com", None),
        ("1e3", None),
        ("0x", None),
        ("", None),
    ],
)
def test_literal_address_parses_every_spelling(host: str, expected: str | None) -> None:
    address = literal_address(host)
    assert (str(address) if address is not None else None) == expected


def test_public_addresses_and_allowlist_pass_the_check() -> None:
    check_url(URL("http://8.8.8.8/a.jpg"), ())
    check_url(URL("http://[2001:4860:4860::8888]/a.jpg"), ())
    check_url(URL("http://10.1.2.3/a.jpg"), ("10.0.0.0/8",))
    check_url(URL("http://camera.local/a.jpg"), ("camera.local",))
    check_url(URL("http://CAMERA.local./a.jpg"), ("camera.local",))
    with pytest.raises(UrlRefused):
        check_url(URL("http://10.1.2.3/a.jpg"), ("10.2.0.0/16", "camera.local"))


async def test_allowlist_semantics_kept_for_addresses_names_and_redirects(net: Net) -> None:
    rec2, rec1 = net.recorders["127.0.0.2"], net.recorders["127.0.0.1"]
    allow = (*ORIGIN_ALLOW, "127.0.0.2/32", "localhost")
    async with make_session(allow, 5) as session:
        assert (
            await fetch_image(session, f"http://127.0.0.2:{rec2.port}/a", 1 << 20, allow) == IMAGE
        )
        target = f"http://127.0.0.2:{rec2.port}/b"
        assert await fetch_image(session, net.redirect(target), 1 << 20, allow) == IMAGE
        by_name = f"http://localhost:{rec1.port}/c"
        assert await fetch_image(session, by_name, 1 << 20, allow) == IMAGE
        # Allow-listing 127.0.0.2 does not open its neighbour.
        with pytest.raises(UrlRefused):
            await fetch_image(session, f"http://127.0.0.4:{rec2.port}/d", 1 << 20, allow)
    assert rec2.hits == ["/a", "/b"]
    assert rec1.hits == ["/c"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Token": "a\r\nHost: internal"},
        {"X-Token": "a\nb"},
        {"X-Token": "a\x00b"},
        {"Bad Name": "v"},
        {"X-Token\r\nX-Evil": "v"},
    ],
)
async def test_defect1_crlf_in_img_req_headers_is_a_400_and_nothing_is_sent(
    net: Net, headers: dict[str, str]
) -> None:
    async with make_session(ORIGIN_ALLOW, 5) as session:
        with pytest.raises(BadRequest) as info:
            await fetch_image(session, net.origin_url("/a"), 1 << 20, ORIGIN_ALLOW, headers)
    assert info.value.status == 400
    assert "img_req_headers" in info.value.message
    assert net.origin.hits == []


async def test_caller_headers_go_to_the_first_origin_only(net: Net) -> None:
    allow = (*ORIGIN_ALLOW, "127.0.0.2/32")
    rec2 = net.recorders["127.0.0.2"]
    async with make_session(allow, 5) as session:
        same = net.redirect(net.origin_url("/same"))
        other = net.redirect(f"http://127.0.0.2:{rec2.port}/other")
        for url in (same, other):
            await fetch_image(session, url, 1 << 20, allow, {"Authorization": "Bearer s3cret"})
    assert [h.get("Authorization") for h in net.origin.headers] == ["Bearer s3cret"] * 3
    assert rec2.headers[0].get("Authorization") is None


async def test_defect1_timeout_message_says_what_timed_out(net: Net) -> None:
    async with make_session(ORIGIN_ALLOW, 0.3) as session:
        with pytest.raises(UrlTimeout) as headers_info:
            await fetch_image(session, net.origin_url("/slow-headers"), 1 << 20, ORIGIN_ALLOW)
        with pytest.raises(UrlTimeout) as body_info:
            await fetch_image(session, net.origin_url("/slow-body"), 1 << 20, ORIGIN_ALLOW)
    url = net.origin_url("")
    assert headers_info.value.message == (
        f"fetching {url}/slow-headers timed out after 0.3 s (URL_TIMEOUT_S) while connecting "
        f"to {ORIGIN_HOST} or waiting for its response headers"
    )
    assert body_info.value.message == (
        f"fetching {url}/slow-body timed out after 0.3 s (URL_TIMEOUT_S) while reading the "
        f"body from {ORIGIN_HOST}"
    )
    assert headers_info.value.status == 504 and headers_info.value.code == "url_timeout"


async def test_redirect_loops_and_oversize_bodies_fail_cleanly(net: Net) -> None:
    async with make_session(ORIGIN_ALLOW, 5) as session:
        with pytest.raises(UrlFetchFailed, match="redirected more than 3 times"):
            await fetch_image(session, net.origin_url("/loop"), 1 << 20, ORIGIN_ALLOW)
        with pytest.raises(UrlFetchFailed, match="larger than 4096 bytes"):
            await fetch_image(session, net.origin_url("/big"), 4096, ORIGIN_ALLOW)
    assert net.origin.hits == ["/loop"] * 4 + ["/big"]


async def test_defect1_through_the_server_each_refused_url_is_its_own_error(
    net: Net, serve: Any
) -> None:
    """End to end: the served app fetches with the guard; refusals are per-image entries."""
    client = await serve(allow_url_inputs=True, url_allowlist=ORIGIN_ALLOW)
    rec = net.recorders["127.0.0.2"]
    urls = [
        net.origin_url("/fine.jpg"),
        net.redirect(f"http://127.0.0.2:{rec.port}/via-redirect"),
        f"http://2130706434:{rec.port}/decimal",
    ]
    resp = await client.post("/extract", json={"images": {"urls": urls}})
    body = await resp.json()
    assert resp.status == 200
    assert [e["status"] for e in body["data"]] == ["ok", "error", "error"]
    assert [e.get("code") for e in body["data"][1:]] == ["url_refused", "url_refused"]
    resp = await client.post(
        "/extract",
        json={
            "images": {"urls": [net.origin_url("/fine.jpg")]},
            "img_req_headers": {"X-Key": "a\r\nX-Injected: 1"},
        },
    )
    body = await resp.json()
    assert resp.status == 200
    assert body["data"][0]["code"] == "bad_request"
    assert "CR, LF or NUL" in body["data"][0]["error"]
    # The origin served the fine image and the redirect; the header request never left.
    assert [h.split("?")[0] for h in net.origin.hits] == ["/fine.jpg", "/redirect"]
    assert net.all_hits() == {}


@pytest.mark.parametrize("url", ["http://[::3]@", "http://[::1", "http://a:b:c/"])
def test_urls_the_parser_chokes_on_are_refused_not_a_crash(url: str) -> None:
    """Found by the atheris target: yarl raised IndexError on "http://[::3]@" (a 500 before)."""
    with pytest.raises(UrlRefused, match=r"is not a valid URL|only http"):
        parse_target(url, ())
