"""Remote images over HTTP(S), fetched with one shared client and guarded against SSRF.

The guard sits where the socket is made: every connection (each redirect hop, each new pooled
connection) resolves the host once, refuses it if any address is loopback, private, link-local,
multicast, reserved or unspecified (unless the operator allowed that network), connects to the
vetted address itself (so a second DNS answer cannot differ), and checks the peer address of the
connected socket. Redirects are followed here, hop by hop, so each hop's URL is checked too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from qwen_server import __version__
from qwen_server.errors import Kind

USER_AGENT = f"qwen-server/{__version__} (image fetcher)"
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """A URL the server will not or could not fetch; `reason` is a short machine-readable cause."""

    def __init__(self, message: str, reason: str, kind: Kind = Kind.INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.kind = kind


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: a network's own translator


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global and not multicast. An IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4) is
    judged by the IPv4 address a translator or relay would reach."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return False
        embedded = address.ipv4_mapped or address.sixtofour
        if address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return embedded.is_global and not embedded.is_multicast
    return address.is_global and not address.is_multicast


def may_connect(address: str, allowed_networks: Iterable[Network] = ()) -> bool:
    """Whether the fetcher may connect to `address` (as getaddrinfo or a socket's peer names it, an
    IPv6 scope id included): a public address, or one inside `allowed_networks`. The whole address
    policy, as a pure function: it only decides, it connects to nothing."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return is_public(ip) or any(ip in net for net in allowed_networks)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address check in front of every TCP connect."""

    def __init__(self, allowed_networks: Iterable[Network]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allowed = tuple(allowed_networks)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchError(
                f"The image host {host!r} could not be resolved: {exc.strerror}.", "unresolvable"
            ) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        refused = [a for a in addresses if not may_connect(a, self._allowed)]
        if refused:
            raise FetchError(
                f"The image host {host!r} resolves to {refused[0]}, a non-public address this server does "
                "not fetch from.",
                "forbidden_address",
            )
        last: Exception | None = None
        for address in addresses:
            try:
                stream = await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            peer = stream.get_extra_info("server_addr")
            if not peer or not may_connect(peer[0], self._allowed):
                await stream.aclose()
                raise FetchError(f"The connection to {host!r} reached a non-public address.", "forbidden_address")
            return stream
        raise last or FetchError(f"No address of {host!r} could be connected to.", "fetch_failed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class Fetcher:
    """One pooled client per worker; `fetch` returns the body or raises `FetchError`."""

    def __init__(
        self,
        *,
        timeout: float,
        max_redirects: int,
        allowed_domains: Iterable[str] | None = None,
        allowed_networks: Iterable[str] = (),
    ) -> None:
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.allowed_domains = {d.lower().rstrip(".") for d in allowed_domains} if allowed_domains else None
        transport = httpx.AsyncHTTPTransport(trust_env=False, limits=httpx.Limits(max_connections=64))
        # httpx takes no network backend, so its pool is rebuilt with ours (httpx pinned < 0.29;
        # tests/unit/media/test_fetch.py fails if a fetch to loopback stops being refused).
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=64,
            max_keepalive_connections=16,
            keepalive_expiry=30.0,
            network_backend=_GuardedBackend(ipaddress.ip_network(n, strict=False) for n in allowed_networks),
        )
        # Proxies from the environment are ignored: the guard must see the image host, not a proxy.
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _check_url(self, url: httpx.URL) -> None:
        if url.scheme not in ("http", "https"):
            raise FetchError(f"Image URLs must be http or https, got {url.scheme!r}.", "unsupported_url")
        if not url.host:
            raise FetchError("The image URL has no host.", "unsupported_url")
        if self.allowed_domains is not None and url.host.lower().rstrip(".") not in self.allowed_domains:
            raise FetchError(f"The image host {url.host!r} is not in the allowed media domains.", "forbidden_domain")

    async def fetch(self, url: str, max_bytes: int) -> bytes:
        """The body of `url` after at most `max_redirects` redirects, cut at `max_bytes`; the whole
        exchange (every hop and the body) is bounded by `timeout`."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url, max_bytes)
        except TimeoutError:
            raise FetchError(f"Fetching the image took longer than {self.timeout:g} s.", "timeout") from None
        except httpx.TimeoutException:
            raise FetchError(f"Fetching the image took longer than {self.timeout:g} s.", "timeout") from None
        except httpx.InvalidURL as exc:
            raise FetchError(f"Invalid image URL: {exc}.", "unsupported_url") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"The image could not be fetched: {type(exc).__name__}: {exc}.", "fetch_failed") from None

    async def _fetch(self, url: str, max_bytes: int) -> bytes:
        current = httpx.URL(url)
        for _ in range(self.max_redirects + 1):
            self._check_url(current)
            async with self._client.stream("GET", current) as response:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    current = current.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchError(f"The image URL answered HTTP {response.status_code}.", "fetch_failed")
                return await _read_limited(response, max_bytes)
        raise FetchError(f"The image URL redirected more than {self.max_redirects} times.", "too_many_redirects")


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"The image is {declared} bytes, over the limit of {max_bytes}.", "too_large", Kind.TOO_LARGE)
    body = bytearray()
    async for chunk in response.aiter_bytes(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(f"The image is larger than the limit of {max_bytes} bytes.", "too_large", Kind.TOO_LARGE)
    return bytes(body)
