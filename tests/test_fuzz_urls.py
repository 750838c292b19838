"""Property-based fuzzing of the URL guard's parsing (issue 12 defect 1); no traffic at all.

Every spelling of every non-public address is refused; any text a caller sends as a URL or a
header is either accepted or refused with the API's typed error, never anything else.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from appliance.api.urls import UrlRefused, check_url, literal_address
from tests.fuzz_oracles import check_header_pair, check_url_text

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

FORBIDDEN_V4 = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


def report(
    capsys: pytest.CaptureFixture[str], name: str, outcomes: Counter[str], t0: float
) -> None:
    with capsys.disabled():
        print(
            f"\nfuzz {name}: {sum(outcomes.values())} inputs, failures 0, "
            f"{time.perf_counter() - t0:.1f} s, outcomes {dict(sorted(outcomes.items()))}"
        )


@st.composite
def forbidden_v4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    net = draw(st.sampled_from(FORBIDDEN_V4))
    return net[draw(st.integers(0, net.num_addresses - 1))]


def spell(address: ipaddress.IPv4Address, style: str, upper: bool) -> str:
    """`address` written the way inet_aton (or an IPv6 parser) reads it in `style`."""
    n = int(address)
    a, b, c, d = address.packed
    hexed = {
        "dotted": f"{a}.{b}.{c}.{d}",
        "decimal": str(n),
        "hex": f"0x{n:x}",
        "octal_dotted": ".".join(f"0{x:o}" for x in (a, b, c, d)),
        "hex_dotted": ".".join(f"0x{x:x}" for x in (a, b, c, d)),
        "three_part": f"{a}.{b}.{(c << 8) | d}",
        "two_part": f"{a}.{(b << 16) | (c << 8) | d}",
        "mapped": f"[::ffff:{address}]",
        "mapped_hex": f"[::ffff:{n >> 16:x}:{n & 0xFFFF:x}]",
        "nat64": f"[64:ff9b::{n >> 16:x}:{n & 0xFFFF:x}]",
        "sixtofour": f"[2002:{n >> 16:x}:{n & 0xFFFF:x}::1]",
        "compatible": f"[::{address}]",
    }[style]
    return hexed.upper().replace("0X", "0x") if upper else hexed


STYLES = [
    "dotted",
    "decimal",
    "hex",
    "octal_dotted",
    "hex_dotted",
    "three_part",
    "two_part",
    "mapped",
    "mapped_hex",
    "nat64",
    "sixtofour",
    "compatible",
]


def test_fuzz_every_spelling_of_a_forbidden_address_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes, t0 = Counter[str](), time.perf_counter()

    @settings(FUZZ, max_examples=2500)
    @given(forbidden_v4(), st.sampled_from(STYLES), st.booleans(), st.integers(1, 65535))
    def run(address: ipaddress.IPv4Address, style: str, upper: bool, port: int) -> None:
        host = spell(address, style, upper)
        if not host.startswith("["):
            assert literal_address(host) == address, host
        with pytest.raises(UrlRefused):
            check_url(URL(f"http://{host}:{port}/img.jpg"), ())
        outcomes[style] += 1

    run()
    report(capsys, "urls/forbidden-spellings", outcomes, t0)
    assert set(outcomes) == set(STYLES)


URL_PARTS = st.sampled_from(
    ["http://", "https://", "ftp://", "file://", "//", "http:/", "HTTP://", "", "javascript:"]
)
HOSTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["127.0.0.1", "[::1]", "0x7f.1", "10.20.3.4", "camera.local", "8.8.8.8"]),
    st.from_regex(r"\[?[0-9a-fA-FxX:.%]{0,40}\]?", fullmatch=True),
)


def test_fuzz_caller_urls_are_accepted_or_refused_never_crash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes, t0 = Counter[str](), time.perf_counter()

    @settings(FUZZ, max_examples=2500)
    @given(
        st.one_of(
            st.text(max_size=200),
            st.tuples(URL_PARTS, HOSTS, st.text(max_size=30)).map("".join),
        )
    )
    def run(url: str) -> None:
        outcomes[check_url_text(url)] += 1

    run()
    report(capsys, "urls/caller-text", outcomes, t0)
    assert outcomes["allowed"] > 50 and outcomes["refused"] > 50


def test_fuzz_img_req_headers_are_accepted_or_refused_never_crash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes, t0 = Counter[str](), time.perf_counter()
    names = st.one_of(st.text(max_size=20), st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True))
    values = st.one_of(
        st.text(max_size=60),
        st.tuples(
            st.text(max_size=10),
            st.sampled_from(["\r\n", "\n", "\r", "\x00"]),
            st.text(max_size=10),
        ).map("".join),
    )

    @settings(FUZZ, max_examples=1500)
    @given(names, values)
    def run(name: str, value: str) -> None:
        outcomes[check_header_pair(name, value)] += 1

    run()
    report(capsys, "urls/img_req_headers", outcomes, t0)
    assert outcomes["allowed"] > 50 and outcomes["refused"] > 50
