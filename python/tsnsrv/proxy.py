"""The request path: checks, identity, header rewriting, and relaying to the upstream.

`Proxy.handle` is aiohttp's request handler for the front listener. What can be decided
at once is decided at once (prefixes, rules, a cached identity); only a whois lookup and
the upstream are waited for. Bodies then flow in the chunks they arrive in, both ways,
with each side's flow control holding the other back: nothing is buffered whole or
spilled to disk. A websocket session is relayed as raw bytes after its 101
(websocket.RawRelay). Errors become short plain-text pages that name the service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from yarl import URL

from .access import AccessPolicy, Identity, PathPolicy, clean_path, has_control_characters
from .config import ServiceConfig
from .front import Peer
from .httpserver import (BaseRequest, CoalescedResponse, ProxyResponse, StreamResponse, WholeResponse,
                         plain_response)
from .identity import IdentityUnavailable, WhoisCache, is_spoofable, serve_headers, tsnsrv_headers
from .logs import AccessLog
from .metrics import Metrics
from .upstream import Upstream
from .websocket import RawRelay

if TYPE_CHECKING:
    from .assertion import Asserter

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
# Set by the proxy itself on the way in (a Content-Length goes on: it frames the body sent).
NOT_FORWARDED = HOP_BY_HOP | {"host", "expect"}
NOT_RETURNED = HOP_BY_HOP | {"content-length"}
WHOLE_BODY_LIMIT = 1 << 16  # a response body up to this size is read whole and sent with its head


def origin_form(target: str) -> tuple[str, str | None] | None:
    """The request target as path and query, with the authority of an absolute-form
    target; None if it is not one.

    HTTP/1.1 servers must accept the absolute form (`GET http://host/path`); its path is
    what prefixes and rules must see, or `http://books/admin` would slip past them, and its
    authority replaces the Host header (RFC 9112 3.2.2)."""
    if "#" in target:
        return None  # no fragment in a request target (RFC 9112 3.2); the upstream would drop it unchecked
    if target.startswith("/"):
        return target, None
    split = urlsplit(target)
    if split.scheme.lower() in ("http", "https") and split.netloc:
        return (split.path or "/") + (f"?{split.query}" if split.query else ""), split.netloc.rpartition("@")[2]
    return None


def join_url_path(base: str, raw_path: str) -> str:
    """Go's httputil joinURLPath: one slash between the upstream's base path and the request's."""
    if not base:
        return raw_path or "/"
    if not raw_path:
        return base
    if base.endswith("/") and raw_path.startswith("/"):
        return base + raw_path[1:]
    if not base.endswith("/") and not raw_path.startswith("/"):
        return base + "/" + raw_path
    return base + raw_path


def _valid_target(path: str) -> bool:
    """Whether `path` can go on a request line as it is (no spaces, controls or non-ASCII)."""
    return path.isascii() and path.isprintable() and " " not in path


def connection_tokens(value: str | None) -> frozenset[str]:
    """The hop-by-hop fields a Connection header names, lowercase."""
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


class UpstreamTimeout(Exception):
    pass


class UpstreamProtocolError(Exception):
    """The upstream answered with something the client did not ask for."""


class Exchange:
    """One request through the proxy: what the access log and the metrics record of it."""

    __slots__ = ("request", "peer", "started", "identity", "authority", "status", "bytes_in", "bytes_out", "note")

    def __init__(self, request: BaseRequest, peer: Peer):
        self.request = request
        self.peer = peer
        self.started = time.perf_counter()
        self.identity: Identity | None = None
        self.authority: str | None = None  # of an absolute-form request target
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.note = ""


class Proxy:
    def __init__(self, cfg: ServiceConfig, whois: WhoisCache | None, metrics: Metrics):
        self.cfg = cfg
        self.whois = whois
        self.metrics = metrics
        self.paths = PathPolicy.from_config(cfg.prefixes, cfg.deny_prefixes, cfg.strip_prefix)
        self.access = AccessPolicy.from_rules(cfg.access_rules)
        self.upstream = Upstream(cfg, metrics)
        self._send_identity = not cfg.suppress_whois
        self._extra_headers = list(cfg.upstream_headers.items())
        self._extra_names = {name.lower() for name in cfg.upstream_headers}
        self._access_log = AccessLog.if_enabled() if cfg.access_log else None
        self._timeouts = (cfg.upstream_response_header_timeout, cfg.upstream_idle_timeout)
        self.asserter: Asserter | None = None  # set by the service when assertions are on
        self.websockets: set[RawRelay] = set()

    # --- lifecycle -------------------------------------------------------------

    async def close_websockets(self) -> None:
        """Say goodbye (1001 Going Away) to both ends of every relayed websocket, between frames."""
        for relay in list(self.websockets):
            relay.going_away()

    async def close(self) -> None:
        await self.upstream.close()

    async def probe(self) -> dict[str, Any]:
        return await self.upstream.probe()

    # --- the request path --------------------------------------------------------

    async def handle(self, request: BaseRequest) -> StreamResponse:
        exchange = Exchange(request, request.protocol.peer)  # type: ignore[attr-defined]
        self.metrics.requests.in_flight += 1
        try:
            return await self._serve(exchange)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels the handler)
            if exchange.status != 101:
                exchange.status = 499
            raise
        finally:
            self._finish(exchange)

    async def _serve(self, exchange: Exchange) -> StreamResponse:
        request, peer = exchange.request, exchange.peer
        if request.method == "CONNECT":
            return self._refuse(exchange, 405, "method", "CONNECT is not proxied", "405 Method Not Allowed")
        if request.method == "OPTIONS" and request.raw_path == "*":
            return self._answer(exchange, 200)  # about the server itself, as Go's net/http answers it
        target = origin_form(request.raw_path)
        if target is None:
            return self._refuse(exchange, 400, "target", f"request target {request.raw_path[:100]!r} is not a "
                                      "path", "400 Bad Request: the request target must be a path.")
        path_and_query, exchange.authority = target
        raw_path, _, raw_query = path_and_query.partition("?")
        decoded = unquote(raw_path)
        if has_control_characters(decoded):
            return self._refuse(exchange, 400, "target", f"request path {raw_path[:100]!r} has control "
                                      "characters", "400 Bad Request: the request path has control characters.")
        clean = clean_path(decoded)
        if clean != decoded:
            # 308, not 301: a POST must stay a POST.
            exchange.note = "redirected to clean path"
            location = quote(clean) + ("?" + raw_query if raw_query else "")
            return self._answer(exchange, 308, headers={"Location": location})
        decision = self.paths.decide(raw_path, peer.provenance)
        if not decision.allowed:
            return self._refuse(exchange, 404, "prefix", decision.reason, "404 Not Found")
        upstream = self.upstream
        path = join_url_path(upstream.base_path, decision.upstream_raw_path)
        if not _valid_target(path):  # exactly the path that was checked, or nothing
            return self._refuse(exchange, 400, "target", f"request path {path[:100]!r} is not a valid path",
                                      "400 Bad Request: the request target is not a valid path.")

        identity_unavailable = False
        whois = self.whois
        if whois is not None and not peer.is_funnel:
            hit, exchange.identity = whois.cached(peer.address)
            if not hit:
                try:
                    exchange.identity = await whois.lookup(peer.address)
                except IdentityUnavailable:
                    identity_unavailable = True
        access = self.access.decide(raw_path, peer.provenance, exchange.identity, identity_unavailable)
        if access.unavailable:
            return self._refuse(exchange, 503, "identity_unavailable", access.reason,
                                      f"503 Service Unavailable: {self.cfg.name} could not check who you are; "
                                      "try again.")
        if not access.allowed:
            return self._refuse(exchange, 403, "access_rule", access.reason,
                                      f"403 Forbidden: {self._who(exchange)} may not use {self.cfg.name} here.")

        query = f"{upstream.base_query}&{raw_query}" if upstream.base_query and raw_query else \
            upstream.base_query or raw_query
        target = path + "?" + query if query else path
        url = upstream.url(target)
        upgrade = request.headers.get("Upgrade")
        websocket = upgrade is not None and upgrade.lower() == "websocket" and \
            "upgrade" in connection_tokens(request.headers.get("Connection"))
        headers = self.upstream_headers(exchange, upgrade if websocket else None, target)
        return await self._relay(exchange, url, headers, websocket)

    def _who(self, exchange: Exchange) -> str:
        if exchange.peer.is_funnel:
            return "A public (Funnel) client"
        return exchange.identity.describe() if exchange.identity else f"Client {exchange.peer.address}"

    def upstream_headers(self, exchange: Exchange, upgrade: str | None, target: str) -> list[tuple[str, str]]:
        """The client's headers minus hop-by-hop and spoofable ones, plus ours (as pairs:
        aiohttp makes its multidict of them in one go). `target` is the upstream request's."""
        request, peer, cfg = exchange.request, exchange.peer, self.cfg
        inbound = request.headers
        connection = inbound.get("Connection")
        dropped = connection_tokens(connection) if connection else ()
        headers = [(name, value) for name, value in inbound.items()
                   if (lower := name.lower()) not in NOT_FORWARDED and lower not in dropped
                   and not is_spoofable(lower)]
        host = exchange.authority or inbound.get("Host", "")
        scheme = "https" if peer.tls else "http"
        address = peer.address
        headers += [("Host", host if cfg.recommended_proxy_headers else self.upstream.netloc),
                    ("X-Forwarded-For", address), ("X-Forwarded-Host", host), ("X-Forwarded-Proto", scheme)]
        if cfg.recommended_proxy_headers:
            server, sep, port = host.rpartition(":")
            if not sep or not port.isdigit() or host.endswith("]"):
                server, port = host, ""
            headers += [("X-Scheme", scheme), ("X-Real-Ip", address), ("X-Forwarded-Server", server)]
            if port:
                headers.append(("X-Forwarded-Port", port))
        if self._send_identity:
            identity = exchange.identity
            if identity is not None and "tsnsrv" in cfg.identity_headers:
                headers += tsnsrv_headers(identity)
            if "serve" in cfg.identity_headers:
                headers += serve_headers(identity, peer.is_funnel, cfg.app_capabilities)
            if self.asserter is not None:
                headers += self.asserter.headers(identity, request.method, target)
        if self._extra_headers:  # configured headers win over the client's and ours
            headers = [pair for pair in headers if pair[0].lower() not in self._extra_names] + self._extra_headers
        if upgrade is not None:
            headers += [("Connection", "Upgrade"), ("Upgrade", upgrade)]
        return headers

    # --- relaying ----------------------------------------------------------------

    def _deadline(self, waiting_for_head: bool) -> float | None:
        """When the exchange times out from now: the response-header timeout while the
        upstream owes its head, and the idle timeout throughout."""
        header_timeout, idle_timeout = self._timeouts
        limits = [t for t in (header_timeout if waiting_for_head else 0.0, idle_timeout) if t]
        return asyncio.get_running_loop().time() + min(limits) if limits else None

    async def _relay(self, exchange: Exchange, url: URL, headers: list[tuple[str, str]],
                     websocket: bool) -> StreamResponse:
        request = exchange.request
        body = request.body_exists
        deadline = asyncio.timeout_at(self._deadline(waiting_for_head=not body))
        upstream: aiohttp.ClientResponse | None = None
        try:
            async with deadline:
                sent = time.perf_counter()
                try:
                    upstream = await self.upstream.request(
                        request.method, url, headers, self._upload(exchange, deadline) if body else None)
                except Exception as exc:  # noqa: BLE001 - every failure maps to a 502/504 page
                    return self._upstream_failed(exchange, exc, deadline)
                self.metrics.requests.upstream_heads.observe(time.perf_counter() - sent)
                deadline.reschedule(self._deadline(waiting_for_head=False))
                if upstream.status == 101:
                    if not websocket:  # only a websocket upgrade is asked for, and relayed
                        return self._upstream_failed(exchange, UpstreamProtocolError(
                            "101 Switching Protocols unasked"), deadline)
                    deadline.reschedule(None)  # the session keeps its own idle timeout
                    return await self._relay_websocket(exchange, upstream)
                return await self._relay_response(exchange, upstream, deadline)
        except TimeoutError:
            if not deadline.expired():
                raise
            return self._upstream_failed(exchange, UpstreamTimeout("no bytes moved within the timeout"),
                                               deadline)
        finally:
            if upstream is not None:
                upstream.close()  # unless its connection went back to the pool already (release)

    async def _upload(self, exchange: Exchange, deadline: asyncio.Timeout) -> AsyncIterator[bytes]:
        """The client's body as it arrives; the response-header timeout starts at its end."""
        request = exchange.request
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # as aiohttp's own expect handler
        content = request.content
        idle = self._timeouts[1]
        while chunk := await content.readany():
            exchange.bytes_in += len(chunk)
            if idle:
                deadline.reschedule(self._deadline(waiting_for_head=False))
            yield chunk
        deadline.reschedule(self._deadline(waiting_for_head=True))

    async def _relay_response(self, exchange: Exchange, upstream: aiohttp.ClientResponse,
                              deadline: asyncio.Timeout) -> StreamResponse:
        request = exchange.request
        upstream_headers = upstream.headers
        connection = upstream_headers.get("Connection")
        dropped = connection_tokens(connection) if connection else ()
        headers = [(name, value) for name, value in upstream_headers.items()
                   if (lower := name.lower()) not in NOT_RETURNED and lower not in dropped]
        status, reason, length = upstream.status, upstream.reason, upstream.content_length
        # exchange.status is set once the head goes out: a failure before that still gets a page.
        if request.method == "HEAD" or status in (204, 304):
            if length is not None:
                headers.append(("Content-Length", str(length)))
            upstream.release()
            exchange.status = status
            return WholeResponse(status=status, reason=reason, headers=headers)
        if length is not None and length <= WHOLE_BODY_LIMIT:
            try:
                body = await self._read_whole(upstream, deadline)
            except (aiohttp.ClientError, ConnectionError) as exc:
                return self._upstream_failed(exchange, exc, deadline)
            upstream.release()
            exchange.status, exchange.bytes_out = status, len(body)
            return WholeResponse(status=status, reason=reason, headers=headers, body=body)
        response = (ProxyResponse if length is None else CoalescedResponse)(status=status, reason=reason,
                                                                            headers=headers)
        if length is not None:
            response.content_length = length
        content, idle = upstream.content, self._timeouts[1]
        close_delimited = length is None and "chunked" not in upstream_headers.get("Transfer-Encoding", "").lower()
        try:
            if length is None:  # a stream (events, a long poll): its head goes out at once
                await response.prepare(request)
                exchange.status = status
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, ConnectionError) as exc:
                    return self._upstream_failed(exchange, exc, deadline)
                if not exchange.status:  # a body of known length: its head goes out with its first bytes
                    await response.prepare(request)
                    exchange.status = status
                if not chunk:
                    break
                exchange.bytes_out += len(chunk)
                await response.write(chunk)
                if idle:
                    deadline.reschedule(self._deadline(waiting_for_head=False))
            if close_delimited and upstream.cut_by_reset:  # type: ignore[attr-defined]
                return self._cut_off(exchange, ConnectionResetError("reset before the end of the body"))
            upstream.release()
            await response.write_eof()
        except ConnectionError:
            exchange.status = 499  # the client went away
        return response

    async def _read_whole(self, upstream: aiohttp.ClientResponse, deadline: asyncio.Timeout) -> bytes:
        """A small body of known length, read whole before its head goes out. The idle
        timeout counts from its latest bytes, as for a streamed body: a small body may
        still take long to arrive (events, a slow upstream) while it keeps coming."""
        if not self._timeouts[1]:
            return await upstream.read()
        parts = []
        while chunk := await upstream.content.readany():
            parts.append(chunk)
            deadline.reschedule(self._deadline(waiting_for_head=False))
        return b"".join(parts)

    async def _relay_websocket(self, exchange: Exchange, upstream: aiohttp.ClientResponse) -> StreamResponse:
        request = exchange.request
        headers = [(name, value) for name, value in upstream.headers.items() if name.lower() != "content-length"]
        response = ProxyResponse(status=101, reason=upstream.reason, headers=headers)
        response.force_close()  # the connection is the session's now
        exchange.status = 101
        try:
            await response.prepare(request)
        except ConnectionError:
            return response

        relay = RawRelay(request.protocol, upstream, self._timeouts[1])
        self.websockets.add(relay)
        self.metrics.websockets.inc()
        self.metrics.websockets_open.inc()
        try:
            relay.start()
            await relay.done
            if relay.idled:
                exchange.note = f"websocket idle for {self._timeouts[1]:g}s"
        finally:
            exchange.bytes_in, exchange.bytes_out = relay.inbound.bytes, relay.outbound.bytes
            self.websockets.discard(relay)
            self.metrics.websockets_open.dec()
            relay.end()
        return response

    # --- refusals, failures and the end of an exchange ------------------------------

    def _answer(self, exchange: Exchange, status: int, text: str = "",
                headers: dict[str, str] | None = None) -> StreamResponse:
        """A page of ours, which aiohttp sends once the handler returns it."""
        response = plain_response(status, text, headers)
        exchange.status = status
        if exchange.request.method != "HEAD":
            exchange.bytes_out = response.content_length or 0
        return response

    def _refuse(self, exchange: Exchange, status: int, reason: str, why: str, page: str) -> StreamResponse:
        exchange.note = why
        self.metrics.denied.labels(reason).inc()
        log.info("denied %s %s from %s: %s", exchange.request.method, exchange.request.raw_path[:200],
                 self._who(exchange), why)
        return self._answer(exchange, status, page)

    def _failure(self, exc: BaseException) -> tuple[int, str, str]:
        """(status, kind, what went wrong) of an upstream failure, counted."""
        if isinstance(exc, (UpstreamTimeout, TimeoutError)):
            status, kind, what = 504, "timeout", f"timed out ({exc or 'connect timeout'})"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            status, kind, what = 502, "connect", f"could not be reached ({exc.os_error.strerror or exc})"
        elif isinstance(exc, (UpstreamProtocolError, aiohttp.ClientResponseError, aiohttp.ClientPayloadError)):
            status, kind, what = 502, "protocol", f"sent no valid response ({exc})"
        elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)):
            status, kind, what = 502, "reset", f"dropped the connection ({exc})"
        else:
            status, kind, what = 502, "protocol", f"sent no valid response ({type(exc).__name__}: {exc})"
        self.metrics.upstream_failed(kind)
        return status, kind, what

    def _upstream_failed(self, exchange: Exchange, exc: BaseException,
                         deadline: asyncio.Timeout) -> StreamResponse:
        """A 502/504 page; or, once the response head went out, the client cut off."""
        if not deadline.expired():
            deadline.reschedule(None)  # the page goes out whatever the timeouts say
        if exchange.status:
            return self._cut_off(exchange, exc)
        status, kind, what = self._failure(exc)
        exchange.note = f"upstream {kind}: {exc}"
        request = exchange.request
        log.warning("%s: upstream %s for %s %s: %s", self.cfg.name, kind, request.method, request.raw_path[:200], exc)
        reason = "Gateway Timeout" if status == 504 else "Bad Gateway"
        return self._answer(exchange, status, f"{status} {reason}: the upstream of {self.cfg.name} {what}.")

    def _cut_off(self, exchange: Exchange, exc: BaseException) -> StreamResponse:
        """The upstream failed after the head went out: all we can do is cut the client off
        mid-body, so that neither a length nor chunked framing lets it take the cut for the end."""
        _, kind, _ = self._failure(exc)
        request = exchange.request
        exchange.note = f"upstream failed mid-response: {exc or kind}"
        log.warning("%s: upstream %s failed mid-response: %s", self.cfg.name, request.raw_path[:200], exc or kind)
        if request.transport is not None:
            request.transport.abort()
        return StreamResponse(status=exchange.status)

    def _finish(self, exchange: Exchange) -> None:
        status = exchange.status or 499
        duration = time.perf_counter() - exchange.started
        self.metrics.request_finished(status, exchange.peer.provenance, duration, exchange.bytes_in,
                                      exchange.bytes_out)
        if self._access_log is not None:
            self._log(self._access_log, exchange, status, duration)

    @staticmethod
    def _log(access_log: AccessLog, exchange: Exchange, status: int, duration: float) -> None:
        identity, peer, request = exchange.identity, exchange.peer, exchange.request
        if identity is None:
            client, node, tags = "funnel" if peer.is_funnel else "-", "-", ""
        else:
            client, node, tags = identity.user or "-", identity.node_name, ",".join(identity.node_tags)
        access_log.request(request.method, request.raw_path, status, exchange.bytes_in, exchange.bytes_out, duration,
                           client, node, peer.provenance, peer.address, tags, exchange.note)
