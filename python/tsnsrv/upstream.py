"""Connections to the upstream: a pool of keep-alive HTTP/1.1 connections (TCP, TLS or a
unix socket), each an asyncio protocol whose responses llhttp parses as they arrive.

A connection carries one exchange at a time. The proxy hands it a `ResponseHandler` and
writes the request; the connection calls the handler back with 1xx heads, the response
head, body chunks and trailers, or the failure. After a 101 it passes raw bytes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import httptools

from .http1 import WRITE_BUFFER_HIGH, HeaderList
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_RESPONSE_HEAD = 10 << 20  # Go's http.Transport default for response headers
IDLE_KEEPALIVE_SECONDS = 30.0


class UpstreamProtocolError(Exception):
    """The upstream sent something that is not a valid HTTP/1.1 response."""


class ResponseHandler(Protocol):
    def on_informational(self, status: int, reason: bytes, headers: HeaderList) -> None: ...
    def on_head(self, status: int, reason: bytes, headers: HeaderList) -> None: ...
    def on_body(self, chunk: bytes) -> None: ...
    def on_end(self, trailers: HeaderList) -> None: ...
    def on_upgraded(self, early: bytes) -> None: ...
    def on_raw(self, data: bytes) -> None: ...
    def on_error(self, exc: BaseException) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.handler: ResponseHandler | None = None
        self.reusable = True
        self.closed = False
        self.writing_paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = False  # the response to a HEAD request: no body follows its head
        self._headers: HeaderList = []
        self._trailers: HeaderList = []
        self._head_size = 0
        self._in_head = True
        self._final = False
        self._raw = False
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- the exchange ----------------------------------------------------------------

    def begin(self, handler: ResponseHandler, head_only: bool) -> None:
        self.handler, self._head_only = handler, head_only
        self._headers, self._trailers, self._head_size, self._in_head, self._final = [], [], 0, True, False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(parts)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.reusable = False
        self.handler = None
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._raw:
            if self.handler is not None:
                self.handler.on_raw(data)
            return
        if self.handler is None:  # bytes on an idle connection: it cannot be trusted again
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._raw, self.reusable = True, False
            handler = self.handler
            if handler is not None:
                handler.on_upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(str(exc.__context__ or exc)))

    def eof_received(self) -> bool | None:
        return None  # close: connection_lost follows, which ends a relayed session too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed, self.reusable = True, False
        self.pool.forget(self)
        handler, self.handler = self.handler, None
        if handler is None:
            return
        if self._raw:
            handler.on_end([])
        elif not self._in_head and self._final and self._close_delimited():
            handler.on_end(self._trailers)  # a body without length ends with the connection
        else:
            handler.on_error(exc or ConnectionResetError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.handler is not None:
            self.handler.on_upstream_writable(False)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.handler is not None:
            self.handler.on_upstream_writable(True)

    # --- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers, self._head_size, self._in_head = [], 0, True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            self._trailers.append((name, value))
            return
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_RESPONSE_HEAD:
            raise UpstreamProtocolError("response head over 10 MiB")

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        handler = self.handler
        if handler is None:
            return
        if 100 <= status < 200 and status != 101:
            handler.on_informational(status, getattr(self, "_reason", b""), self._headers)
            self._in_head = True  # the final response is still to come
            return
        self._final = True
        handler.on_head(status, getattr(self, "_reason", b""), self._headers)
        if self._head_only and self.handler is not None:
            # llhttp cannot be told that a HEAD response has no body: finish here, and
            # do not reuse the connection, whose next bytes it would misread.
            self.reusable = False
            self.handler = None
            handler.on_end([])

    def on_body(self, body: bytes) -> None:
        if self.handler is not None:
            self.handler.on_body(body)

    def on_message_complete(self) -> None:
        if not self._final or self._parser.get_status_code() == 101:
            return  # the end of a 1xx, or of the head before an upgrade: raw bytes follow
        handler, self.handler = self.handler, None
        self.reusable = self.reusable and bool(self._parser.should_keep_alive())
        if handler is not None:
            handler.on_end(self._trailers)

    def _close_delimited(self) -> bool:
        return not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._headers)

    def _fail(self, exc: BaseException) -> None:
        handler = self.handler
        self.abort()
        if handler is not None:
            handler.on_error(exc)

    def idle_since_release(self) -> None:
        self._idle_timer = asyncio.get_running_loop().call_later(IDLE_KEEPALIVE_SECONDS, self._expire)

    def _expire(self) -> None:
        self._idle_timer = None
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()


Connect = Callable[[Callable[[], UpstreamConnection]], Awaitable[tuple[asyncio.BaseTransport, UpstreamConnection]]]


class UpstreamPool:
    """Idle keep-alive connections, most recently used first; new ones on demand."""

    def __init__(self, connect: Connect, connect_timeout: float, metrics: Metrics):
        self._connect = connect
        self._connect_timeout = connect_timeout or None
        self._metrics = metrics
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()

    def take_idle(self) -> UpstreamConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def connect(self) -> UpstreamConnection:
        started = time.perf_counter()
        async with asyncio.timeout(self._connect_timeout):
            _transport, connection = await self._connect(lambda: UpstreamConnection(self))
        self._metrics.upstream_connect.observe(time.perf_counter() - started)
        self._open.add(connection)
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        if connection.closed or not connection.reusable or connection.handler is not None:
            if not connection.closed:
                connection.abort()
            return
        # Its last response may have ended while a slow client held its reads paused; idle,
        # it must be read again: for the next response, and to notice the upstream closing it.
        connection.resume_reading()
        connection.idle_since_release()
        self._idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._idle.clear()


def connector(*, unix_path: str | None, host: str, port: int, ssl_context: ssl.SSLContext | None,
              server_hostname: str | None) -> Connect:
    """How the pool opens a connection to the upstream."""
    loop_factory = asyncio.get_running_loop

    async def connect(factory: Callable[[], UpstreamConnection]) -> tuple[asyncio.BaseTransport, UpstreamConnection]:
        loop = loop_factory()
        if unix_path is not None:
            return await loop.create_unix_connection(factory, unix_path, ssl=ssl_context,
                                                     server_hostname=server_hostname if ssl_context else None)
        return await loop.create_connection(factory, host, port, ssl=ssl_context,
                                            server_hostname=server_hostname if ssl_context else None)
    return connect
