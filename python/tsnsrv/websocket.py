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
from collections.abc import Callable
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

    A side that stops taking bytes (its transport's buffer full) pauses reading on the
    other until it drains, so nothing piles up in between. `on_bytes(from_client, n)`
    counts what passes. With an `idle_timeout`, a session without a byte either way for
    that long is over (`idled`)."""

    def __init__(self, client: RequestHandler, upstream: ClientResponse,
                 on_bytes: Callable[[bool, int], None], idle_timeout: float = 0.0):
        connection = upstream.connection
        assert connection is not None and connection.protocol is not None
        loop = asyncio.get_running_loop()
        self._client = client
        self._upstream = connection.protocol
        self._upstream_response = upstream
        self._writers = {True: StreamWriter(self._upstream, loop), False: StreamWriter(client, loop)}
        self._held: dict[bool, bool] = {True: False, False: False}
        self._frames = {True: FrameBoundaries(), False: FrameBoundaries()}
        self._on_bytes = on_bytes
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self.idled = False
        self._going_away = False
        self._said_goodbye = False
        self.done: asyncio.Future[None] = loop.create_future()

    def start(self) -> None:
        """Relay from now on, starting with bytes either side sent right after its head."""
        self._touch()
        self._upstream.set_parser(_Side(self, from_client=False), _Side(self, from_client=False))
        self._client.set_parser(_Side(self, from_client=True))

    def _touch(self) -> None:
        if not self._idle_timeout:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self.idled = True
        self.finished()

    def relay(self, data: bytes, from_client: bool) -> None:
        frames = self._frames[from_client]
        frames.feed(data)
        if self._said_goodbye:
            if from_client and frames.closed:
                self.finished()  # the client answered our close: the session is over
            return  # the client has our close already: the upstream's answer to its own is not for it
        target = self._upstream if from_client else self._client
        transport = target.transport
        if transport is None or transport.is_closing():
            return
        self._on_bytes(from_client, len(data))
        transport.write(data)
        if target.writing_paused and not self._held[from_client]:
            self._hold(from_client)
        if self._idle_timeout:
            self._touch()
        if self._going_away:
            self._maybe_say_goodbye()

    def _hold(self, from_client: bool) -> None:
        """Stop reading the sender until the receiver's transport has drained."""
        self._held[from_client] = True
        sender = self._client if from_client else self._upstream
        sender.pause_reading()

        async def release() -> None:
            try:
                await self._writers[from_client].drain()
            except ConnectionError:
                return  # the receiver is gone; the session ends through its connection_lost
            finally:
                self._held[from_client] = False
            if not self.done.done():
                sender.resume_reading()
        asyncio.ensure_future(release())

    def going_away(self) -> None:
        """Say goodbye (1001) to both sides, between frames."""
        self._going_away = True
        self._maybe_say_goodbye()

    def _maybe_say_goodbye(self) -> None:
        inbound, outbound = self._frames[True], self._frames[False]
        if not (self._going_away and inbound.at_boundary and outbound.at_boundary):
            return  # between frames only; the next byte that ends one brings us back here
        self._going_away, self._said_goodbye = False, True
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


class _Side:
    """What aiohttp feeds one side's bytes to once it has switched protocols (its
    `set_parser` contract: feed_data, feed_eof; set_exception on the upstream side)."""

    __slots__ = ("_relay", "_from_client")

    def __init__(self, relay: RawRelay, from_client: bool):
        self._relay, self._from_client = relay, from_client

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if data:
            self._relay.relay(data, self._from_client)
        return False, b""

    def feed_eof(self) -> None:
        self._relay.finished()

    def set_exception(self, exc: BaseException, *_args: Any) -> None:
        self._relay.finished()
