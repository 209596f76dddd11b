"""How the proxy relays what an upstream sends (tsnsrv.proxy over aiohttp), against an
upstream that writes scripted bytes on a real loopback socket: every framing arrives
complete, and a body the upstream cuts short is never passed on as complete.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tsnsrv.access import TAILNET
from tsnsrv.config import load
from tsnsrv.front import Peer
from tsnsrv.metrics import Metrics
from tsnsrv.proxy import WHOLE_BODY_LIMIT, Proxy

from harness.inprocess import raw_exchange, served

PEER = Peer("100.64.0.9", 1234, TAILNET, tls=False)
BIG = WHOLE_BODY_LIMIT * 4  # past what is read whole: streamed
RESET = b"<reset>"  # at the end of a scripted answer: the upstream resets the connection after it
STALL = b"<stall>"  # ...or sends nothing more and keeps it open
PAUSE = b"<pause>"  # within a scripted answer: the upstream waits PAUSE_SECONDS before the rest
PAUSE_SECONDS = 0.3


def scripted(status_and_headers: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 " + status_and_headers + b"\r\n\r\n" + body


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback upstream that answers every connection with the next scripted answer
    and then closes it; the test appends the answers, and finds the request heads it
    received after them."""
    answers: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        answer = answers.pop(0)
        *pieces, last = answer.removesuffix(RESET).removesuffix(STALL).split(PAUSE)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(PAUSE_SECONDS)
        writer.write(last)
        answers.append(head)
        await writer.drain()
        if answer.endswith(RESET):  # close with a reset (RST), not a FIN
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if answer.endswith(STALL):
            await reader.read()  # until the proxy gives up on it
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], answers
    server.close()


async def through_proxy(port: int, request: bytes = b"GET /x HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n",
                        **config) -> bytes:
    cfg = load({"name": "books", "toURL": f"http://127.0.0.1:{port}", "upstreamRetryWindow": 0, **config})
    proxy = Proxy(cfg, None, Metrics())
    try:
        async with served(proxy.handle, PEER) as front:
            return await raw_exchange(front, request)
    finally:
        await proxy.close()


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """(the body, whether its last chunk came)"""
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out, body == b"\r\n"
        out, body = out + body[:size], body[size + 2:]
    return out, False


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [10, BIG])
@pytest.mark.parametrize("idle_timeout", [0, 5], ids=["no idle timeout", "idle timeout"])
async def test_a_body_with_a_length_arrives_with_that_length(upstream, size, idle_timeout):
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nContent-Length: %d" % size, b"x" * size))
    head, _, body = (await through_proxy(port, upstreamIdleTimeout=idle_timeout)).partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % size in head and body == b"x" * size


@pytest.mark.asyncio
async def test_a_close_delimited_body_arrives_whole_and_properly_ended(upstream):
    port, answers = upstream
    answers.append(scripted(b"200 OK", b"y" * BIG))
    head, _, body = (await through_proxy(port)).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert dechunk(body) == (b"y" * BIG, True)


@pytest.mark.asyncio
async def test_a_close_delimited_body_cut_by_a_reset_is_never_properly_ended(upstream):
    port, answers = upstream
    answers.append(scripted(b"200 OK", b"y" * BIG) + RESET)
    head, _, body = (await through_proxy(port)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    _, ended = dechunk(body) if body else (b"", False)
    assert not ended  # a reset may have cut it anywhere: the client must not take it for all of it


@pytest.mark.asyncio
@pytest.mark.parametrize("idle_timeout", [0, 5], ids=["no idle timeout", "idle timeout"])
async def test_a_short_body_cut_before_its_length_is_a_502(upstream, idle_timeout):
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nContent-Length: 100", b"z" * 50))
    answer = await through_proxy(port, upstreamIdleTimeout=idle_timeout)
    assert answer.startswith(b"HTTP/1.1 502 ") and b"the upstream of books" in answer


@pytest.mark.asyncio
async def test_a_long_body_cut_before_its_length_cuts_the_client_off(upstream):
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nContent-Length: %d" % BIG, b"z" * (BIG // 2)))
    head, _, body = (await through_proxy(port)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % BIG in head
    assert len(body) < BIG  # the length betrays the cut


@pytest.mark.asyncio
async def test_a_chunked_body_cut_midway_never_gets_its_last_chunk(upstream):
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nTransfer-Encoding: chunked", b"%x\r\n" % BIG + b"w" * 100))
    head, _, body = (await through_proxy(port)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    _, ended = dechunk(body) if body else (b"", False)
    assert not ended


@pytest.mark.asyncio
async def test_a_head_response_keeps_its_length_and_has_no_body(upstream):
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nContent-Length: 1234", b""))
    answer = await through_proxy(port, b"HEAD /x HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Length: 1234" in head and body == b""


@pytest.mark.asyncio
async def test_the_upstream_gets_no_header_the_client_did_not_send_but_ours(upstream):
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nContent-Length: 2", b"ok"))
    await through_proxy(port, b"POST /x HTTP/1.1\r\nHost: books\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
    [head] = answers
    names = {line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:] if line}
    assert not names & {b"accept", b"accept-encoding", b"user-agent", b"content-type"}, head
    assert b"content-length" in names and b"x-forwarded-for" in names


@pytest.mark.asyncio
async def test_a_body_that_never_starts_is_a_504_not_a_cut(upstream):
    # Its head is held back for its first bytes: nothing went out, so the client gets a page.
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nContent-Length: %d" % BIG, b"") + STALL)
    answer = await through_proxy(port, upstreamIdleTimeout=0.5)
    assert answer.startswith(b"HTTP/1.1 504 ") and b"timed out" in answer


@pytest.mark.asyncio
async def test_a_small_body_that_keeps_coming_outlives_the_idle_timeout(upstream):
    # Read whole before its head goes out, it still gets the idle timeout from its last
    # bytes, not from its head (found by the soak: event streams with a length got 504s).
    port, answers = upstream
    events = [b"data: %d\n\n" % i for i in range(5)]
    answers.append(scripted(b"200 OK\r\nContent-Length: %d" % len(b"".join(events)), PAUSE.join(events)))
    head, _, body = (await through_proxy(port, upstreamIdleTimeout=PAUSE_SECONDS * 2)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"".join(events)


@pytest.mark.asyncio
async def test_a_stream_that_stalls_after_its_head_is_cut_off(upstream):
    # An event stream's head goes out at once: after that, only a cut can tell the client.
    port, answers = upstream
    answers.append(scripted(b"200 OK\r\nTransfer-Encoding: chunked", b"5\r\nfirst\r\n") + STALL)
    head, _, body = (await through_proxy(port, upstreamIdleTimeout=0.5)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and dechunk(body) == (b"first", False)


@pytest_asyncio.fixture
async def drops_idle_connections() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback upstream that answers one request per connection and keeps it open, then
    closes it without an answer when the next request arrives on it: a keep-alive
    connection that went dead in the pool just as the proxy reused it."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = False
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            if answered:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            answered = True
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], heads
    server.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("second, resent", [
    (b"GET /b HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n", True),
    (b"DELETE /b HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n", True),
    # Idempotent, but its body went out as it came and is kept nowhere: it cannot go again.
    (b"PUT /b HTTP/1.1\r\nHost: books\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", False),
    # It may have been acted on: never sent twice.
    (b"POST /b HTTP/1.1\r\nHost: books\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", False),
], ids=["GET", "DELETE", "PUT with a body", "POST"])
async def test_a_dead_pooled_connection_costs_only_a_request_that_cannot_go_again(drops_idle_connections, second,
                                                                                  resent):
    port, heads = drops_idle_connections
    cfg = load({"name": "books", "toURL": f"http://127.0.0.1:{port}", "upstreamRetryWindow": 0})
    proxy = Proxy(cfg, None, Metrics())
    try:
        async with served(proxy.handle, PEER) as front:
            first = await raw_exchange(front, b"GET /a HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n")
            answer = await raw_exchange(front, second)
    finally:
        await proxy.close()
    assert first.startswith(b"HTTP/1.1 200 ")
    method = second.split(b" ")[0]
    if resent:  # once more, on a new connection
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
        assert [head.split(b" ")[0] for head in heads] == [b"GET", method, method]
    else:  # the client hears of it
        assert answer.startswith(b"HTTP/1.1 502 ") and b"dropped the connection" in answer
        assert [head.split(b" ")[0] for head in heads] == [b"GET", method]
