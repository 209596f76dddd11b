"""The request path: checks, identity, header rewriting, and streaming to the upstream.

One `Proxy.handle` call per request. Bodies stream both ways in the chunks they
arrive in (never buffered whole, never spilled to disk); websocket upgrades are
relayed message by message. Errors become short plain-text pages that name the
service.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from .access import AccessPolicy, Identity, PathPolicy, clean_path, has_control_characters
from .config import ServiceConfig
from .front import Peer
from .identity import IdentityUnavailable, WhoisCache, is_spoofable, serve_headers, tsnsrv_headers
from .metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("tsnsrv.access")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
WEBSOCKET_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                                 "sec-websocket-protocol", "sec-websocket-accept"})
# Whole websocket messages are held in memory by the relay; this bounds one message.
WEBSOCKET_MAX_MESSAGE = 64 * 1024 * 1024
READ_CHUNK = 256 * 1024


class CoalescingResponse(web.StreamResponse):
    """A response whose head goes out with its first body bytes (one write, one packet)
    instead of on its own. Only for bodies of known length, which follow at once: a
    streamed (chunked, SSE) response still sends its head immediately."""

    _send_headers_immediately = False


class UpstreamTimeout(Exception):
    pass


class FixedAddressResolver(AbstractResolver):
    """Resolve every upstream host to one configured address (--upstream-tcp-addr)."""

    def __init__(self, host: str, port: int):
        self._host, self._port = host, port
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
        results = await self._resolver.resolve(self._host, self._port, family)
        return [{**result, "hostname": host} for result in results]

    async def close(self) -> None:
        await self._resolver.close()


# TLS 1.2 suites with forward secrecy only, as Go's crypto/tls offers by default
# (Python's default list also offers plain-RSA key exchange). TLS 1.3 suites all have it.
FORWARD_SECRET_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:DHE+AES:!aNULL:!MD5:!DSS"


def upstream_ssl_context(cfg: ServiceConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cfg.upstream_ca_file) if cfg.upstream_ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.insecure_https:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0" if cfg.upstream_allow_insecure_ciphers else FORWARD_SECRET_CIPHERS)
    return context


def origin_form(target: str) -> tuple[str, str | None] | None:
    """The request target as path and query, with the authority of an absolute-form
    target; None if it is not one.

    HTTP/1.1 servers must accept the absolute form (`GET http://host/path`); its path is
    what prefixes and rules must see, or `http://books/admin` would slip past them, and its
    authority replaces the Host header (RFC 9112 3.2.2)."""
    if "#" in target:
        return None  # no fragment in a request target (RFC 9112 3.2); the URL builder would drop it unchecked
    if target.startswith("/"):
        return target, None
    split = urlsplit(target)
    if split.scheme.lower() in ("http", "https") and split.netloc:
        return (split.path or "/") + (f"?{split.query}" if split.query else ""), split.netloc.rpartition("@")[2]
    return None


def _timed(base: type, metrics: Metrics) -> type:
    """`base` connector that observes new upstream connections' set-up time.

    Instead of a TraceConfig: with any trace config, aiohttp builds Trace objects and
    dispatches request start/headers/chunk/end signals on every request and body chunk."""

    class TimedConnector(base):  # type: ignore[valid-type, misc]
        async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            protocol = await super()._create_connection(*args, **kwargs)
            metrics.upstream_connect.observe(time.perf_counter() - started)
            return protocol

    return TimedConnector


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


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


class Proxy:
    def __init__(self, cfg: ServiceConfig, whois: WhoisCache | None, metrics: Metrics):
        self.cfg = cfg
        self.whois = whois
        self.metrics = metrics
        self.paths = PathPolicy.from_config(cfg.prefixes, cfg.deny_prefixes, cfg.strip_prefix)
        self.access = AccessPolicy.from_rules(cfg.access_rules)
        target = urlsplit(cfg.to_url)
        self._scheme = target.scheme
        self._netloc = target.netloc.rpartition("@")[2]  # credentials never go to the upstream
        self._base_path = target.path
        self._base_query = target.query
        self._upstream_host = target.hostname or ""
        self._send_identity = not cfg.suppress_whois
        self._session: aiohttp.ClientSession | None = None
        self._websockets: set[tuple[web.WebSocketResponse, aiohttp.ClientWebSocketResponse]] = set()
        self.shutting_down = False

    # --- lifecycle -------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._make_session()
        return self._session

    def _make_session(self) -> aiohttp.ClientSession:
        cfg = self.cfg
        connector_options: dict[str, Any] = {"limit": 0, "keepalive_timeout": 30}
        if cfg.upstream_unix_addr is not None:
            connector: aiohttp.BaseConnector = _timed(aiohttp.UnixConnector, self.metrics)(
                path=str(cfg.upstream_unix_addr), **connector_options)
        else:
            if cfg.upstream_tcp_addr is not None:
                host, _, port = cfg.upstream_tcp_addr.rpartition(":")
                connector_options["resolver"] = FixedAddressResolver(host.strip("[]"), int(port))
            if self._scheme == "https":
                connector_options["ssl"] = upstream_ssl_context(cfg)
            connector = _timed(aiohttp.TCPConnector, self.metrics)(**connector_options)
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to the clients, not to the proxy
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.upstream_connect_timeout or None),
            read_bufsize=READ_CHUNK,
            max_line_size=65536,
            max_field_size=65536,
        )

    async def close_websockets(self) -> None:
        """Say goodbye (1001 Going Away) on both legs of every relayed websocket."""
        closes = []
        for client_ws, upstream_ws in list(self._websockets):
            closes.append(client_ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutting down"))
            closes.append(upstream_ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"proxy shutting down"))
        await asyncio.gather(*closes, return_exceptions=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # --- the request path --------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer: Peer = request.protocol.peer  # type: ignore[attr-defined]
        started = time.perf_counter()
        exchange = Exchange(request, peer)
        self.metrics.requests_in_flight.inc()
        try:
            response = await self._handle(exchange)
            exchange.status = response.status
            if type(response) is web.Response and response.body:  # a page of ours, sent whole
                exchange.bytes_out = len(response.body)  # type: ignore[arg-type]
                self.metrics.bytes_to_clients.inc(exchange.bytes_out)
            return response
        except asyncio.CancelledError:
            exchange.status = 499  # the client went away
            raise
        finally:
            self.metrics.requests_in_flight.dec()
            duration = time.perf_counter() - started
            self.metrics.observe_response(exchange.status, peer.provenance, duration)
            if self.cfg.access_log:
                exchange.log(duration)

    async def _handle(self, exchange: Exchange) -> web.StreamResponse:
        request, peer = exchange.request, exchange.peer
        if request.method == "CONNECT":
            return self._deny(exchange, 405, "method", "CONNECT is not proxied")
        if request.method == "OPTIONS" and request.raw_path == "*":
            return web.Response(status=200)  # about the server itself, as Go's net/http answers it
        target = origin_form(request.raw_path)
        if target is None:
            return self._deny(exchange, 400, "target", f"request target {request.raw_path[:100]!r} is not a path",
                              "400 Bad Request: the request target must be a path.")
        path_and_query, exchange.authority = target
        raw_path, _, raw_query = path_and_query.partition("?")
        decoded = unquote(raw_path)
        if has_control_characters(decoded):
            return self._deny(exchange, 400, "target", f"request path {raw_path[:100]!r} has control characters",
                              "400 Bad Request: the request path has control characters.")
        clean = clean_path(decoded)
        if clean != decoded:
            # 308, not 301: a POST must stay a POST.
            location = quote(clean) + ("?" + raw_query if raw_query else "")
            exchange.note = "redirected to clean path"
            return web.Response(status=308, headers={"Location": location})
        path_decision = self.paths.decide(raw_path, peer.provenance)
        if not path_decision.allowed:
            return self._deny(exchange, 404, "prefix", path_decision.reason)

        identity, identity_unavailable = None, False
        if self.whois is not None and not peer.is_funnel:
            try:
                identity = await self.whois.lookup(peer.address)
            except IdentityUnavailable:
                identity_unavailable = True
        exchange.identity = identity
        access = self.access.decide(raw_path, peer.provenance, identity, identity_unavailable)
        if access.unavailable:
            return self._deny(exchange, 503, "identity_unavailable", access.reason,
                              f"503 Service Unavailable: {self.cfg.name} could not check who you are; try again.")
        if not access.allowed:
            return self._deny(exchange, 403, "access_rule", access.reason,
                              f"403 Forbidden: {self._who(exchange)} may not use {self.cfg.name} here.")

        headers = self._upstream_headers(exchange, identity)
        path = join_url_path(self._base_path, path_decision.upstream_raw_path)
        query = "&".join(part for part in (self._base_query, raw_query) if part)
        url = URL(f"{self._scheme}://{self._netloc}{path}" + (f"?{query}" if query else ""), encoded=True)
        if url.raw_path != path:  # the upstream must be asked for exactly the path that was checked
            return self._deny(exchange, 400, "target", f"request path {path[:100]!r} does not survive as a URL",
                              "400 Bad Request: the request target is not a valid path.")
        if _is_websocket_upgrade(request):
            return await self._relay_websocket(exchange, url, headers)
        return await self._proxy_http(exchange, url, headers)

    def _who(self, exchange: Exchange) -> str:
        if exchange.peer.is_funnel:
            return "A public (Funnel) client"
        return exchange.identity.describe() if exchange.identity else f"Client {exchange.peer.address}"

    def _deny(self, exchange: Exchange, status: int, reason: str, why: str, page: str | None = None) -> web.Response:
        exchange.note = why
        self.metrics.denied.labels(reason).inc()
        log.info("denied %s %s from %s: %s", exchange.request.method, exchange.request.path, self._who(exchange), why)
        if page is None:
            page = f"{status} {'Not Found' if status == 404 else 'Method Not Allowed'}"
        return _text(status, page)

    def _upstream_headers(self, exchange: Exchange, identity: Identity | None) -> CIMultiDict[str]:
        request, peer, cfg = exchange.request, exchange.peer, self.cfg
        inbound = request.headers
        dropped = {token.strip().lower() for token in inbound.get("Connection", "").split(",")}
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in inbound.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in dropped or lower == "expect" or is_spoofable(name):
                continue
            headers.add(name, value)
        host = exchange.authority or inbound.get("Host", "")
        scheme = "https" if peer.tls else "http"
        headers["X-Forwarded-For"] = peer.address
        headers["X-Forwarded-Host"] = host
        headers["X-Forwarded-Proto"] = scheme
        if cfg.recommended_proxy_headers:
            headers["X-Scheme"] = scheme
            headers["X-Real-Ip"] = peer.address
            server, _, port = host.rpartition(":") if host.rpartition(":")[2].isdigit() else (host, "", "")
            headers["X-Forwarded-Server"] = server
            if port:
                headers["X-Forwarded-Port"] = port
            if exchange.authority:
                headers["Host"] = exchange.authority
        else:
            headers["Host"] = self._netloc
        if self._send_identity:
            if identity is not None and "tsnsrv" in cfg.identity_headers:
                headers.extend(tsnsrv_headers(identity))
            if "serve" in cfg.identity_headers:
                headers.extend(serve_headers(identity, peer.is_funnel, cfg.app_capabilities))
        for name, value in cfg.upstream_headers.items():
            headers[name] = value
        return headers

    async def _proxy_http(self, exchange: Exchange, url: URL, headers: CIMultiDict[str]) -> web.StreamResponse:
        request = exchange.request
        body = None
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = exchange.stream_request_body(self.metrics)
        sent = time.perf_counter()
        try:
            upstream = await self._send(request.method, url, headers, body, exchange)
        except Exception as exc:  # noqa: BLE001 - every failure maps to a 502/504 page below
            return self._upstream_failed(exchange, exc)
        self.metrics.upstream_response.observe(time.perf_counter() - sent)
        try:
            return await self._stream_response(exchange, upstream)
        finally:
            upstream.release()

    async def _send(self, method: str, url: URL, headers: CIMultiDict[str], body: AsyncIterator[bytes] | None,
                    exchange: Exchange) -> aiohttp.ClientResponse:
        """Send the request; the response-header timeout runs from when the body is fully sent."""
        timeout = self.cfg.upstream_response_header_timeout
        if body is None or not timeout:  # no extra task, no wait_for: one timer at most
            request = self.session.request(method, url, headers=headers, data=body, allow_redirects=False,
                                           compress=None)
            if not timeout:
                return await request
            try:
                async with asyncio.timeout(timeout) as deadline:
                    return await request
            except TimeoutError:
                if deadline.expired():
                    raise UpstreamTimeout(f"no response within {timeout:g}s") from None
                raise
        sending = asyncio.ensure_future(self.session.request(method, url, headers=headers, data=body,
                                                             allow_redirects=False, compress=None))
        if body is not None:
            body_sent = asyncio.ensure_future(exchange.body_sent.wait())
            try:
                await asyncio.wait({sending, body_sent}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                body_sent.cancel()
        try:
            return await asyncio.wait_for(sending, timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"no response within {timeout:g}s") from None

    async def _stream_response(self, exchange: Exchange, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        request = exchange.request
        known_length = upstream.content_length is not None or upstream.status in (204, 304)
        response_class = CoalescingResponse if known_length or request.method == "HEAD" else web.StreamResponse
        response = response_class(status=upstream.status, reason=upstream.reason)
        dropped = {token.strip().lower() for token in upstream.headers.get("Connection", "").split(",")}
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in dropped or lower == "content-length":
                continue
            response.headers.add(name, value)
        if upstream.content_length is not None and request.method != "HEAD":
            response.content_length = upstream.content_length
        elif request.method == "HEAD" and "Content-Length" in upstream.headers:
            response.headers["Content-Length"] = upstream.headers["Content-Length"]
        await response.prepare(request)
        if request.method == "HEAD" or upstream.status in (204, 304):
            await response.write_eof()
            return response
        idle_timeout = self.cfg.upstream_idle_timeout or None
        try:
            while True:
                if idle_timeout is None:
                    chunk = await upstream.content.readany()
                else:
                    chunk = await asyncio.wait_for(upstream.content.readany(), idle_timeout)
                if not chunk:
                    break
                exchange.bytes_out += len(chunk)
                await response.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            # Headers are gone already: all we can do is cut the client off mid-body.
            kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "reset"
            self.metrics.upstream_failed(kind)
            exchange.note = f"upstream failed mid-response: {exc or kind}"
            log.warning("%s: upstream %s failed mid-response: %s", self.cfg.name, request.path, exc or kind)
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            self.metrics.bytes_to_clients.inc(exchange.bytes_out)
        await response.write_eof()
        return response

    def _upstream_failed(self, exchange: Exchange, exc: BaseException) -> web.Response:
        if isinstance(exc, (UpstreamTimeout, asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            status, kind, what = 504, "timeout", f"timed out ({exc or 'connect timeout'})"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            status, kind, what = 502, "connect", f"could not be reached ({exc.os_error.strerror or exc})"
        elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)):
            status, kind, what = 502, "reset", f"dropped the connection ({exc})"
        else:
            status, kind, what = 502, "protocol", f"sent no valid response ({type(exc).__name__}: {exc})"
        self.metrics.upstream_failed(kind)
        exchange.note = f"upstream {kind}: {exc}"
        log.warning("%s: upstream %s for %s %s: %s", self.cfg.name, kind, exchange.request.method,
                    exchange.request.path, exc)
        reason = "Gateway Timeout" if status == 504 else "Bad Gateway"
        return _text(status, f"{status} {reason}: the upstream of {self.cfg.name} {what}.")

    async def _relay_websocket(self, exchange: Exchange, url: URL, headers: CIMultiDict[str]) -> web.StreamResponse:
        request = exchange.request
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        for name in list(headers):
            if name.lower() in WEBSOCKET_HANDSHAKE:
                del headers[name]
        ws_url = url.with_scheme("wss" if self._scheme == "https" else "ws")
        try:
            upstream_ws = await self.session.ws_connect(ws_url, headers=headers, protocols=offered, autoping=False,
                                                        autoclose=False, compress=0,
                                                        max_msg_size=WEBSOCKET_MAX_MESSAGE)
        except aiohttp.WSServerHandshakeError as exc:
            exchange.note = f"upstream refused the websocket handshake: {exc.status}"
            return _text(exc.status if exc.status >= 400 else 502,
                         f"{exc.status} websocket handshake refused by the upstream of {self.cfg.name}.")
        except Exception as exc:  # noqa: BLE001
            return self._upstream_failed(exchange, exc)
        client_ws = web.WebSocketResponse(protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
                                          autoping=False, autoclose=False, compress=False,
                                          max_msg_size=WEBSOCKET_MAX_MESSAGE)
        pair = (client_ws, upstream_ws)
        self._websockets.add(pair)
        self.metrics.websockets.inc()
        self.metrics.websockets_open.inc()
        try:
            await client_ws.prepare(request)
            await asyncio.gather(self._pump(client_ws, upstream_ws, exchange, inbound=True),
                                 self._pump(upstream_ws, client_ws, exchange, inbound=False))
        finally:
            self._websockets.discard(pair)
            self.metrics.websockets_open.dec()
            await upstream_ws.close()
            await client_ws.close()
        return client_ws

    async def _pump(self, source: Any, sink: Any, exchange: Exchange, inbound: bool) -> None:
        """Forward messages one way until either side closes; closing is mirrored with its code."""
        counter = self.metrics.bytes_from_clients if inbound else self.metrics.bytes_to_clients
        while True:
            message = await source.receive()
            kind = message.type
            if kind in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                size = len(message.data)
                counter.inc(size)
                if inbound:
                    exchange.bytes_in += size
                else:
                    exchange.bytes_out += size
            try:
                if kind == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif kind == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                elif kind == aiohttp.WSMsgType.PING:
                    await sink.ping(message.data)
                elif kind == aiohttp.WSMsgType.PONG:
                    await sink.pong(message.data)
                else:  # CLOSE, CLOSING, CLOSED, ERROR
                    code = source.close_code or aiohttp.WSCloseCode.OK
                    extra = message.extra if kind == aiohttp.WSMsgType.CLOSE and message.extra else b""
                    await sink.close(code=code, message=extra.encode() if isinstance(extra, str) else extra)
                    if kind == aiohttp.WSMsgType.CLOSE:
                        await source.close(code=code)
                    return
            except ConnectionError:
                await source.close(code=aiohttp.WSCloseCode.GOING_AWAY)
                return


def _is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


class Exchange:
    """Bookkeeping for one request, for the access log and metrics."""

    __slots__ = ("request", "peer", "identity", "authority", "status", "bytes_in", "bytes_out", "note", "body_sent")

    def __init__(self, request: web.BaseRequest, peer: Peer):
        self.request = request
        self.peer = peer
        self.identity: Identity | None = None
        self.authority: str | None = None  # of an absolute-form request target
        self.status = 500
        self.bytes_in = 0
        self.bytes_out = 0
        self.note = ""
        self.body_sent = asyncio.Event()

    async def stream_request_body(self, metrics: Metrics) -> AsyncIterator[bytes]:
        content = self.request.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                self.bytes_in += len(chunk)
                yield chunk
        finally:
            metrics.bytes_from_clients.inc(self.bytes_in)
            self.body_sent.set()

    def log(self, duration: float) -> None:
        request, identity, peer = self.request, self.identity, self.peer
        client = "funnel" if peer.is_funnel else (identity.user if identity and identity.user else "-")
        node = identity.node_name if identity else "-"
        fields = [
            ("method", request.method), ("path", request.raw_path), ("status", self.status),
            ("bytes_in", self.bytes_in), ("bytes_out", self.bytes_out), ("duration_ms", f"{duration * 1000:.1f}"),
            ("client", client), ("node", node), ("source", peer.provenance), ("remote", peer.address),
        ]
        if identity is not None and identity.node_tags:
            fields.append(("tags", ",".join(identity.node_tags)))
        if self.note:
            fields.append(("note", self.note))
        access_log.info("request", extra={"fields": fields})
