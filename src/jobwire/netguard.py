"""Fetching URLs that untrusted users chose, without letting them reach inside.

A task that fetches a URL from its input (the demo's extract_post) runs on the server's
network: without a guard any guest can read internal pages, cloud metadata and scan
ports. `fetch()` refuses every address that is not public. The check happens in the
connection itself: `GuardedBackend` resolves the host, refuses the connection if any
address is not public, and connects to the very address it checked, so a name that
resolves differently a moment later (DNS rebinding) gains nothing, and every redirect
hop is checked the same way. It also bounds the whole fetch by one deadline and the
decoded body by a size, decompressing incrementally, so a slow drip or a gzip bomb
costs neither a worker slot for long nor memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import socket
import zlib
from collections.abc import Iterable

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PRIVATE = [ipaddress.ip_network(n) for n in
            ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; Python calls it neither
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # DNS64 maps public IPv4 hosts here
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # site-local translation
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/?#]*@", re.IGNORECASE)


class FetchError(Exception):
    """The page could not be fetched; the message quotes the URL without credentials."""


class Unavailable(FetchError):
    """The fetch failed in a way that may pass: the connection failed, or the server
    answered 5xx or 429. Worth trying again later, unlike other FetchErrors."""


class Refused(FetchError):
    """The URL or an address it resolves to may not be fetched."""


def redact(url: str | httpx.URL) -> str:
    """The URL as it may be quoted: userinfo (`user:pass@`) replaced by `***@`."""
    return _USERINFO.sub(r"\1***@", str(url))


def _kind(ip: IPAddress) -> str | None:
    """What makes an address non-public, or None if it is public."""
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:  # 169.254.169.254, the cloud metadata service, is one
        return "a link-local address"
    if ip.is_multicast:  # which Python 3.11 calls global
        return "a multicast address"
    if ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if any(ip in net for net in _PRIVATE):
        return "a private address"
    if not ip.is_global or ip in _NAT64_LOCAL:
        return "not a public address"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, compatible, 6to4, NAT64)."""
    if ip.ipv4_mapped or ip.sixtofour:
        return ip.ipv4_mapped or ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are IPv6's own
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def classify(ip: IPAddress) -> str | None:
    """Why `ip` may not be fetched (e.g. "a loopback address"), or None if it may."""
    inner = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if inner is None:
        return _kind(ip)
    kind = _kind(inner)
    return f"an IPv6 form of {inner}, {kind}" if kind else None


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order. getaddrinfo also reads
    numeric forms the way connect would (2130706433, 0x7f.1, 017700000001 are 127.0.0.1)."""
    found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in found))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to public addresses.

    It resolves the host itself and connects to the address it checked; TLS and the
    Host header still use the host name (httpcore passes them separately)."""

    def __init__(self, allow_private: bool = False) -> None:
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    # The timeout parameters are httpcore's interface, not ours.
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"could not resolve {host}: {exc}") from exc
        if not self.allow_private:
            for address in addresses:  # one non-public answer refuses the host
                ip = ipaddress.ip_address(address.split("%")[0])
                kind = classify(ip)
                if kind is not None:
                    which = host if _is_ip(host) else f"{host} resolves to {ip}, which"
                    raise Refused(f"{which} is {kind}")
        error = httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout,
                                                     local_address=local_address,
                                                     socket_options=socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise Refused("Unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(allow_private: bool = False) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through GuardedBackend."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)  # a proxy would connect for us
    # httpx takes no network backend; its connection pool passes this one to each connection.
    transport._pool._network_backend = GuardedBackend(allow_private)
    return transport


@dataclasses.dataclass(frozen=True)
class Page:
    url: str  # after redirects
    status: int
    body: bytes
    encoding: str

    @property
    def text(self) -> str:
        return self.body.decode(self.encoding, "replace")


def _check_url(url: httpx.URL) -> None:
    if url.scheme not in ("http", "https"):
        raise Refused("only http and https are fetched")
    if url.userinfo:
        raise Refused("URLs with credentials are not fetched")


async def fetch(url: str, *, max_bytes: int, deadline: float, allow_private: bool = False,
                max_redirects: int = 5) -> Page:
    """GET `url` following up to `max_redirects` redirects, each hop checked; the whole of
    it (connects, redirects, body) within `deadline` seconds and at most `max_bytes` of
    decoded body. Raises FetchError (Refused for what may not be fetched)."""
    try:
        request_url = httpx.URL(url)
    except httpx.InvalidURL:
        raise Refused(f"refused to fetch {redact(url)}: not a valid URL") from None
    async with httpx.AsyncClient(transport=guarded_transport(allow_private), trust_env=False,
                                 headers={"Accept-Encoding": "gzip"}) as http:
        request = http.build_request("GET", request_url)
        try:
            async with asyncio.timeout(deadline):
                for _ in range(max_redirects + 1):
                    _check_url(request.url)
                    response = await http.send(request, stream=True)
                    try:
                        following = response.next_request
                        if following is None:
                            return await _read(response, max_bytes)
                    finally:
                        await response.aclose()
                    request = following
        except TimeoutError:
            raise FetchError(f"gave up on {redact(request.url)}: the fetch took longer than "
                             f"{deadline:g} s") from None
        except Refused as exc:
            raise Refused(f"refused to fetch {redact(request.url)}: {exc}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"could not fetch {redact(request.url)}: "
                             f"{type(exc).__name__}: {exc}") from None
    raise FetchError(f"gave up on {redact(url)}: more than {max_redirects} redirects")


async def _read(response: httpx.Response, max_bytes: int) -> Page:
    url = redact(response.url)
    if not response.is_success:
        error = Unavailable if response.status_code >= 500 or response.status_code == 429 \
            else FetchError
        raise error(f"{url} answered {response.status_code} {response.reason_phrase}")
    coding = response.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ("", "identity", "gzip", "x-gzip"):
        raise FetchError(f"{url} came with Content-Encoding {coding!r}; only gzip was asked")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if "gzip" in coding else None
    body = bytearray()

    def keep(piece: bytes) -> None:
        body.extend(piece)
        if len(body) > max_bytes:
            raise FetchError(f"{url} is larger than {max_bytes} bytes (decoded)")

    try:
        async for raw in response.aiter_raw():
            if inflate is None:
                keep(raw)
                continue
            while raw:
                # Never more than one byte over the limit at once: a bomb stays small.
                keep(inflate.decompress(raw, max_bytes + 1 - len(body)))
                raw = inflate.unconsumed_tail
        if inflate is not None:
            keep(inflate.flush())
    except zlib.error as exc:
        raise FetchError(f"{url} sent a broken gzip body: {exc}") from None
    return Page(str(response.url), response.status_code, bytes(body), response.encoding or "utf-8")
