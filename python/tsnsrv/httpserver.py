"""aiohttp's low-level HTTP/1.1 server, set up the way a reverse proxy's front needs it.

The front listener hands each client connection (after the peer check, the PROXY header
and TLS) to a `ClientConnection`: aiohttp's own server protocol (`RequestHandler`, llhttp
underneath), which parses requests, keeps connections alive, pipelines and frames
responses. What this module adds, each for a behaviour the suite pins:

- Go net/http's limits: up to 1 MiB of request head, as many header fields as fit in it,
  and 431 beyond (aiohttp's limits are per line and per count, so the parser is wrapped to
  count whole heads);
- a deadline for request heads (slowloris) that is also the idle keep-alive timeout;
- the peer (who the PROXY header says the client is) on the connection;
- error pages and responses without what aiohttp adds on its own: no `Server:
  Python/... aiohttp/...` banner, no `Content-Type: application/octet-stream` guessed for
  an upstream's untyped body.

aiohttp is pinned (python/pyproject.toml): the two overrides below use its
`RequestHandler._parser` and `StreamResponse._prepare_headers`, and tests/unit/
test_httpserver.py fails if a new version moves them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import hdrs
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
# aiohttp's server modules themselves: `aiohttp.web` would also load its application
# framework (router, file responses, multipart, runners), 1.4 MiB per service for nothing.
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import Response, StreamResponse
from aiohttp.web_server import Server

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 1 << 20  # Go's http.DefaultMaxHeaderBytes
# Bytes a transport may hold unsent before its writer waits: with asyncio's 64 KiB, a bulk
# transfer stops and starts its source every few reads (measured with bench/run).
WRITE_BUFFER_HIGH = 1 << 20
READ_BUFFER = 1 << 18  # request body aiohttp holds before it stops reading the client
NO_TIMEOUT = 10 * 365 * 86400.0  # aiohttp closes idle connections at once with a timeout of 0


class HeadTooLarge(HttpProcessingError):
    code = 431
    message = "the request head is over 1 MiB"


class _HeadLimit:
    """aiohttp's request parser, refusing a request head over MAX_REQUEST_HEAD.

    Bytes count while no request body is being read; they count from the start of a read,
    so a head may pass that is at most one read (256 KiB) over the limit. Raising the
    parser's own error type lets aiohttp answer through `handle_error`, as for any bad
    request."""

    __slots__ = ("_parser", "_head_bytes", "_body")

    def __init__(self, parser: Any):
        self._parser = parser
        self._head_bytes = 0
        self._body: Any = None

    def feed_data(self, data: bytes) -> Any:
        body = self._body
        if body is None or body.is_eof():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD:
                raise HeadTooLarge()
        result = self._parser.feed_data(data)
        messages = result[0]
        if messages:
            self._head_bytes = 0
            self._body = messages[-1][1]
        return result

    def message_consumed(self) -> None:  # once per request: not through __getattr__
        self._parser.message_consumed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class ClientConnection(RequestHandler):
    """One client connection; `peer` is who the front listener found behind it."""

    __slots__ = ("peer",)

    def __init__(self, server: FrontServer, peer: Any):
        super().__init__(server, loop=server.loop, keepalive_timeout=server.idle_timeout, tcp_keepalive=False,
                         access_log=None, max_line_size=MAX_REQUEST_HEAD, max_field_size=MAX_REQUEST_HEAD,
                         max_headers=MAX_REQUEST_HEAD // 4, read_bufsize=READ_BUFFER, auto_decompress=False)
        self.peer = peer
        self._parser = _HeadLimit(self._parser)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[attr-defined]
        super().connection_made(transport)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        """A request aiohttp's parser refused (or a handler bug): a short page, and close."""
        if isinstance(exc, (HeadTooLarge, LineTooLong)) or (
                isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
            status, text = 431, "431 Request Header Fields Too Large: the request head is over 1 MiB."
        elif status == 500:
            log.error("request handler failed", exc_info=exc)
            text = "500 Internal Server Error"
        else:
            log.debug("refused a request from %s: %s", getattr(self.peer, "address", "?"), exc)
            text = f"{status} Bad Request: {getattr(exc, 'message', None) or message or exc}"
        response = plain_response(status, text)
        response.force_close()
        return response


class FrontServer(Server):
    """aiohttp's low-level server for one kind of client (tailnet or Funnel): its requests go
    to `handler`, each on a `ClientConnection` made for the peer the front listener found.

    `idle_timeout` bounds both the wait for a request head and the idle time between
    requests (Go's ReadHeaderTimeout with IdleTimeout unset); 0 means none. A client that
    leaves cancels its handler, which frees the upstream connection at once."""

    def __init__(self, handler: Any, idle_timeout: float):
        super().__init__(handler, handler_cancellation=True)
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout or NO_TIMEOUT

    def connection(self, peer: Any) -> ClientConnection:
        return ClientConnection(self, peer)

    async def drain(self, timeout: float) -> None:
        """Close idle connections now and every other one once its response is out; cut
        off what is still running after `timeout`."""
        self.pre_shutdown()
        await self.shutdown(timeout)


class _AddsNothing:
    """Leaves out what aiohttp adds to a response on its own: its `Server` banner, and a
    Content-Type guessed for an upstream's untyped body (Date and the framing stay)."""

    async def _prepare_headers(self) -> None:
        headers = self._headers  # type: ignore[attr-defined]
        had_server, had_type = hdrs.SERVER in headers, hdrs.CONTENT_TYPE in headers
        await super()._prepare_headers()  # type: ignore[misc]
        if not had_server:
            headers.pop(hdrs.SERVER, None)
        if not had_type:
            headers.pop(hdrs.CONTENT_TYPE, None)


class ProxyResponse(_AddsNothing, StreamResponse):
    """A streamed response: its head goes out at once (a long poll or an event stream
    must see it before any body)."""


class CoalescedResponse(ProxyResponse):
    """A streamed response whose head waits for its first body bytes: one write, one packet."""

    _send_headers_immediately = False


class WholeResponse(_AddsNothing, Response):
    """A whole response, its head and body in one write: a page of ours (a refusal, an
    error, a redirect), or an upstream's short body read at once."""


def plain_response(status: int, text: str = "", headers: Any = None) -> WholeResponse:
    """A short text/plain page (none for an empty text)."""
    if not text:
        return WholeResponse(status=status, headers=headers)
    return WholeResponse(status=status, text=text + "\n", content_type="text/plain", headers=headers)
