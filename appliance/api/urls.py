"""Fetching image URLs without letting a caller reach the appliance's own network (SSRF).

Addresses are checked after DNS resolution, inside the connector's resolver, so the check
covers redirects and DNS answers that change between lookups: the connection is only ever
made to an address that passed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from appliance.api.errors import ApiError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ApiError):
    status, code = 403, "url_refused"


class UrlFetchFailed(ApiError):
    status, code = 422, "url_fetch_failed"


def address_allowed(address: IpAddress, allowlist: Sequence[str]) -> bool:
    for entry in allowlist:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then refuses private, loopback and link-local answers."""

    def __init__(self, allowlist: Sequence[str]) -> None:
        self._inner = ThreadedResolver()
        self._allowlist = tuple(allowlist)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host in self._allowlist:
            return await self._inner.resolve(host, port, family)
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"])
            if not address_allowed(address, self._allowlist):
                raise UrlRefused(
                    f"URL host {host!r} resolves to {address}, a loopback, private or link-local "
                    "address; add it to URL_ALLOWLIST to allow it"
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


def make_session(allowlist: Sequence[str], timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allowlist), limit=16)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=False
    )


async def fetch_image(
    session: aiohttp.ClientSession,
    url: str,
    max_bytes: int,
    allowlist: Sequence[str],
    headers: dict[str, str] | None = None,
) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused(f"only http(s) URLs with a host are accepted, got {url!r}")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        literal = None
    # aiohttp connects to literal addresses without asking the resolver: check them here.
    if (
        literal is not None
        and parts.hostname not in allowlist
        and not address_allowed(literal, allowlist)
    ):
        raise UrlRefused(
            f"URL address {literal} is loopback, private or link-local; add it to URL_ALLOWLIST to allow it"
        )
    try:
        async with session.get(url, headers=headers or {}, max_redirects=3) as resp:
            if resp.status != 200:
                raise UrlFetchFailed(f"GET {url} answered HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise UrlFetchFailed(f"{url} is larger than {max_bytes} bytes (MAX_BODY_BYTES)")
            return bytes(body)
    except ApiError:
        raise
    except aiohttp.ClientConnectorError as exc:
        inner: Any = exc.os_error
        if isinstance(inner, ApiError):
            raise inner from None
        raise UrlFetchFailed(f"cannot connect to {parts.hostname}: {exc.strerror or exc}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UrlFetchFailed(f"fetching {url} failed: {exc or type(exc).__name__}") from None
