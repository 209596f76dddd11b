"""Request smuggling, tried as an attacker would: requests whose framing two HTTP parsers
could read differently, sent to the real front (aiohttp's server as tsnsrv sets it up)
and the real Proxy, over loopback, to an upstream that parses what arrives with h11 (a
strict parser of its own) and records every request it sees.

A smuggled request would reach the upstream without the proxy having judged it: here it
targets /admin, which the service denies (404), so any request for /admin that the
upstream records got past the rules. Whatever the front accepts, the upstream must see
exactly the requests the client was answered for, each with the body the front read;
what the front cannot read one way only it must refuse (400) and forward nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import attrs
import h11
import pytest
import pytest_asyncio

from tsnsrv.access import TAILNET
from tsnsrv.config import load
from tsnsrv.front import Peer
from tsnsrv.metrics import Metrics
from tsnsrv.proxy import Proxy

from harness.inprocess import raw_exchange, served

PEER = Peer("100.64.0.9", 1234, TAILNET, tls=False)
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: books\r\n\r\n"
# Every attack ends with this request, so that the server closes the connection at once
# after answering it instead of when it has been idle for a while.
LAST = b"GET /last HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n"


@attrs.define
class Seen:
    method: str
    target: str
    body: bytes


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[int, list[Seen]]]:
    """A keep-alive upstream that reads requests with h11 and answers each with 200 and
    the body's length; a stream h11 cannot read is recorded as the target '<unreadable>'."""
    seen: list[Seen] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        request, body = None, b""
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    connection.receive_data(data)
                    if not data and connection.their_state is not h11.SEND_BODY:
                        break
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    seen.append(Seen(request.method.decode(), request.target.decode(), body))
                    answer = str(len(body)).encode()
                    writer.write(connection.send(h11.Response(status_code=200, headers=[
                        ("Content-Length", str(len(answer))), ("X-Upstream", "yes")])))
                    writer.write(connection.send(h11.Data(data=answer)) + connection.send(h11.EndOfMessage()))
                    await writer.drain()
                    connection.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError:
            seen.append(Seen("?", "<unreadable>", b""))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()


async def attack(upstream_port: int, data: bytes) -> list[tuple[int, bool]]:
    """Send `data` on one connection to the front; the answers as (status, from the upstream)."""
    cfg = load({"name": "books", "toURL": f"http://127.0.0.1:{upstream_port}", "denyPrefixes": ["/admin"],
                "upstreamRetryWindow": 0})
    proxy = Proxy(cfg, None, Metrics())
    try:
        async with served(proxy.handle, PEER) as front:
            answered = await raw_exchange(front, data)
    finally:
        await proxy.close()
    return answers(answered)


def answers(data: bytes) -> list[tuple[int, bool]]:
    """The responses on the wire, each (status, whether the upstream sent it); every
    answer here has a Content-Length."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
        data = data[int(headers["content-length"]):]
        found.append((int(status_line.split(" ")[1]), headers.get("x-upstream") == "yes"))
    return found


def post(headers: bytes, body: bytes, then: bytes = SMUGGLED) -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: books\r\n" + headers + b"\r\n" + body + then + LAST


# Framings that two parsers may read differently: each either refused whole, or read one
# way that the upstream then gets re-framed by tsnsrv.
AMBIGUOUS = {
    "CL.TE": post(b"Content-Length: 44\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "TE.CL": post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                  b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED), then=b""),
    "two lengths": post(b"Content-Length: 0\r\nContent-Length: 37\r\n", b""),
    "length list": post(b"Content-Length: 0, 37\r\n", b""),
    "signed length": post(b"Content-Length: +0\r\n", b""),
    "TE chunked then identity": post(b"Transfer-Encoding: chunked, identity\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    "TE not chunked": post(b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    "TE twice": post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n",
                     b"0\r\n\r\n"),
    "space before colon": post(b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    "obs-fold TE": post(b"X-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    "bare LF in head": b"POST /upload HTTP/1.1\nHost: books\nContent-Length: 5\n\n0\r\n\r\n" + SMUGGLED + LAST,
    "chunk size with junk": post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk extension with bare LF": post(b"Transfer-Encoding: chunked\r\n", b"5;a=b\nhello\r\n0\r\n\r\n"),
    "HTTP/1.0 with TE": b"POST /upload HTTP/1.0\r\nHost: books\r\nTransfer-Encoding: chunked\r\n"
                        b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED + LAST,
}


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", AMBIGUOUS, ids=list(AMBIGUOUS))
async def test_no_framing_smuggles_a_request_past_the_rules(upstream, framing):
    port, seen = upstream
    responses = await attack(port, AMBIGUOUS[framing])
    assert not [request for request in seen if request.target in ("/admin", "<unreadable>")], seen
    # Every request the upstream got is one the client was answered for from the upstream,
    # and the upstream read it as one request whose body it could frame.
    assert len(seen) == sum(from_upstream for _, from_upstream in responses), (responses, seen)
    # What the front could not read one way only, it refused.
    assert all(status in (200, 400, 404) for status, _ in responses), responses
    if not seen:
        assert responses[:1] == [(400, False)], responses


@pytest.mark.asyncio
async def test_the_harness_sees_a_second_request_when_there_is_one(upstream):
    """The control: a well-framed body and a pipelined request after it reach the upstream
    as two requests, and the denied one is answered by tsnsrv, not the upstream."""
    port, seen = upstream
    allowed = b"GET /books HTTP/1.1\r\nHost: books\r\n\r\n"
    responses = await attack(port, post(b"Content-Length: 5\r\n", b"hello", then=allowed + SMUGGLED))
    assert [(request.target, request.body) for request in seen] == [("/upload", b"hello"), ("/books", b""),
                                                                      ("/last", b"")]
    assert responses == [(200, True), (200, True), (404, False), (200, True)]


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_that_looks_like_a_request_stays_a_body(upstream, framing):
    port, seen = upstream
    headers = b"Content-Length: %d\r\n" % len(SMUGGLED) if framing == "length" else b"Transfer-Encoding: chunked\r\n"
    body = SMUGGLED if framing == "length" else b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    responses = await attack(port, post(headers, body, then=b""))
    assert [(request.target, request.body) for request in seen] == [("/upload", SMUGGLED), ("/last", b"")]
    assert responses == [(200, True), (200, True)]


UPGRADE = b"GET /chat HTTP/1.1\r\nHost: books\r\nConnection: Upgrade\r\nUpgrade: %s\r\n" \
          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"


async def upgrade_then_request(upstream_port: int, protocol: bytes) -> list[tuple[int, bool]]:
    """Ask for an upgrade, wait for its answer, then write a request into what the client
    hopes is now a tunnel to the upstream; the answers as (status, from the upstream)."""
    cfg = load({"name": "books", "toURL": f"http://127.0.0.1:{upstream_port}", "denyPrefixes": ["/admin"],
                "upstreamRetryWindow": 0})
    proxy = Proxy(cfg, None, Metrics())
    try:
        async with served(proxy.handle, PEER) as front:
            reader, writer = await asyncio.open_connection("127.0.0.1", front)
            writer.write(UPGRADE % protocol)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            first = head + await asyncio.wait_for(reader.readexactly(length), 5)
            writer.write(SMUGGLED + LAST)
            rest = await asyncio.wait_for(reader.read(), 5)  # LAST closes the connection
            writer.close()
    finally:
        await proxy.close()
    return answers(first + rest)


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [b"websocket", b"h2c"])
async def test_an_upgrade_the_upstream_declines_opens_no_tunnel(upstream, protocol):
    """Upgrade smuggling: the upstream answers the upgrade with a plain 200, and the client
    then sends a request on what it hopes is a tunnel to the upstream. It is no tunnel: the
    request is read as HTTP and judged by tsnsrv (404), as the Go tsnsrv does."""
    port, seen = upstream
    responses = await upgrade_then_request(port, protocol)
    assert [request.target for request in seen] == ["/chat", "/last"], seen
    assert responses == [(200, True), (404, False), (200, True)]
