"""Fetching image URLs without letting a caller reach the appliance's own network (SSRF).

Three checks, because aiohttp offers no single place that sees every connection:

- Every hop's URL is checked before it is requested: redirects are followed here, one at a
  time (aiohttp's own redirect handling would connect to the next hop unchecked), and a hop
  that names an address literally is checked in every spelling a resolver accepts (dotted,
  decimal `2130706433`, hex `0x7f.1`, octal `0177.0.0.1`, IPv6, IPv4-mapped IPv6): aiohttp
  connects to a literal address without calling the resolver.
- Host names are checked after DNS resolution, inside the connector's resolver, so a name
  whose answer changes between lookups is checked on the answer actually used.
- Headers the caller asks us to send (`img_req_headers`) may not smuggle a second header or
  request (CR, LF, NUL): that is the caller's mistake, a 400, never a 500.

An address is fetched only when it is globally routable (not loopback, private, link-local
(cloud metadata at 169.254.169.254 included), shared, reserved, multicast or unspecified, and
no IPv4 address embedded in an IPv6 one is), unless URL_ALLOWLIST names its host or a network
that holds it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from appliance.api.errors import ApiError, BadRequest

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Characters of every numeric IPv4 spelling inet_aton accepts (decimal, hex, octal, dotted).
_NUMERIC_HOST_CHARS = frozenset("0123456789abcdefxABCDEFX.")
# RFC 9110 token characters: what a header name may be made of.
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class UrlRefused(ApiError):
    status, code = 403, "url_refused"


class UrlFetchFailed(ApiError):
    status, code = 422, "url_fetch_failed"


class UrlTimeout(UrlFetchFailed):
    status, code = 504, "url_timeout"


def literal_address(host: str) -> IpAddress | None:
    """The address `host` names literally, in any spelling a resolver would accept; else None."""
    host = host.strip("[]").removesuffix(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and set(host) <= _NUMERIC_HOST_CHARS:
        try:
            # The C library's own parser, the one getaddrinfo uses for numeric hosts; pure
            # parsing, no lookup.
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    embedded = [address.ipv4_mapped, address.sixtofour]
    if address.teredo is not None:
        embedded += list(address.teredo)
    # NAT64 and the deprecated IPv4-compatible form (::a.b.c.d) carry it in the low 32 bits.
    if address in _NAT64 or int(address) >> 32 == 0:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [a for a in embedded if a is not None]


def _in_allowlist(address: IpAddress, allowlist: Sequence[str]) -> bool:
    for entry in allowlist:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry: matched by name, not here
    return False


def address_allowed(address: IpAddress, allowlist: Sequence[str]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if _in_allowlist(address, allowlist):
        return True
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return all(a.is_global and not a.is_multicast for a in _embedded_ipv4(address))
    return True


def _host_allowlisted(host: str, allowlist: Sequence[str]) -> bool:
    host = host.lower().removesuffix(".")
    return any(host == entry.lower().removesuffix(".") for entry in allowlist)


def check_url(url: URL, allowlist: Sequence[str]) -> None:
    """Refuse a URL we must not request: not http(s), no host, or a forbidden literal address."""
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise UrlRefused(f"only http(s) URLs with a host are accepted, got {str(url)!r}")
    host = url.raw_host
    if _host_allowlisted(host, allowlist):
        return
    address = literal_address(host)
    if address is not None and not address_allowed(address, allowlist):
        raise UrlRefused(
            f"URL address {host} ({address}) is loopback, private or link-local; "
            "add it to URL_ALLOWLIST to allow it"
        )


def parse_target(url: str, allowlist: Sequence[str]) -> URL:
    """The URL a caller gave, parsed and checked (`check_url`); UrlRefused for anything else."""
    try:
        parsed = URL(url)
        host = parsed.raw_host  # yarl parses the authority lazily: errors surface here
    except Exception:
        # Whatever the parser raises, the caller's string is not a URL we can use: yarl 1.25
        # raises IndexError on "http://[::3]@" (found by the atheris fuzz target).
        raise UrlRefused(f"{url!r} is not a valid URL") from None
    if host is None:
        raise UrlRefused(f"only http(s) URLs with a host are accepted, got {url!r}")
    check_url(parsed, allowlist)
    return parsed


def check_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The caller's headers, refused (400) when a name or value could split the request."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not name or not set(name) <= _TOKEN_CHARS:
            raise BadRequest(f"img_req_headers: {name!r} is not a valid header name")
        if not isinstance(value, str):
            raise BadRequest(f"img_req_headers: the value of {name} must be a string")
        if any(c in value for c in "\r\n\x00"):
            raise BadRequest(
                f"img_req_headers: the value of {name} contains CR, LF or NUL, "
                "which would split the request"
            )
        out[name] = value
    return out


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then refuses private, loopback and link-local answers."""

    def __init__(self, allowlist: Sequence[str]) -> None:
        self._inner = ThreadedResolver()
        self._allowlist = tuple(allowlist)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if _host_allowlisted(host, self._allowlist):
            return results
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
    headers: Mapping[str, Any] | None = None,
) -> bytes:
    """GET `url`, following up to MAX_REDIRECTS redirects, each hop checked before it is sent.

    The caller's headers go to the first origin only: a redirect to another host must not
    carry the caller's credentials there. The whole fetch, redirects included, has the
    session's timeout (URL_TIMEOUT_S).
    """
    sent = check_headers(headers)
    current = parse_target(url, allowlist)
    timeout_s = session.timeout.total or 10.0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    origin = current.origin()
    phase = "connecting"
    try:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(current, allowlist)
            hop_headers = sent if current.origin() == origin else {}
            phase = f"connecting to {current.raw_host} or waiting for its response headers"
            remaining = max(deadline - loop.time(), 0.001)
            async with session.get(
                current,
                headers=hop_headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=remaining),
            ) as resp:
                if resp.status in _REDIRECT_STATUSES:
                    current = _next_hop(current, resp.headers.get("Location"))
                    continue
                if resp.status != 200:
                    raise UrlFetchFailed(f"GET {current} answered HTTP {resp.status}")
                phase = f"reading the body from {current.raw_host}"
                return await _read_body(resp, str(current), max_bytes)
        raise UrlFetchFailed(f"{url} redirected more than {MAX_REDIRECTS} times")
    except ApiError:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        # aiohttp's timeout errors are also ClientError subclasses, so this comes first; on
        # Python 3.10 asyncio.TimeoutError is not yet the builtin.
        raise UrlTimeout(
            f"fetching {url} timed out after {timeout_s:g} s (URL_TIMEOUT_S) while {phase}"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        inner: Any = exc.os_error
        if isinstance(inner, ApiError):
            raise inner from None
        raise UrlFetchFailed(
            f"cannot connect to {current.raw_host}: {exc.strerror or exc}"
        ) from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise UrlFetchFailed(f"fetching {url} failed: {exc or type(exc).__name__}") from None


def _next_hop(current: URL, location: str | None) -> URL:
    if not location:
        raise UrlFetchFailed(f"GET {current} redirected without a Location header")
    try:
        return current.join(URL(location))
    except Exception:  # as in parse_target: any parser error means an unusable Location
        raise UrlFetchFailed(f"GET {current} redirected to an invalid URL {location!r}") from None


async def _read_body(resp: aiohttp.ClientResponse, url: str, max_bytes: int) -> bytes:
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise UrlFetchFailed(f"{url} is larger than {max_bytes} bytes (MAX_BODY_BYTES)")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise UrlFetchFailed(f"{url} is larger than {max_bytes} bytes (MAX_BODY_BYTES)")
    return bytes(body)
