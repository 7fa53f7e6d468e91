"""jobwire.netguard: what a URL from a user may reach, for how long, and how much of it.

Every refusal is proven before any connection: `connects` records each connection the
guard lets through to the network backend, and fails the test on any that is not to a
loopback address, so a broken guard can never send traffic elsewhere."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpcore
import pytest

from jobwire import netguard
from jobwire.netguard import FetchError, Refused, fetch
from tests.rawhttp import head, page, redirect, serve

LIMIT = 2 * 1024 * 1024


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def spy(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        calls.append((host, port))
        assert ipaddress.ip_address(host).is_loopback, f"tried to connect to {host}"
        return await real(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", spy)
    return calls


def allow_only(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Treat `address` as public (tests cannot reach a public address; loopback stands in)."""
    real = netguard.classify
    monkeypatch.setattr(netguard, "classify",
                        lambda ip: None if str(ip) == address else real(ip))


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:9/secret", "127.0.0.1 is a loopback address"),
    ("http://127.8.9.10:9/", "127.8.9.10 is a loopback address"),
    ("http://[::1]:9/", "::1 is a loopback address"),
    ("http://localhost:9/", "localhost resolves to"),
    ("http://2130706433:9/", "2130706433 resolves to 127.0.0.1, which is a loopback address"),
    ("http://0x7f.1:9/", "0x7f.1 resolves to 127.0.0.1, which is a loopback address"),
    ("http://017700000001:9/", "resolves to 127.0.0.1, which is a loopback address"),
    ("http://[::ffff:127.0.0.1]:9/", "an IPv6 form of 127.0.0.1, a loopback address"),
    ("http://[::ffff:7f00:1]:9/", "an IPv6 form of 127.0.0.1, a loopback address"),
    ("http://[::7f00:1]:9/", "an IPv6 form of 127.0.0.1, a loopback address"),
    ("http://[2002:a00:1::]/", "an IPv6 form of 10.0.0.1, a private address"),
    ("http://[64:ff9b::a9fe:a9fe]/", "an IPv6 form of 169.254.169.254, a link-local address"),
    ("http://[64:ff9b:1::808:808]/", "not a public address"),
    ("http://10.1.2.3/", "10.1.2.3 is a private address"),
    ("http://172.16.5.4/", "172.16.5.4 is a private address"),
    ("http://172.31.255.1/", "a private address"),
    ("http://192.168.1.1/", "192.168.1.1 is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://100.64.0.1/", "100.64.0.1 is a shared (carrier-grade NAT) address"),
    ("http://100.127.255.254/", "carrier-grade NAT"),
    ("http://0.0.0.0:9/", "0.0.0.0 is an unspecified address"),
    ("http://[::]:9/", ":: is an unspecified address"),
    ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
    ("http://[ff02::1]/", "ff02::1 is a multicast address"),
    ("http://[fe80::1]/", "fe80::1 is a link-local address"),
    ("http://[fc00::1]/", "fc00::1 is a private address"),
    ("http://[fd00:ec2::254]/", "a private address"),
    ("http://192.0.2.1/", "192.0.2.1 is not a public address"),  # documentation
    ("http://198.18.0.1/", "not a public address"),  # benchmarking
    ("http://240.0.0.1/", "not a public address"),  # reserved
    ("http://255.255.255.255/", "not a public address"),
    ("http://[2001:db8::1]/", "not a public address"),
])
async def test_non_public_addresses_are_refused_before_connecting(
        connects: list[tuple[str, int]], url: str, why: str) -> None:
    with pytest.raises(Refused) as refused:
        await fetch(url, max_bytes=LIMIT, deadline=5)
    assert str(refused.value).startswith(f"refused to fetch {url}: ")
    assert why in str(refused.value)
    assert connects == []


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://127.0.0.1/", "only http and https are fetched"),
    ("file:///etc/passwd", "only http and https are fetched"),
    ("http://alice:s3cret@127.0.0.1:9/", "URLs with credentials are not fetched"),
    ("http://alice@127.0.0.1:9/", "URLs with credentials are not fetched"),
])
async def test_schemes_and_credentials_are_refused(
        connects: list[tuple[str, int]], url: str, why: str) -> None:
    with pytest.raises(Refused, match=why) as refused:
        await fetch(url, max_bytes=LIMIT, deadline=5, allow_private=True)
    assert "alice" not in str(refused.value) and "s3cret" not in str(refused.value)
    assert connects == []


async def test_a_name_is_checked_at_connect_time_and_connected_to_as_checked(
        connects: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once, inside the connection, and the checked address is the
    one connected to: resolving to another address a moment later (rebinding) is too late."""
    answers = [["127.0.0.1"], ["10.0.0.7"]]
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[min(len(asked), len(answers)) - 1]

    async def echo_host(host: str) -> AsyncIterator[bytes]:
        body = f"<title>{host}</title>".encode()
        yield head(headers=[("Content-Length", str(len(body)))]) + body

    monkeypatch.setattr(netguard, "resolve", rebinding)
    allow_only(monkeypatch, "127.0.0.1")
    async with serve({"/": echo_host}) as base:
        port = int(base.rsplit(":", 1)[1])
        got = await fetch(f"http://rebind.example:{port}/", max_bytes=LIMIT, deadline=5)
        assert got.text == f"<title>rebind.example:{port}</title>"  # Host kept the name
        assert connects == [("127.0.0.1", port)] and asked == ["rebind.example"]
        with pytest.raises(Refused) as refused:
            await fetch(f"http://rebind.example:{port}/", max_bytes=LIMIT, deadline=5)
    assert str(refused.value) == (f"refused to fetch http://rebind.example:{port}/: "
                                  "rebind.example resolves to 10.0.0.7, which is a private address")
    assert connects == [("127.0.0.1", port)]


async def test_one_non_public_answer_refuses_the_name(
        connects: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    async def split(host: str, port: int) -> list[str]:
        return ["127.0.0.1", "169.254.169.254"]

    monkeypatch.setattr(netguard, "resolve", split)
    allow_only(monkeypatch, "127.0.0.1")
    with pytest.raises(Refused, match=r"169\.254\.169\.254, which is a link-local address"):
        await fetch("http://split.example/", max_bytes=LIMIT, deadline=5)
    assert connects == []


async def test_every_redirect_hop_is_checked(
        connects: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve({"/landing": page(b"<title>inside</title>")}, host="127.0.0.2") as inside:
        routes = {"/go": redirect(f"{inside}/landing"),
                  "/creds": redirect(inside.replace("http://", "http://alice:s3cret@")),
                  "/file": redirect("file:///etc/passwd")}
        async with serve(routes) as base:
            port = int(base.rsplit(":", 1)[1])
            with pytest.raises(Refused, match=r"127\.0\.0\.1 is a loopback address"):
                await fetch(f"{base}/go", max_bytes=LIMIT, deadline=5)
            assert connects == []  # refused on the first hop by default

            allow_only(monkeypatch, "127.0.0.1")  # the first hop passes, as a public one would
            with pytest.raises(Refused) as refused:
                await fetch(f"{base}/go", max_bytes=LIMIT, deadline=5)
            assert str(refused.value) == (f"refused to fetch {inside}/landing: "
                                          "127.0.0.2 is a loopback address")
            assert connects == [("127.0.0.1", port)]

            for path, why in [("/creds", "URLs with credentials are not fetched"),
                              ("/file", "only http and https are fetched")]:
                with pytest.raises(Refused, match=why) as refused:
                    await fetch(base + path, max_bytes=LIMIT, deadline=5, allow_private=True)
                assert "s3cret" not in str(refused.value) and "alice" not in str(refused.value)
            assert {host for host, _ in connects} == {"127.0.0.1"}


async def test_private_addresses_are_fetched_when_allowed(
        connects: list[tuple[str, int]]) -> None:
    html = b"<html><head><title>inside</title></head><body><p>" + b"x" * 50_000 + b"</p>"
    gzipped = zlib.compress(html, wbits=31)
    routes = {"/go": redirect("/landing"),
              "/landing": page(gzipped, headers=[("Content-Encoding", "gzip"),
                                                 ("Content-Type", "text/html; charset=utf-8")])}
    async with serve(routes) as base:
        got = await fetch(f"{base}/go", max_bytes=LIMIT, deadline=5, allow_private=True)
    assert (got.url, got.status, got.body, got.encoding) == (f"{base}/landing", 200, html, "utf-8")
    assert connects and {host for host, _ in connects} == {"127.0.0.1"}


async def test_a_dripping_page_is_cut_at_the_deadline(connects: list[tuple[str, int]]) -> None:
    async def drip(host: str) -> AsyncIterator[bytes]:
        yield head()
        for _ in range(120):  # a minute at most, should the deadline fail
            yield b"<p>drip</p>"
            await asyncio.sleep(0.5)

    async with serve({"/": drip}) as base:
        started = time.monotonic()
        with pytest.raises(FetchError) as cut:
            await asyncio.wait_for(fetch(base + "/", max_bytes=LIMIT, deadline=2,
                                         allow_private=True), 15)
        took = time.monotonic() - started
    assert str(cut.value) == f"gave up on {base}/: the fetch took longer than 2 s"
    assert 1.9 < took < 3.5


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
async def test_a_large_body_is_refused_with_bounded_memory(
        connects: list[tuple[str, int]], encoding: str) -> None:
    if encoding == "gzip":  # 50 MB of zeros, 50 KB on the wire
        squash = zlib.compressobj(9, zlib.DEFLATED, 31)
        body = b"".join(squash.compress(bytes(1 << 20)) for _ in range(50)) + squash.flush()
    else:
        body = b"<p>" + b"x" * (3 << 20)
    route = page(body, headers=[("Content-Encoding", encoding)])
    async with serve({"/": route}) as base:
        tracemalloc.start()
        try:
            with pytest.raises(FetchError) as refused:
                await fetch(base + "/", max_bytes=LIMIT, deadline=10, allow_private=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert str(refused.value) == f"{base}/ is larger than {LIMIT} bytes (decoded)"
    assert peak < 3 * LIMIT + len(body), f"peak {peak} bytes"
