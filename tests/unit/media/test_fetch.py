"""Remote image fetching against a local HTTP server: limits, redirects and the SSRF guard.

No test here names an address outside 127.0.0.0/8 or ::1 as a fetch target, not even one it expects
refused: a regression in the guard would then send traffic off the machine. The address policy is
tested as the pure function `may_connect` over private, link-local, multicast, unspecified and
public addresses; the fetcher is tested against loopback only. The server listens on 127.0.0.1;
the fetcher is allowed 127.0.0.1/32 where a test needs a successful fetch, so 127.0.0.2 (same
loopback interface, not allowed) stands in for "a private address" in redirect tests.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import socket
import threading
import time
import typing
from collections.abc import Iterator

import pytest

from qwen_server.errors import Kind
from qwen_server.media.fetch import USER_AGENT, Fetcher, FetchError, may_connect

BODY = b"\x89PNG fake image body" * 100


class _Handler(http.server.BaseHTTPRequestHandler):
    seen_agents: typing.ClassVar[list[str]] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        _Handler.seen_agents.append(self.headers.get("User-Agent", ""))
        path, _, query = self.path.partition("?")
        if path == "/image":
            self._send(200, BODY)
        elif path == "/big":  # declares its size
            self._send(200, b"x" * 50_000)
        elif path == "/big-chunked":  # no Content-Length: the limit must cut the stream
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"1000\r\n" + b"y" * 4096 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/redirect":  # /redirect?N: N+1 redirects, then the image
            hops = int(query or 0)
            self._redirect(f"/redirect?{hops - 1}" if hops > 0 else "/image")
        elif path == "/to":  # /to?URL
            self._redirect(query)
        elif path == "/missing":
            self._send(404, b"not found")
        else:
            self._send(500, b"?")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(url: str, max_bytes: int = 1_000_000, **options) -> bytes:
    async def run() -> bytes:
        fetcher = Fetcher(**{"timeout": 2.0, "max_redirects": 3, "allowed_networks": ["127.0.0.1/32"], **options})
        try:
            return await fetcher.fetch(url, max_bytes)
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def refused(url: str, reason: str, **kw) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(url, **kw)
    assert info.value.reason == reason, info.value.message
    return info.value


def test_fetch_returns_the_body_and_sends_a_user_agent(origin: str) -> None:
    _Handler.seen_agents.clear()
    assert fetch(f"{origin}/image") == BODY
    assert _Handler.seen_agents == [USER_AGENT]


def test_redirects_are_followed_up_to_the_limit(origin: str) -> None:
    assert fetch(f"{origin}/redirect?2") == BODY  # 3 redirects: the limit
    refused(f"{origin}/redirect?3", "too_many_redirects")


def test_declared_oversize_is_refused_with_413(origin: str) -> None:
    assert refused(f"{origin}/big", "too_large", max_bytes=10_000).kind is Kind.TOO_LARGE


def test_undeclared_oversize_is_cut_while_streaming(origin: str) -> None:
    assert refused(f"{origin}/big-chunked", "too_large", max_bytes=10_000).kind is Kind.TOO_LARGE
    assert len(fetch(f"{origin}/big-chunked", max_bytes=1_000_000)) == 409_600


def test_a_slow_body_hits_the_total_timeout(origin: str) -> None:
    # Each byte arrives well within any read timeout and the body never completes: without a bound on
    # the whole exchange the fetch would end 3 s later on the cut body ("incomplete"), not on "timeout".
    refused(f"{origin}/slow", "timeout", timeout=1.0)


def test_http_errors_name_the_status(origin: str) -> None:
    assert "404" in refused(f"{origin}/missing", "fetch_failed").message


# --- the address policy, as a pure function (nothing is resolved or connected) ---

REFUSED_BY_DEFAULT = [
    "10.0.0.1",
    "10.255.255.255",  # 10/8
    "172.16.0.1",
    "172.31.255.255",  # 172.16/12, both ends
    "192.168.0.1",
    "192.168.255.255",  # 192.168/16
    "169.254.169.254",
    "169.254.0.1",  # link-local: cloud metadata services live here
    "100.64.0.1",  # shared address space (carrier-grade NAT)
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:127.0.0.1",  # IPv4-mapped IPv6
    "fc00::1",
    "fd12:3456::1",  # unique local, fc00::/7
    "fe80::1",
    "fe80::1%eth0",
    "febf::1",  # link-local fe80::/10, with a scope id as getaddrinfo gives it
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "ff0e::1",  # multicast, also the globally scoped kind
    "0.0.0.0",
    "::",  # unspecified: connecting to them reaches this machine
    "127.0.0.1",
    "127.0.0.2",
    "127.255.255.254",
    "::1",  # loopback
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
    "198.18.0.1",  # broadcast, reserved, documentation, benchmarking
    # IPv4 behind IPv6 translation: NAT64 (10.0.0.1, 127.0.0.1), a network's own NAT64 prefix, 6to4
    "64:ff9b::a00:1",
    "64:ff9b::7f00:1",
    "64:ff9b:1::101:101",
    "2002:a00:1::1",
    "2002:7f00:1::",
]
PUBLIC = [
    "1.1.1.1", "172.15.255.255", "172.32.0.1", "2606:4700:4700::1111", "::ffff:1.1.1.1",
    "64:ff9b::101:101", "2002:101:101::1",  # 1.1.1.1 through NAT64 and 6to4
]  # fmt: skip


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket or name lookup fails the test: the policy must decide from the address alone."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the address policy touched the network")

    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)


@pytest.mark.parametrize("address", REFUSED_BY_DEFAULT)
def test_non_public_addresses_are_refused_by_default(no_network: None, address: str) -> None:
    assert not may_connect(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(no_network: None, address: str) -> None:
    assert may_connect(address)


@pytest.mark.parametrize(
    ("address", "networks", "allowed"),
    [
        ("10.0.0.1", ["10.0.0.0/8"], True),
        ("10.0.0.1", ["10.0.0.0/24", "192.168.0.0/16"], True),
        ("10.0.1.1", ["10.0.0.0/24"], False),
        ("169.254.169.254", ["10.0.0.0/8"], False),  # allowing one network opens no other
        ("127.0.0.1", ["127.0.0.1/32"], True),
        ("127.0.0.2", ["127.0.0.1/32"], False),
        ("::1", ["::1/128"], True),
        ("::1", ["127.0.0.0/8"], False),
        ("fd12::1", ["fc00::/7"], True),
    ],
)
def test_allowed_networks_open_exactly_themselves(
    no_network: None, address: str, networks: list[str], allowed: bool
) -> None:
    assert may_connect(address, [ipaddress.ip_network(n) for n in networks]) is allowed


# --- the guard in the fetcher, on loopback targets only ---


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"])
def test_loopback_hosts_are_refused_by_default(origin: str, host: str) -> None:
    port = origin.rsplit(":", 1)[1]
    refused(f"http://{host}:{port}/image", "forbidden_address", allowed_networks=[])


def test_redirect_to_an_address_outside_the_allowed_networks_is_refused(origin: str) -> None:
    port = origin.rsplit(":", 1)[1]
    # First hop allowed (127.0.0.1/32), the second is not: 127.0.0.2, also written IPv4-mapped
    # (::ffff:127.0.0.2, loopback on the wire) and as the short form 127.2 of 127.0.0.2.
    for target in (
        f"http://127.0.0.2:{port}/image",
        f"http://[::ffff:127.0.0.2]:{port}/image",
        f"http://127.2:{port}/image",
    ):
        refused(f"{origin}/to?{target}", "forbidden_address")
    # After an allowed redirect (127.0.0.1 to itself), the refused hop is still checked.
    refused(f"{origin}/to?{origin}/to?http://127.0.0.2:{port}/image", "forbidden_address")


def test_redirect_to_another_scheme_is_refused(origin: str) -> None:
    refused(f"{origin}/to?file:///etc/passwd", "unsupported_url")


def test_allowed_domains_are_enforced_on_every_hop(origin: str) -> None:
    refused(f"{origin}/image", "forbidden_domain", allowed_domains=["images.example.com"])
    assert fetch(f"{origin}/image", allowed_domains=["127.0.0.1"]) == BODY
    refused(f"{origin}/to?http://localhost:1/x", "forbidden_domain", allowed_domains=["127.0.0.1"])
