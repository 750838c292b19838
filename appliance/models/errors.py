"""Why a model cannot be fetched or used: one hierarchy for the store and its downloads."""

from __future__ import annotations


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
