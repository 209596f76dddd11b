"""Websocket sessions relayed as raw bytes after the 101, and just enough of the framing
(RFC 6455) to close them politely.

Once both sides have switched protocols, aiohttp hands each connection's bytes to a parser
of our choosing (`set_parser`, as its own websocket classes do); ours pass them on to the
other side unread, so close codes, reasons and extensions such as permessage-deflate go
through untouched. The relay follows only frame headers, so that at shutdown it can put a
`1001 Going Away` close between two frames instead of inside one.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

from aiohttp import ClientResponse
from aiohttp.http import StreamWriter
from aiohttp.web_protocol import RequestHandler

GOING_AWAY = 1001


class FrameBoundaries:
    """Follows one direction of a session; `at_boundary` when no frame is half through."""

    def __init__(self) -> None:
        self._header = b""  # a frame header still arriving
        self._payload_left = 0
        self.closed = False  # a close frame went by

    @property
    def at_boundary(self) -> bool:
        return not self._header and self._payload_left == 0

    def feed(self, data: bytes) -> None:
        position, end = 0, len(data)
        while position < end:
            if self._payload_left:
                step = min(self._payload_left, end - position)
                self._payload_left -= step
                position += step
                continue
            take = min(14 - len(self._header), end - position)
            candidate = self._header + data[position:position + take]
            length = _frame_header_length(candidate)
            if length is None:  # the header goes on in the next bytes
                self._header = candidate
                position += take
                continue
            position += length - len(self._header)
            header, self._header = candidate[:length], b""
            if header[0] & 0x0F == 0x8:
                self.closed = True
            self._payload_left = _payload_length(header)


def _frame_header_length(header: bytes) -> int | None:
    if len(header) < 2:
        return None
    size = header[1] & 0x7F
    length = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if header[1] & 0x80 else 0)
    return length if len(header) >= length else None


def _payload_length(header: bytes) -> int:
    size = header[1] & 0x7F
    if size == 126:
        return struct.unpack_from("!H", header, 2)[0]
    if size == 127:
        return struct.unpack_from("!Q", header, 2)[0]
    return size


def close_frame(code: int, reason: bytes, masked: bool) -> bytes:
    """A close frame; frames a client sends must be masked (RFC 6455 5.3)."""
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes([0x88, len(payload)]) + payload
    key = os.urandom(4)
    return bytes([0x88, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawRelay:
    """One session between the client's connection (aiohttp's server protocol) and the
    upstream's (its client protocol), both past their 101. `done` resolves when either
    side is gone or, after a goodbye, has answered it; `end` closes both.

    `inbound` relays the client's bytes to the upstream, `outbound` the upstream's to the
    client; each counts what it passed. With an `idle_timeout`, a session without a byte
    either way for that long is over (`idled`)."""

    def __init__(self, client: RequestHandler, upstream: ClientResponse, idle_timeout: float = 0.0):
        connection = upstream.connection
        assert connection is not None and connection.protocol is not None
        loop = asyncio.get_running_loop()
        self._client, self._upstream = client, connection.protocol
        self._upstream_response = upstream
        self.inbound = _Direction(self, client, self._upstream, from_client=True)
        self.outbound = _Direction(self, self._upstream, client, from_client=False)
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self.idled = False
        self.going = False  # a goodbye is due at the next frame boundary both ways
        self.said_goodbye = False
        self.done: asyncio.Future[None] = loop.create_future()

    def start(self) -> None:
        """Relay from now on, starting with bytes either side sent right after its head."""
        self.touch()
        self._upstream.set_parser(self.outbound, self.outbound)
        self._client.set_parser(self.inbound)

    def touch(self) -> None:
        """Bytes moved: the idle timeout starts again."""
        if not self._idle_timeout:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self.idled = True
        self.finished()

    def going_away(self) -> None:
        """Say goodbye (1001) to both sides, between frames."""
        self.going = True
        self.maybe_say_goodbye()

    def maybe_say_goodbye(self) -> None:
        inbound, outbound = self.inbound.frames, self.outbound.frames
        if not (self.going and inbound.at_boundary and outbound.at_boundary):
            return  # between frames only; the next byte that ends one brings us back here
        self.going, self.said_goodbye = False, True
        if not outbound.closed and self._client.transport is not None:
            self._client.transport.write(close_frame(GOING_AWAY, b"server shutting down", masked=False))
        if not inbound.closed and self._upstream.transport is not None:
            self._upstream.transport.write(close_frame(GOING_AWAY, b"proxy shutting down", masked=True))

    def finished(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def end(self) -> None:
        """Close both connections (what either still holds to send goes out first)."""
        self.finished()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._upstream_response.close()
        if self._client.transport is not None:
            self._client.transport.close()


class _Direction:
    """One direction of a session: what aiohttp feeds the sender's bytes to once it has
    switched protocols (its `set_parser` contract: feed_data, feed_eof; set_exception on
    the upstream side). A receiver that stops taking bytes (its transport's buffer full)
    pauses reading on the sender until it drains, so nothing piles up in between."""

    __slots__ = ("_relay", "_sender", "_receiver", "_from_client", "_held", "frames", "bytes")

    def __init__(self, relay: RawRelay, sender: Any, receiver: Any, from_client: bool):
        self._relay, self._sender, self._receiver = relay, sender, receiver
        self._from_client = from_client
        self._held = False
        self.frames = FrameBoundaries()
        self.bytes = 0

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        relay = self._relay
        self.frames.feed(data)
        if relay.said_goodbye:
            if self._from_client and self.frames.closed:
                relay.finished()  # the client answered our close: the session is over
            return False, b""  # the client has our close already: the upstream's answer is not for it
        receiver = self._receiver
        transport = receiver.transport
        if transport is None or transport.is_closing():
            return False, b""
        self.bytes += len(data)
        transport.write(data)
        if receiver.writing_paused and not self._held:
            self._hold()
        relay.touch()
        if relay.going:
            relay.maybe_say_goodbye()
        return False, b""

    def _hold(self) -> None:
        """Stop reading the sender until the receiver's transport has drained."""
        self._held = True
        self._sender.pause_reading()
        asyncio.ensure_future(self._release())

    async def _release(self) -> None:
        try:
            await StreamWriter(self._receiver, asyncio.get_running_loop()).drain()
        except ConnectionError:
            return  # the receiver is gone; the session ends through its connection_lost
        finally:
            self._held = False
        if not self._relay.done.done():
            self._sender.resume_reading()

    def feed_eof(self) -> None:
        self._relay.finished()

    def set_exception(self, exc: BaseException, *_args: Any) -> None:
        self._relay.finished()
