"""The model directory: where each registry model's file lives, and getting it there safely.

A download goes to `<file>.part`, resumes with an HTTP Range request when a partial file is
left from an earlier attempt, follows Google Drive's "can't scan this file for viruses"
confirm step, is checked against the registry checksum and only then renamed into place
(`os.replace`, atomic on one filesystem). A file in place has therefore been verified, or
accepted unverified on purpose; a mismatching file is reported and never used.

Blocking code (stdlib `urllib` and file hashing): call it from the CLI, or at start-up in an
executor, never on the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
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

import structlog

from appliance.models.registry import ModelInfo, ModelRegistry, RegistryError

log = structlog.get_logger(__name__)

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
SUPPORTED_ALGORITHMS = ("md5", "sha256")


class ModelStatus(str, enum.Enum):
    MISSING = "missing"
    PRESENT_UNVERIFIED = "present-unverified"
    VERIFIED = "verified"
    CHECKSUM_MISMATCH = "checksum-mismatch"


class ModelStoreError(RuntimeError):
    """A model cannot be fetched or used; the message says which model and what to do."""


class UnknownModelError(ModelStoreError):
    """The name is not in the registry."""


class ModelMissingError(ModelStoreError):
    """The model file is not in the model directory (and was not to be downloaded)."""


class UnverifiedModelError(ModelStoreError):
    """The model has no published checksum and trust_unverified is off."""


class ChecksumMismatchError(ModelStoreError):
    """The file's digest differs from the registry's checksum."""

    def __init__(self, message: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class DownloadError(ModelStoreError):
    """The download failed; a partial `.part` file may be kept for a resume."""


class OfflineError(DownloadError):
    """The host cannot be reached (no network, DNS failure, refused or timed out)."""


class HTTPStatusError(DownloadError):
    """The server answered an HTTP error status."""

    def __init__(self, status: int, url: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason} from {url}".replace("  ", " "))
        self.status = status
        self.url = url


class NotAModelError(DownloadError):
    """The server answered an HTML page where the model file was expected."""


class IncompleteDownloadError(DownloadError):
    """The connection ended before the whole file arrived; the `.part` is kept to resume."""


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    name: str
    path: Path
    status: ModelStatus
    # The registry's "algorithm:hex", and the file's digest with the same algorithm.
    expected: str | None = None
    actual: str | None = None
    # Always computed for a present file, so an operator can pin it.
    sha256: str | None = None
    size: int | None = None
    # True when this call downloaded the file.
    fetched: bool = False

    @property
    def ok(self) -> bool:
        return self.status in (ModelStatus.VERIFIED, ModelStatus.PRESENT_UNVERIFIED)


def split_checksum(checksum: str) -> tuple[str, str]:
    """ "md5:ABC" -> ("md5", "abc"); raises ModelStoreError for an algorithm we cannot run."""
    algorithm, _, digest = checksum.partition(":")
    algorithm = algorithm.strip().lower()
    if algorithm not in SUPPORTED_ALGORITHMS or not digest:
        raise ModelStoreError(f"checksum {checksum!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    return algorithm, digest.strip().lower()


def file_digests(
    path: Path, algorithm: str | None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[str | None, str]:
    """(digest with `algorithm` or None, sha256) of a file, read once in chunks."""
    sha256 = hashlib.sha256()
    other = None
    if algorithm == "md5":
        # An integrity check against a published md5, not a security use; FIPS builds of
        # OpenSSL refuse md5 unless told so.
        other = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            sha256.update(block)
            if other is not None:
                other.update(block)
    if algorithm == "sha256":
        return sha256.hexdigest(), sha256.hexdigest()
    return (other.hexdigest() if other is not None else None), sha256.hexdigest()


class ModelStore:
    """The files of registry models in `models_dir`: verify, fetch, and hand out paths."""

    def __init__(
        self,
        models_dir: Path,
        registry: ModelRegistry,
        trust_unverified: bool = False,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.registry = registry
        self.trust_unverified = trust_unverified
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size

    # -- lookups ---------------------------------------------------------------------------

    def info(self, name: str) -> ModelInfo:
        try:
            return self.registry.get(name)
        except RegistryError as exc:
            raise UnknownModelError(str(exc)) from None

    def path(self, name: str) -> Path:
        return self.models_dir / self.info(name).file

    def part_path(self, name: str) -> Path:
        path = self.path(name)
        return path.with_name(path.name + ".part")

    # -- verification ----------------------------------------------------------------------

    def verify(self, name: str) -> VerifyResult:
        """Hash the file in place (if any) and compare with the registry checksum."""
        info = self.info(name)
        path = self.models_dir / info.file
        if not path.is_file():
            return VerifyResult(name, path, ModelStatus.MISSING, expected=info.checksum)
        return self._check(info, path)

    def status(self, name: str) -> ModelStatus:
        return self.verify(name).status

    def _check(self, info: ModelInfo, path: Path, fetched: bool = False) -> VerifyResult:
        algorithm, expected = split_checksum(info.checksum) if info.checksum else (None, None)
        digest, sha256 = file_digests(path, algorithm, self.chunk_size)
        if algorithm is None:
            status = ModelStatus.PRESENT_UNVERIFIED
            actual = None
        else:
            status = ModelStatus.VERIFIED if digest == expected else ModelStatus.CHECKSUM_MISMATCH
            actual = f"{algorithm}:{digest}"
        return VerifyResult(
            name=info.name,
            path=path,
            status=status,
            expected=info.checksum,
            actual=actual,
            sha256=sha256,
            size=path.stat().st_size,
            fetched=fetched,
        )

    def require(self, name: str) -> Path:
        """The model's file if it may be used now; never downloads."""
        return self.require_verified(name).path

    def require_verified(self, name: str) -> VerifyResult:
        """`require`, returning the verification (with the file's sha256) instead of the path."""
        info = self.info(name)
        result = self.verify(name)
        if result.status is ModelStatus.MISSING:
            raise ModelMissingError(self._missing_message(info, result.path))
        if result.status is ModelStatus.CHECKSUM_MISMATCH:
            raise self._mismatch(result, "the file in place")
        self._check_trust(info)
        return result

    def ensure(self, name: str, *, progress: Progress | None = None) -> Path:
        """Verify the file in place, or download it when there is none."""
        if self.path(name).is_file():
            return self.require(name)
        return self.fetch(name, progress=progress)

    def _check_trust(self, info: ModelInfo) -> None:
        # Only downloaded models need a published checksum: a file the operator placed
        # (no URL) is theirs to vouch for, as DESIGN section 3 says real weights come from them.
        if info.checksum is None and info.url is not None and not self.trust_unverified:
            raise UnverifiedModelError(
                f"model {info.name} has no published checksum, so its download cannot be "
                "verified; set TRUST_UNVERIFIED=1 (or --trust-unverified) to accept it, or "
                "pin its sha256 in the model override file"
            )

    def _missing_message(self, info: ModelInfo, path: Path) -> str:
        if info.url is None:
            return (
                f"model file {path} for {info.name} does not exist and the registry has no URL "
                "for it: copy the file there (or fix 'file' in the override)"
            )
        return (
            f"model file {path} for {info.name} does not exist; "
            f"fetch it with `appliance models fetch {info.name}`"
        )

    @staticmethod
    def _mismatch(result: VerifyResult, what: str, hint: str = "") -> ChecksumMismatchError:
        expected = result.expected or ""
        actual = result.actual or ""
        return ChecksumMismatchError(
            f"checksum mismatch for {result.name} ({what}, {result.path}): "
            f"expected {expected}, got {actual} (sha256:{result.sha256}); it will not be used"
            + hint,
            expected=expected,
            actual=actual,
        )

    # -- download --------------------------------------------------------------------------

    def fetch(self, name: str, *, progress: Progress | None = None, force: bool = False) -> Path:
        """Download and verify the model unless a verified file is already in place."""
        return self.fetch_verified(name, progress=progress, force=force).path

    def fetch_verified(
        self, name: str, *, progress: Progress | None = None, force: bool = False
    ) -> VerifyResult:
        """`fetch`, returning the verification of the file (digests, whether it downloaded)."""
        info = self.info(name)
        path = self.models_dir / info.file
        if info.url is None:
            if not path.is_file():
                raise ModelMissingError(self._missing_message(info, path))
            result = self._check(info, path)
            if result.status is ModelStatus.CHECKSUM_MISMATCH:
                raise self._mismatch(result, "the file in place")
            return result
        self._check_trust(info)
        if path.is_file() and not force:
            result = self._check(info, path)
            if result.status is ModelStatus.CHECKSUM_MISMATCH:
                raise self._mismatch(
                    result, "the file in place", "; use --force to download it again"
                )
            return result
        part = path.with_name(path.name + ".part")
        if force:
            part.unlink(missing_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        log.info("model_fetch_started", model=name, url=info.url, resume_from=_size(part))
        self._download(info.url, part, progress)
        result = self._check(info, part, fetched=True)
        if result.status is ModelStatus.CHECKSUM_MISMATCH:
            part.unlink(missing_ok=True)
            log.warning(
                "model_checksum_mismatch",
                model=name,
                expected=result.expected,
                actual=result.actual,
            )
            raise self._mismatch(
                dataclasses.replace(result, path=path), f"downloaded from {info.url}"
            )
        os.replace(part, path)
        _fsync_dir(path.parent)
        log.info("model_fetched", model=name, size=result.size, sha256=result.sha256)
        return dataclasses.replace(result, path=path)

    def _download(self, url: str, part: Path, progress: Progress | None) -> None:
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
        offset = _size(part)
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _fsync_dir(directory: Path) -> None:
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
