"""HTTP/1.1 on the wire, lean: one asyncio protocol per connection, llhttp (httptools) to
parse, bytes passed through as they arrive.

`ServerConnection` serves one client connection (the front listener's, after the PROXY
header and TLS, and the control socket's): it parses requests, hands each to the
application as an `Exchange` once its head is complete, and writes what the application
answers. Bodies stream through callbacks, never buffered whole; the transports' flow
control (pause_writing / pause_reading) carries back-pressure across. `request` is a
small client for local HTTP services (tailscaled's LocalAPI, the control socket).

Limits are Go net/http's: 1 MiB of request head (answered with 431), no cap on the
number of header fields.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httptools

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 1 << 20  # Go's http.DefaultMaxHeaderBytes
BUFFER_BEFORE_PAUSE = 1 << 20  # request body held for an application not yet reading it
# Bytes a transport may hold unsent before its sender is paused: with asyncio's 64 KiB,
# a bulk transfer stops and starts its source every few reads (measured with bench/run).
WRITE_BUFFER_HIGH = 1 << 20
HeaderList = list[tuple[bytes, bytes]]


def reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def head_bytes(start_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return start_line + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"


def status_line(status: int, reason: bytes | None = None) -> bytes:
    return b"HTTP/1.1 %d %s" % (status, reason if reason is not None else reason_phrase(status))


def last_chunk(trailers: HeaderList | None = None) -> bytes:
    return b"0\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in trailers or ()) + b"\r\n"


def header_value(headers: HeaderList, lower_name: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lower_name:
            return value
    return None


def connection_tokens(headers: HeaderList) -> set[bytes]:
    """The lowercase tokens of every Connection header (the hop-by-hop fields they name)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return tokens


class HeadTooLarge(Exception):
    pass


class Request:
    """A request head as the client sent it."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade")

    def __init__(self, method: str, target: str, version: str, headers: HeaderList, keep_alive: bool,
                 upgrade: bool):
        self.method = method
        self.target = target  # raw, as on the request line
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade

    def header(self, lower_name: bytes) -> bytes | None:
        return header_value(self.headers, lower_name)


class Exchange:
    """One request and its response on a ServerConnection.

    The application reads the body with `read_body(on_data, on_end)` (chunks as they arrive;
    `on_end` gets the trailers) and answers with `respond` (a whole response), or with
    `start_response`, `write` and `finish` (streamed), after any `informational` (1xx).
    `on_client_writable(paused)` is told when the client stops and starts taking bytes, and
    `on_client_gone()` when it hangs up."""

    def __init__(self, connection: ServerConnection, request: Request):
        self.connection = connection
        self.request = request
        self.peer = connection.peer
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.trailers: HeaderList = []
        self.body_complete = False
        self.response_started = False
        self.response_done = False
        self.client_gone = False
        self.on_client_writable: Callable[[bool], None] | None = None
        self.on_client_gone: Callable[[], None] | None = None
        self.upgraded_sink: Callable[[bytes], None] | None = None  # raw bytes after an accepted upgrade
        self.early = b""  # raw bytes that came right after an upgrade request
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._on_data: Callable[[bytes], None] | None = None
        self._on_end: Callable[[HeaderList], None] | None = None
        self._chunked = False
        self._no_body = False

    # --- the request body ----------------------------------------------------------

    def read_body(self, on_data: Callable[[bytes], None], on_end: Callable[[HeaderList], None]) -> None:
        self._on_data, self._on_end = on_data, on_end
        pending, self._pending, self._pending_size = self._pending, [], 0
        for chunk in pending:
            on_data(chunk)
        if self.body_complete:
            on_end(self.trailers)
        self.connection.resume_reading()

    def _body(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        if self._on_data is not None:
            self._on_data(chunk)
            return
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size > BUFFER_BEFORE_PAUSE:
            self.connection.pause_reading()

    def _body_end(self) -> None:
        self.body_complete = True
        if self._on_end is not None:
            self._on_end(self.trailers)

    # --- the response ----------------------------------------------------------------

    def informational(self, status: int, reason: bytes, headers: HeaderList) -> None:
        self.connection.write(head_bytes(status_line(status, reason), headers))

    def start_response(self, status: int, headers: HeaderList, *, reason: bytes | None = None,
                       length: int | None = None, no_body: bool = False, first: bytes = b"") -> None:
        """Send the head. Without `length` (and with a body) the body goes chunked, or
        close-delimited to an HTTP/1.0 client. `first` is body sent in the same write."""
        self.status = status
        self.response_started = True
        self._no_body = no_body
        out = list(headers)
        if not no_body and length is None and status != 101:
            if self.request.version == "1.1":
                self._chunked = True
                out.append((b"Transfer-Encoding", b"chunked"))
            else:
                self.connection.close_after_response = True
        elif length is not None:
            out.append((b"Content-Length", b"%d" % length))
        if status != 101 and (self.connection.close_after_response or not self.request.keep_alive):
            out.append((b"Connection", b"close"))
            self.connection.close_after_response = True
        head = head_bytes(status_line(status, reason), out)
        if first and not no_body:
            self.bytes_out += len(first)
            head += b"%x\r\n%s\r\n" % (len(first), first) if self._chunked else first
        self.connection.write(head)

    def write(self, data: bytes) -> None:
        if not data or self._no_body:
            return
        self.bytes_out += len(data)
        if self._chunked:
            self.connection.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.connection.write(data)

    def finish(self, trailers: HeaderList | None = None) -> None:
        if self.response_done:
            return
        self.response_done = True
        if self._chunked:
            self.connection.write(last_chunk(trailers))
        self.connection.exchange_finished(self)

    def respond(self, status: int, body: bytes = b"", headers: HeaderList | None = None,
                content_type: bytes = b"text/plain; charset=utf-8") -> None:
        """A whole response in one write."""
        out = list(headers or ())
        if body:
            out.append((b"Content-Type", content_type))
        self.start_response(status, out, length=len(body), no_body=self.request.method == "HEAD", first=body)
        self.finish()

    def abort(self) -> None:
        """Cut the client off (mid-response, an upstream failed)."""
        self.response_done = True
        self.connection.abort()

    def upgraded(self, sink: Callable[[bytes], None]) -> None:
        """From now on raw bytes from the client go to `sink`, starting with any that came
        right after the upgrade request."""
        self.upgraded_sink = sink
        early, self.early = self.early, b""
        if early:
            sink(early)


Application = Callable[[Exchange], None]


class ServerConnection(asyncio.Protocol):
    """One client connection. `app(exchange)` is called as each request head completes;
    requests that arrive pipelined wait for the one before them to finish.

    Between requests (and before the first) the client has `header_timeout` to deliver a
    complete request head; a slowloris trickle or an idle keep-alive connection past that
    is closed, like Go's ReadHeaderTimeout with IdleTimeout unset."""

    def __init__(self, app: Application, peer: Any = None, header_timeout: float = 0.0,
                 on_closed: Callable[[ServerConnection], None] | None = None):
        self.app = app
        self.peer = peer
        self.header_timeout = header_timeout
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.close_after_response = False
        self.current: Exchange | None = None
        self._queue: list[Exchange] = []
        self._receiving: Exchange | None = None  # the request whose body is being parsed
        self._latest: Exchange | None = None
        self._url: list[bytes] = []
        self._headers: HeaderList = []
        self._head_size = 0
        self._headers_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._upgrade: Exchange | None = None
        self.closed = False

    @property
    def idle(self) -> bool:
        return self.current is None and not self._queue and not self._url and not self._headers

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None:  # past an upgrade request: raw bytes, not HTTP
            if self._upgrade.upgraded_sink is not None:
                self._upgrade.upgraded_sink(data)
            else:
                self._upgrade.early += data  # until the upstream has agreed
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade = self._latest
            if self._upgrade is not None:
                self._upgrade.early = data[upgrade.args[0]:]  # handed over by `upgraded`
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._refuse(431, b"431 Request Header Fields Too Large: the request head is over 1 MiB.\n")
            else:
                raise
        except httptools.HttpParserError as exc:
            self._refuse(400, f"400 Bad Request: {exc}\n".encode())

    def eof_received(self) -> bool | None:
        return None  # close our side too once the response is out (asyncio closes the transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm_header_timer()
        for exchange in [self.current, *self._queue]:
            if exchange is not None and not exchange.response_done:
                exchange.client_gone = True
                if exchange.on_client_gone is not None:
                    exchange.on_client_gone()
        if self.on_closed is not None:
            self.on_closed(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.current is not None and self.current.on_client_writable is not None:
            self.current.on_client_writable(False)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.current is not None and self.current.on_client_writable is not None:
            self.current.on_client_writable(True)

    # --- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._head_size, self._headers_done = [], [], 0, False

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > MAX_REQUEST_HEAD:
            raise HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:  # a trailer of a chunked request body
            if self._receiving is not None:
                self._receiving.trailers.append((name, value))
            return
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_REQUEST_HEAD:
            raise HeadTooLarge()

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._disarm_header_timer()
        parser = self.parser
        request = Request(parser.get_method().decode("latin-1"), b"".join(self._url).decode("latin-1"),
                          parser.get_http_version(), self._headers, parser.should_keep_alive(),
                          parser.should_upgrade())
        self._url, self._headers = [], []
        exchange = Exchange(self, request)
        self._receiving = self._latest = exchange
        if self.current is None:
            self._begin(exchange)
        else:
            self._queue.append(exchange)
            self.pause_reading()  # one pipelined request at a time is enough

    def on_body(self, body: bytes) -> None:
        if self._receiving is not None:
            self._receiving._body(body)

    def on_message_complete(self) -> None:
        if self._receiving is not None:
            receiving, self._receiving = self._receiving, None
            receiving._body_end()

    # --- for exchanges ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(parts)

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self.current:
            return
        self.current = None
        if self._upgrade is exchange and exchange.upgraded_sink is None:
            self.close_after_response = True  # the parser is past the upgrade: nothing more to read
        if self.close_after_response or not exchange.request.keep_alive or not exchange.body_complete:
            # An unread request body would be read as the next request; close instead.
            self.close()
            return
        if self._queue:
            self._begin(self._queue.pop(0))
        else:
            self._arm_header_timer()
        # Reads may have been paused for a pipelined request, or by back-pressure from the
        # upstream that lasted to the end of the exchange: the next request must be read.
        self.resume_reading()

    def _begin(self, exchange: Exchange) -> None:
        self.current = exchange
        try:
            self.app(exchange)
        except Exception:  # noqa: BLE001 - a bug must not take the connection's other requests down unseen
            log.exception("request handler failed")
            if not exchange.response_started:
                exchange.respond(500, b"500 Internal Server Error\n")
            else:
                exchange.abort()

    def _refuse(self, status: int, page: bytes) -> None:
        """A request the parser refused: answer (if nothing is answered yet) and close."""
        self.close_after_response = True
        exchange = self._receiving or self.current
        if exchange is None or not exchange.response_started:
            self.write(head_bytes(status_line(status), [(b"Content-Type", b"text/plain; charset=utf-8"),
                                                         (b"Content-Length", b"%d" % len(page)),
                                                         (b"Connection", b"close")]) + page)
        self.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        if self.header_timeout > 0 and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(self.header_timeout, self._head_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_too_slow(self) -> None:
        log.debug("closing a connection: no request head within %.0fs", self.header_timeout)
        self.close()


# --- a small client for local services ---------------------------------------------


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class ClientResponse:
    """A response being read: `status` and `headers` once `request` returns, then the body
    with `read()` (whole) or `async for chunk in response` (as it arrives)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self.status = 0
        self.headers: HeaderList = []
        self._chunks: list[bytes] = []
        self._head_done = False
        self._done = False
        self._parser = httptools.HttpResponseParser(self)

    def header(self, lower_name: bytes) -> bytes | None:
        return header_value(self.headers, lower_name)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._head_done = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._done = True

    async def _feed(self) -> bool:
        """Read more; False at the end of the body."""
        if self._done:
            return False
        data = await self._reader.read(65536)
        if not data:
            if self._head_done and self.header(b"content-length") is None \
                    and self.header(b"transfer-encoding") is None:
                self._done = True  # a close-delimited body ends here
                return False
            raise ConnectionError("the server closed the connection before the response was complete")
        self._parser.feed_data(data)
        return True

    async def read_head(self) -> None:
        while not self._head_done:
            if not await self._feed():
                raise ConnectionError("the server closed the connection before answering")

    def __aiter__(self) -> ClientResponse:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if not await self._feed():
                raise StopAsyncIteration
        return self._chunks.pop(0)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    def close(self) -> None:
        self._writer.close()


async def request(open_connection: Opener, method: str, target: str, host: str,
                  headers: HeaderList | None = None, body: bytes = b"") -> ClientResponse:
    """Send one request on a fresh connection; returns once the response head is in.
    Close the response when done with it."""
    reader, writer = await open_connection()
    response = ClientResponse(reader, writer)
    try:
        out = [(b"Host", host.encode()), (b"Content-Length", b"%d" % len(body)), *(headers or ())]
        writer.write(head_bytes(f"{method} {target} HTTP/1.1".encode(), out) + body)
        await response.read_head()
    except BaseException:
        response.close()
        raise
    return response
