"""Model store: downloads from a real HTTP server on 127.0.0.1, checksums, resume, Drive's
confirm step, and the errors an operator sees."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog

from appliance.models.registry import ModelInfo, ModelRegistry
from appliance.models.store import (
    ChecksumMismatchError,
    HTTPStatusError,
    IncompleteDownloadError,
    ModelMissingError,
    ModelStatus,
    ModelStore,
    NotAModelError,
    OfflineError,
    UnknownModelError,
    UnverifiedModelError,
    file_digests,
)

# 300 kB of non-repeating bytes: several 64 kB chunks, and a wrong resume shows in the hash.
PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(300_000))
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 64 * 1024

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclasses.dataclass
class Seen:
    path: str
    query: dict[str, str]
    range: str | None
    cookie: str | None


class FileServer:
    """Routes by path to small handler functions; records every request it answered."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[Seen] = []
        self.body_bytes_sent = 0
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                server.seen.append(
                    Seen(
                        parts.path,
                        dict(urllib.parse.parse_qsl(parts.query)),
                        self.headers.get("Range"),
                        self.headers.get("Cookie"),
                    )
                )
                handler = server.routes.get(parts.path)
                if handler is None:
                    self.send_error(404, "Not Found")
                    return
                handler(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key.replace("_", "-"), value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        self.body_bytes_sent += len(body)

    def file(self, data: bytes = PAYLOAD, honour_range: bool = True) -> Handler:
        def handle(h: BaseHTTPRequestHandler) -> None:
            wanted = h.headers.get("Range")
            if honour_range and wanted:
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    h.send_response(416)
                    h.send_header("Content-Range", f"bytes */{len(data)}")
                    h.send_header("Content-Length", "0")
                    h.end_headers()
                    return
                self.send(
                    h,
                    206,
                    data[start:],
                    Content_Type="application/octet-stream",
                    Content_Range=f"bytes {start}-{len(data) - 1}/{len(data)}",
                )
                return
            self.send(h, 200, data, Content_Type="application/octet-stream")

        return handle

    def html(self, page: str, status: int = 200, **headers: str) -> Handler:
        def handle(h: BaseHTTPRequestHandler) -> None:
            self.send(h, status, page.encode(), Content_Type="text/html; charset=utf-8", **headers)

        return handle


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    # Captured, so the store's events are checked and never reach a stream another test
    # configured structlog with (and pytest has closed since).
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(timeout=5)


def model(
    name: str = "m", url: str | None = None, checksum: str | None = f"md5:{PAYLOAD_MD5}"
) -> ModelInfo:
    return ModelInfo(
        name=name,
        family="scrfd",
        file=f"{name}.onnx",
        input_shape=(3, 640, 640),
        url=url,
        checksum=checksum,
    )


def make_store(tmp_path: Path, *infos: ModelInfo, trust: bool = False) -> ModelStore:
    registry = ModelRegistry({i.name: i for i in infos})
    return ModelStore(tmp_path / "models", registry, trust_unverified=trust, chunk_size=CHUNK)


def leftovers(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.models_dir.iterdir()) if store.models_dir.exists() else []


def test_file_digests_match_published_test_vectors(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    # FIPS 180-2 and RFC 1321 test vectors for "abc".
    sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_digests(path, "md5") == ("900150983cd24fb0d6963f7d28e17f72", sha)
    assert file_digests(path, "sha256", chunk_size=1) == (sha, sha)
    assert file_digests(path, None) == (None, sha)


def test_plain_download_verifies_md5_and_reports_sha256(
    server: FileServer, tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    server.routes["/m.onnx"] = server.file()
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))
    calls: list[tuple[int, int | None]] = []

    result = store.fetch_verified("m", progress=lambda done, total: calls.append((done, total)))

    assert result.status is ModelStatus.VERIFIED
    assert result.fetched is True
    assert result.actual == f"md5:{PAYLOAD_MD5}"
    assert result.sha256 == PAYLOAD_SHA256
    assert result.size == 300_000
    assert store.path("m").read_bytes() == PAYLOAD
    assert leftovers(store) == ["m.onnx"]
    # 300000 bytes in 64 KiB reads: 4 full chunks and one of 37856.
    assert calls == [(65536, 300_000), (131072, 300_000), (196608, 300_000), (262144, 300_000),
                     (300_000, 300_000)]  # fmt: skip
    assert server.seen[0].range is None
    assert store.status("m") is ModelStatus.VERIFIED
    assert [(e["event"], e.get("size"), e.get("sha256")) for e in logs] == [
        ("model_fetch_started", None, None),
        ("model_fetched", 300_000, PAYLOAD_SHA256),
    ]


def test_download_verifies_sha256_checksum(server: FileServer, tmp_path: Path) -> None:
    server.routes["/m.onnx"] = server.file()
    store = make_store(
        tmp_path, model(url=server.url("/m.onnx"), checksum=f"sha256:{PAYLOAD_SHA256}")
    )

    path = store.fetch("m")

    assert path == tmp_path / "models" / "m.onnx"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PAYLOAD_SHA256
    assert store.verify("m").actual == f"sha256:{PAYLOAD_SHA256}"


def test_partial_part_file_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    server.routes["/m.onnx"] = server.file()
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))
    store.models_dir.mkdir()
    store.part_path("m").write_bytes(PAYLOAD[:123_456])
    calls: list[tuple[int, int | None]] = []

    store.fetch("m", progress=lambda done, total: calls.append((done, total)))

    assert [s.range for s in server.seen] == ["bytes=123456-"]
    assert server.body_bytes_sent == 300_000 - 123_456
    assert store.path("m").read_bytes() == PAYLOAD
    assert calls[0] == (123_456 + CHUNK, 300_000)
    assert calls[-1] == (300_000, 300_000)
    assert leftovers(store) == ["m.onnx"]


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    server.routes["/m.onnx"] = server.file(honour_range=False)
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))
    store.models_dir.mkdir()
    # Garbage that must not survive: appended to, it would break the checksum.
    store.part_path("m").write_bytes(b"\xff" * 1000)

    store.fetch("m")

    assert [s.range for s in server.seen] == ["bytes=1000-"]
    assert server.body_bytes_sent == 300_000
    assert store.path("m").read_bytes() == PAYLOAD
    assert leftovers(store) == ["m.onnx"]


def test_complete_part_answered_416_is_verified_without_download(
    server: FileServer, tmp_path: Path
) -> None:
    server.routes["/m.onnx"] = server.file()
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))
    store.models_dir.mkdir()
    store.part_path("m").write_bytes(PAYLOAD)

    result = store.fetch_verified("m")

    assert result.status is ModelStatus.VERIFIED
    assert [s.range for s in server.seen] == ["bytes=300000-"]
    assert server.body_bytes_sent == 0
    assert leftovers(store) == ["m.onnx"]


def test_truncated_download_keeps_part_and_next_fetch_resumes(
    server: FileServer, tmp_path: Path
) -> None:
    def cut_short(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(PAYLOAD)))
        h.end_headers()
        h.wfile.write(PAYLOAD[:100_000])
        h.close_connection = True

    server.routes["/m.onnx"] = cut_short
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))

    with pytest.raises(IncompleteDownloadError, match="100000 of 300000 bytes"):
        store.fetch("m")
    assert store.part_path("m").read_bytes() == PAYLOAD[:100_000]
    assert not store.path("m").exists()

    server.routes["/m.onnx"] = server.file()
    store.fetch("m")
    assert server.seen[-1].range == "bytes=100000-"
    assert store.path("m").read_bytes() == PAYLOAD


DRIVE_FORM_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>
</head><body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="/download" method="get">
<input type="submit" id="uc-download-link" value="Download anyway">
<input type="hidden" name="id" value="FILEID">
<input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="0b8f-uuid">
</form></body></html>"""


def test_google_drive_confirm_form_is_followed(server: FileServer, tmp_path: Path) -> None:
    server.routes["/uc"] = server.html(DRIVE_FORM_PAGE)

    def download(h: BaseHTTPRequestHandler) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h.path).query))
        if query.get("confirm") == "t" and query.get("uuid") == "0b8f-uuid":
            server.file()(h)
        else:
            server.send(h, 403, b"no token")

    server.routes["/download"] = download
    store = make_store(tmp_path, model(url=server.url("/uc?export=download&id=FILEID")))

    store.fetch("m")

    assert [s.path for s in server.seen] == ["/uc", "/download"]
    assert server.seen[1].query == {
        "id": "FILEID",
        "export": "download",
        "confirm": "t",
        "uuid": "0b8f-uuid",
    }
    assert store.path("m").read_bytes() == PAYLOAD
    assert leftovers(store) == ["m.onnx"]


def test_google_drive_warning_cookie_is_followed(server: FileServer, tmp_path: Path) -> None:
    def uc(h: BaseHTTPRequestHandler) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h.path).query))
        if query.get("confirm") == "TOK3n_x":
            server.file()(h)
        else:
            page = "<html><head><title>Warning</title></head><body>too big to scan</body></html>"
            server.send(
                h,
                200,
                page.encode(),
                Content_Type="text/html",
                Set_Cookie="download_warning_13058876669334088843_FILEID=TOK3n_x; Path=/",
            )

    server.routes["/uc"] = uc
    store = make_store(tmp_path, model(url=server.url("/uc?export=download&id=FILEID")))

    store.fetch("m")

    assert [s.query.get("confirm") for s in server.seen] == [None, "TOK3n_x"]
    assert server.seen[1].query["id"] == "FILEID"
    assert store.path("m").read_bytes() == PAYLOAD


def test_html_answer_without_token_is_a_clear_failure(server: FileServer, tmp_path: Path) -> None:
    server.routes["/uc"] = server.html(
        "<html><head><title>Google Drive - Quota exceeded</title></head>"
        "<body>Too many users have viewed or downloaded this file recently.</body></html>"
    )
    store = make_store(tmp_path, model(url=server.url("/uc?id=X")))

    with pytest.raises(NotAModelError) as info:
        store.fetch("m")

    message = str(info.value)
    assert "HTML page ('Google Drive - Quota exceeded')" in message
    assert server.url("/uc?id=X") in message
    assert leftovers(store) == []


def test_html_labelled_as_binary_is_still_refused(server: FileServer, tmp_path: Path) -> None:
    def mislabelled(h: BaseHTTPRequestHandler) -> None:
        server.send(
            h,
            200,
            b"  <!DOCTYPE html><html>sign in</html>",
            Content_Type="application/octet-stream",
        )

    server.routes["/m.onnx"] = mislabelled
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))

    with pytest.raises(NotAModelError, match="instead of the model file"):
        store.fetch("m")
    assert leftovers(store) == []


def test_http_404_names_status_and_url(server: FileServer, tmp_path: Path) -> None:
    url = server.url("/gone.onnx")
    store = make_store(tmp_path, model(url=url))

    with pytest.raises(HTTPStatusError) as info:
        store.fetch("m")

    assert info.value.status == 404
    assert info.value.url == url
    assert str(info.value) == f"HTTP 404 Not Found from {url}"
    assert leftovers(store) == []


def test_http_500_is_reported_with_its_status(server: FileServer, tmp_path: Path) -> None:
    server.routes["/m.onnx"] = lambda h: server.send(h, 503, b"busy")
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))

    with pytest.raises(HTTPStatusError, match="HTTP 503") as info:
        store.fetch("m")
    assert info.value.status == 503


def test_connection_refused_is_an_offline_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The socket is closed: nothing listens on the port.
    store = make_store(tmp_path, model(url=f"http://127.0.0.1:{port}/m.onnx"))

    with pytest.raises(OfflineError, match=f"cannot reach 127.0.0.1:{port}"):
        store.fetch("m")
    assert leftovers(store) == []


def test_checksum_mismatch_leaves_no_file_and_no_part(server: FileServer, tmp_path: Path) -> None:
    server.routes["/m.onnx"] = server.file(PAYLOAD[:-1] + b"\x00")
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))
    wrong_md5 = hashlib.md5(PAYLOAD[:-1] + b"\x00").hexdigest()

    with pytest.raises(ChecksumMismatchError) as info:
        store.fetch("m")

    assert info.value.expected == f"md5:{PAYLOAD_MD5}"
    assert info.value.actual == f"md5:{wrong_md5}"
    assert f"expected md5:{PAYLOAD_MD5}, got md5:{wrong_md5}" in str(info.value)
    assert leftovers(store) == []


def test_mismatching_file_in_place_is_reported_and_never_used(
    server: FileServer, tmp_path: Path
) -> None:
    server.routes["/m.onnx"] = server.file()
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))
    store.models_dir.mkdir()
    store.path("m").write_bytes(b"not the model")

    assert store.status("m") is ModelStatus.CHECKSUM_MISMATCH
    with pytest.raises(ChecksumMismatchError, match="will not be used"):
        store.require("m")
    with pytest.raises(ChecksumMismatchError):
        store.ensure("m")
    with pytest.raises(ChecksumMismatchError, match="--force"):
        store.fetch("m")
    assert server.seen == []
    assert store.path("m").read_bytes() == b"not the model"

    store.fetch("m", force=True)
    assert store.path("m").read_bytes() == PAYLOAD


def test_unverified_model_refused_without_trust_and_accepted_with_it(
    server: FileServer, tmp_path: Path
) -> None:
    server.routes["/m.onnx"] = server.file()
    info = model(url=server.url("/m.onnx"), checksum=None)

    with pytest.raises(UnverifiedModelError, match="TRUST_UNVERIFIED"):
        make_store(tmp_path, info).fetch("m")
    assert server.seen == []

    trusted = make_store(tmp_path, info, trust=True)
    result = trusted.fetch_verified("m")
    assert result.status is ModelStatus.PRESENT_UNVERIFIED
    assert result.sha256 == PAYLOAD_SHA256
    assert result.actual is None
    # The file is now present, and still refused by a store that does not trust it.
    with pytest.raises(UnverifiedModelError):
        make_store(tmp_path, info).require("m")
    assert trusted.require("m") == trusted.path("m")


def test_operator_file_without_url_is_used_if_present(tmp_path: Path) -> None:
    store = make_store(tmp_path, model("mine", checksum=None))

    with pytest.raises(ModelMissingError, match="no URL") as info:
        store.ensure("mine")
    assert str(tmp_path / "models" / "mine.onnx") in str(info.value)

    store.models_dir.mkdir()
    store.path("mine").write_bytes(PAYLOAD)
    assert store.require("mine") == store.path("mine")
    assert store.ensure("mine") == store.path("mine")
    assert store.verify("mine").sha256 == PAYLOAD_SHA256
    assert store.status("mine") is ModelStatus.PRESENT_UNVERIFIED


def test_operator_file_without_url_is_checked_against_its_checksum(tmp_path: Path) -> None:
    store = make_store(tmp_path, model("mine", checksum="sha256:" + "0" * 64))
    store.models_dir.mkdir()
    store.path("mine").write_bytes(PAYLOAD)

    with pytest.raises(ChecksumMismatchError, match=f"got sha256:{PAYLOAD_SHA256}"):
        store.fetch("mine")


def test_missing_model_with_url_tells_how_to_fetch(tmp_path: Path) -> None:
    store = make_store(tmp_path, model(url="http://127.0.0.1:9/m.onnx"))

    with pytest.raises(ModelMissingError, match="appliance models fetch m"):
        store.require("m")
    assert store.status("m") is ModelStatus.MISSING


def test_ensure_downloads_once_then_uses_the_file(server: FileServer, tmp_path: Path) -> None:
    server.routes["/m.onnx"] = server.file()
    store = make_store(tmp_path, model(url=server.url("/m.onnx")))

    first = store.ensure("m")
    second = store.ensure("m")

    assert first == second == store.path("m")
    assert len(server.seen) == 1


def test_unknown_name_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        make_store(tmp_path, model()).fetch("nope")


def test_override_file_adds_a_fetchable_model(server: FileServer, tmp_path: Path) -> None:
    server.routes["/custom.onnx"] = server.file()
    override = tmp_path / "models.override.json"
    override.write_text(
        json.dumps(
            {
                "my_scrfd": {
                    "family": "scrfd",
                    "file": "custom_det.onnx",
                    "url": server.url("/custom.onnx"),
                    "checksum": f"sha256:{PAYLOAD_SHA256}",
                }
            }
        )
    )
    store = ModelStore(tmp_path / "models", ModelRegistry.load(override), chunk_size=CHUNK)

    path = store.fetch("my_scrfd")

    assert path == tmp_path / "models" / "custom_det.onnx"
    assert path.read_bytes() == PAYLOAD
    assert store.status("my_scrfd") is ModelStatus.VERIFIED
