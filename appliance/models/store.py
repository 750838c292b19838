"""The model directory: where each registry model's file lives, and getting it there safely.

A download (`models/download.py`: resume, Google Drive's confirm step) fills `<file>.part`,
which is checked against the registry checksum and only then renamed into place
(`os.replace`, atomic on one filesystem). A file in place has therefore been verified, or
accepted unverified on purpose; a mismatching file is reported and never used.

Blocking code (file hashing, downloads): call it from the CLI, or at start-up in an executor,
never on the event loop.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
from pathlib import Path

import structlog

from appliance.models.download import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TIMEOUT_S,
    Downloader,
    Progress,
    fsync_dir,
    size_of,
)
from appliance.models.errors import (
    ChecksumMismatchError,
    DownloadError,
    HTTPStatusError,
    IncompleteDownloadError,
    ModelMissingError,
    ModelStoreError,
    NotAModelError,
    OfflineError,
    UnknownModelError,
    UnverifiedModelError,
)
from appliance.models.registry import ModelInfo, ModelRegistry, RegistryError

log = structlog.get_logger(__name__)

SUPPORTED_ALGORITHMS = ("md5", "sha256")


class ModelStatus(str, enum.Enum):
    MISSING = "missing"
    PRESENT_UNVERIFIED = "present-unverified"
    VERIFIED = "verified"
    CHECKSUM_MISMATCH = "checksum-mismatch"


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
        log.info("model_fetch_started", model=name, url=info.url, resume_from=size_of(part))
        Downloader(self.timeout_s, self.chunk_size).download(info.url, part, progress)
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
        fsync_dir(path.parent)
        log.info("model_fetched", model=name, size=result.size, sha256=result.sha256)
        return dataclasses.replace(result, path=path)


# The errors live in models/errors.py (downloads raise them too); callers import them here.
__all__ = [
    "ChecksumMismatchError",
    "DownloadError",
    "HTTPStatusError",
    "IncompleteDownloadError",
    "ModelMissingError",
    "ModelStatus",
    "ModelStore",
    "ModelStoreError",
    "NotAModelError",
    "OfflineError",
    "Progress",
    "UnknownModelError",
    "UnverifiedModelError",
    "VerifyResult",
    "file_digests",
    "split_checksum",
]
