"""Getting a model file's bytes over HTTP: resume and Google Drive's confirm step.

A download fills `<file>.part`; when a partial file is left from an earlier attempt it resumes
with an HTTP Range request (a 206 continuing at its end is appended, anything else starts
over), and it follows Google Drive's "can't scan this file for viruses" page to the file.
Verifying and publishing the file is the store's job (`models/store.py`).

Blocking code (stdlib `urllib`): call it from the CLI, or at start-up in an executor, never on
the event loop. The stdlib is enough here: one GET with a Range header, a cookie jar and a
small HTML parser, with no dependency to keep current on a device.
"""

from __future__ import annotations

import contextlib
import http.client
import http.cookiejar
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import cast

from appliance.models.errors import (
    HTTPStatusError,
    IncompleteDownloadError,
    NotAModelError,
    OfflineError,
)

Progress = Callable[[int, int | None], None]

# Socket timeout for connecting and for each read: long enough for a slow mobile link to a
# Jetson in the field, short enough that a dead server does not hang start-up for minutes.
DEFAULT_TIMEOUT_S = 30.0
# 1 MiB: few syscalls per second at 100 MB/s, small next to the Jetson's RAM.
DEFAULT_CHUNK_SIZE = 1 << 20
# A Drive warning page is a few kB; anything HTML bigger than this is not one worth parsing.
MAX_HTML_BYTES = 2 << 20
# Drive asks once; allow a second hop (old "uc" page -> new usercontent page) and then stop,
# so a server that keeps answering pages cannot loop us forever.
MAX_CONFIRM_HOPS = 3
USER_AGENT = "appliance-model-store/1"


class Downloader:
    """Fills a `.part` file from a URL, resuming and following confirm pages."""

    def __init__(
        self, timeout_s: float = DEFAULT_TIMEOUT_S, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size

    def download(self, url: str, part: Path, progress: Progress | None) -> None:
        """Fill `part` with the body at `url`, following Drive's confirm pages."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        tried = [url]
        next_url: str | None = url
        while next_url is not None:
            next_url = self._transfer(opener, jar, next_url, url, part, progress)
            if next_url is None:
                return
            if len(tried) > MAX_CONFIRM_HOPS or (next_url in tried and next_url != tried[-1]):
                raise NotAModelError(
                    f"{url} kept answering confirmation pages instead of the model file "
                    f"(tried {len(tried)} links); download it by hand into {part.parent}"
                )
            tried.append(next_url)

    def _transfer(
        self,
        opener: urllib.request.OpenerDirector,
        jar: http.cookiejar.CookieJar,
        url: str,
        origin: str,
        part: Path,
        progress: Progress | None,
    ) -> str | None:
        """One request. None when `part` holds the whole body; else the URL to try next."""
        offset = size_of(part)
        try:
            response = self._open(opener, url, offset)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                # The .part is at least as long as the file: complete, or from another file.
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == offset:
                    return None
                part.unlink()
                return url
            raise HTTPStatusError(exc.code, url, str(exc.reason)) from None
        with response:
            first = self._read(response, url)
            if _is_html(response.headers.get("Content-Type"), first):
                page = first + response.read(MAX_HTML_BYTES)
                return _confirm_url(response.geturl() or url, origin, page, jar)
            start, total = self._plan(response, offset, len(first))
            if start is None:
                part.unlink(missing_ok=True)
                return url
            self._write(response, url, part, first, start, total, progress)
        return None

    def _open(
        self, opener: urllib.request.OpenerDirector, url: str, offset: int
    ) -> http.client.HTTPResponse:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            return cast(http.client.HTTPResponse, opener.open(request, timeout=self.timeout_s))
        except urllib.error.HTTPError:
            raise
        except urllib.error.URLError as exc:
            raise OfflineError(f"cannot reach {_host(url)} ({url}): {exc.reason}") from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise OfflineError(f"cannot reach {_host(url)} ({url}): {exc}") from None

    def _read(self, response: http.client.HTTPResponse, url: str) -> bytes:
        try:
            return response.read(self.chunk_size)
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise IncompleteDownloadError(
                f"download from {_host(url)} broke off ({exc}); run the fetch again to resume"
            ) from None

    @staticmethod
    def _plan(
        response: http.client.HTTPResponse, offset: int, first_len: int
    ) -> tuple[int | None, int | None]:
        """(where the body starts in the file, file size if known); start None = start over."""
        length = response.headers.get("Content-Length")
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            # A range other than the one asked for cannot be appended; fetch it whole instead.
            return (start if start == offset else None), total
        # 200: the server ignored the Range header (or none was sent): the body is the file.
        return 0, int(length) if length is not None and length.isdigit() else None

    def _write(
        self,
        response: http.client.HTTPResponse,
        url: str,
        part: Path,
        first: bytes,
        start: int,
        total: int | None,
        progress: Progress | None,
    ) -> None:
        done = start
        # "ab" keeps the bytes already there (a 206 continuing at their end); "wb" restarts.
        with part.open("ab" if start else "wb") as fh:
            block = first
            while block:
                fh.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
                block = self._read(response, url)
            fh.flush()
            # The rename that follows must not publish a file whose bytes are still in the
            # page cache: an appliance loses power without warning.
            os.fsync(fh.fileno())
        if total is not None and done < total:
            raise IncompleteDownloadError(
                f"download from {_host(url)} ended at {done} of {total} bytes; "
                "run the fetch again to resume"
            )


# -- helpers -------------------------------------------------------------------------------


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform or filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-999/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    match = _CONTENT_RANGE.match(header or "")
    if match is None:
        return None, None
    start, total = match.groups()
    return (
        int(start) if start is not None else None,
        int(total) if total != "*" else None,
    )


def _is_html(content_type: str | None, first: bytes) -> bool:
    if content_type and content_type.split(";")[0].strip().lower() in (
        "text/html",
        "application/xhtml+xml",
    ):
        return True
    # Some servers label error pages application/octet-stream; an ONNX file starts with
    # protobuf field bytes, never with markup.
    head = first[:64].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


class _PageParser(HTMLParser):
    """Forms (action + fields), links and the title of a confirmation page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.title = ""
        self._in_form = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((values.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("name"):
            self.forms[-1][1][values["name"]] = values.get("value", "")
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


_CONFIRM_TOKEN = re.compile(r"confirm=([0-9A-Za-z_-]+)")


def _confirm_url(page_url: str, origin: str, page: bytes, jar: http.cookiejar.CookieJar) -> str:
    """Where Google Drive's "cannot scan for viruses" page says the file really is.

    Drive has answered this three ways over the years: a GET form with `id`, `export`,
    `confirm` and `uuid` fields (drive.usercontent.google.com), a link carrying
    `confirm=TOKEN`, or a `download_warning_*` cookie whose value is the token.
    """
    parser = _PageParser()
    text = page.decode("utf-8", errors="replace")
    parser.feed(text)
    for action, fields in parser.forms:
        if "confirm" in fields or "uuid" in fields:
            target = urllib.parse.urljoin(page_url, action or page_url)
            sep = "&" if urllib.parse.urlsplit(target).query else "?"
            return f"{target}{sep}{urllib.parse.urlencode(fields)}"
    for href in parser.links:
        if "confirm=" in href:
            return urllib.parse.urljoin(page_url, href)
    for cookie in jar:
        if cookie.name.startswith("download_warning") and cookie.value:
            return _with_query(origin, confirm=cookie.value)
    match = _CONFIRM_TOKEN.search(text)
    if match is not None:
        return _with_query(origin, confirm=match.group(1))
    title = " ".join(parser.title.split()) or "untitled"
    raise NotAModelError(
        f"{page_url} answered an HTML page ({title!r}) instead of the model file, with no "
        "download confirmation in it (Drive quota exceeded, file not shared, or a login page); "
        "download the file by hand and place it in the model directory"
    )


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
