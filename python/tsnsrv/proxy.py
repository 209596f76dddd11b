"""The request path: checks, identity, header rewriting, and relaying to the upstream.

`Proxy.handle` is called as each request head completes (http1.ServerConnection). What
can be decided at once is decided at once (prefixes, rules, a cached identity, an idle
upstream connection); only a whois lookup or a new upstream connection is waited for.
Bodies then flow in the chunks they arrive in, both ways, between the client's and the
upstream's transports, with each side's flow control holding the other back: nothing is
buffered whole or spilled to disk. 1xx responses (103 Early Hints) and trailers pass
through, and a websocket session is relayed as raw bytes after its 101. Errors become
short plain-text pages that name the service.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from .access import AccessPolicy, Identity, PathPolicy, clean_path, has_control_characters
from .config import ServiceConfig
from .http1 import Exchange, HeaderList, connection_tokens, head_bytes, header_value
from .identity import IdentityUnavailable, WhoisCache, is_spoofable, serve_headers, tsnsrv_headers
from .metrics import Metrics
from .upstream import UpstreamConnection, UpstreamPool, UpstreamProtocolError, connector
from .websocket import GOING_AWAY, FrameBoundaries, close_frame

log = logging.getLogger(__name__)
access_log = logging.getLogger("tsnsrv.access")

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
# Set by the proxy on the way in, or framing it decides itself.
REPLACED_INBOUND = frozenset({b"host", b"expect", b"content-length"})

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
    return path.isascii() and all(0x20 < ord(char) < 0x7F for char in path)


class UpstreamTimeout(Exception):
    pass


class Proxy:
    def __init__(self, cfg: ServiceConfig, whois: WhoisCache | None, metrics: Metrics):
        self.cfg = cfg
        self.whois = whois
        self.metrics = metrics
        self.paths = PathPolicy.from_config(cfg.prefixes, cfg.deny_prefixes, cfg.strip_prefix)
        self.access = AccessPolicy.from_rules(cfg.access_rules)
        target = urlsplit(cfg.to_url)
        self.scheme = target.scheme
        self.netloc = target.netloc.rpartition("@")[2]  # credentials never go to the upstream
        self._base_path = target.path
        self._base_query = target.query
        self._send_identity = not cfg.suppress_whois
        self._extra_headers = [(name.encode(), value.encode()) for name, value in cfg.upstream_headers.items()]
        self._extra_lower = {name.lower() for name, _ in self._extra_headers}
        self._pool: UpstreamPool | None = None
        self.websockets: set[Relay] = set()
        self.in_flight: set[Relay] = set()

    # --- lifecycle -------------------------------------------------------------

    @property
    def pool(self) -> UpstreamPool:
        if self._pool is None:
            cfg = self.cfg
            url = urlsplit(cfg.to_url)
            host, port = url.hostname or "", url.port or (443 if self.scheme == "https" else 80)
            if cfg.upstream_tcp_addr is not None:
                fixed_host, _, fixed_port = cfg.upstream_tcp_addr.rpartition(":")
                host, port = fixed_host.strip("[]"), int(fixed_port)
            connect = connector(unix_path=str(cfg.upstream_unix_addr) if cfg.upstream_unix_addr else None,
                                host=host, port=port,
                                ssl_context=upstream_ssl_context(cfg) if self.scheme == "https" else None,
                                server_hostname=url.hostname)
            self._pool = UpstreamPool(connect, cfg.upstream_connect_timeout, self.metrics)
        return self._pool

    async def close_websockets(self) -> None:
        """Say goodbye (1001 Going Away) to both ends of every relayed websocket, between frames."""
        for relay in list(self.websockets):
            relay.going_away()

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    async def probe(self) -> dict[str, Any]:
        """Does the upstream answer a HEAD of its base path (on a connection of its own)?"""
        started = time.perf_counter()
        connection: UpstreamConnection | None = None
        try:
            async with asyncio.timeout(3):
                connection = await self.pool.connect()
                head: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                connection.begin(_HeadWaiter(head), head_only=True)
                connection.write(head_bytes(f"HEAD {self._base_path or '/'} HTTP/1.1".encode(),
                                            [(b"Host", self.netloc.encode()), (b"Connection", b"close")]))
                status = await head
            return {"answers": True, "status": status, "latencyMs": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:  # noqa: BLE001 - the probe reports any failure
            return {"answers": False, "error": getattr(exc, "strerror", None) or str(exc) or type(exc).__name__}
        finally:
            if connection is not None:
                connection.abort()

    # --- the request path --------------------------------------------------------

    def handle(self, exchange: Exchange) -> None:
        relay = Relay(self, exchange)
        self.metrics.requests_in_flight.inc()
        self.in_flight.add(relay)
        relay.start()

    def who(self, relay: Relay) -> str:
        if relay.peer.is_funnel:
            return "A public (Funnel) client"
        return relay.identity.describe() if relay.identity else f"Client {relay.peer.address}"

    def upstream_head(self, relay: Relay, path: str, query: str) -> bytes:
        request, peer, cfg = relay.exchange.request, relay.peer, self.cfg
        inbound = request.headers
        dropped = connection_tokens(inbound)
        headers: HeaderList = []
        upgrade = relay.websocket
        for name, value in inbound:
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in dropped or lower in REPLACED_INBOUND or is_spoofable(name.decode()):
                continue
            headers.append((name, value))
        inbound_host = relay.exchange.request.header(b"host") or b""
        host = relay.authority.encode() if relay.authority else inbound_host
        scheme = b"https" if peer.tls else b"http"
        address = peer.address.encode()
        headers.append((b"Host", host if cfg.recommended_proxy_headers else self.netloc.encode()))
        headers += [(b"X-Forwarded-For", address), (b"X-Forwarded-Host", host), (b"X-Forwarded-Proto", scheme)]
        if cfg.recommended_proxy_headers:
            server, sep, port = host.rpartition(b":")
            if not sep or not port.isdigit() or host.endswith(b"]"):
                server, port = host, b""
            headers += [(b"X-Scheme", scheme), (b"X-Real-Ip", address), (b"X-Forwarded-Server", server)]
            if port:
                headers.append((b"X-Forwarded-Port", port))
        if self._send_identity:
            identity = relay.identity
            if identity is not None and "tsnsrv" in cfg.identity_headers:
                headers += [(n.encode(), v.encode("utf-8")) for n, v in tsnsrv_headers(identity)]
            if "serve" in cfg.identity_headers:
                headers += [(n.encode(), v.encode("utf-8"))
                            for n, v in serve_headers(identity, peer.is_funnel, cfg.app_capabilities)]
        if self._extra_headers:  # configured headers win over the client's and ours
            headers = [(n, v) for n, v in headers if n.lower() not in self._extra_lower] + self._extra_headers
        if b"trailers" in (token.strip().lower() for token in (request.header(b"te") or b"").split(b",")):
            headers.append((b"TE", b"trailers"))  # the one TE value that is end to end, as Go keeps it
        if upgrade:
            headers += [(b"Connection", b"Upgrade"), (b"Upgrade", request.header(b"upgrade") or b"websocket")]
        body_length = request.header(b"content-length")
        chunked = request.header(b"transfer-encoding") is not None
        if chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif body_length is not None:
            headers.append((b"Content-Length", body_length))
        relay.chunked_upload = chunked
        target = path + (f"?{query}" if query else "")
        return head_bytes(f"{request.method} {target} HTTP/1.1".encode("latin-1"), headers)


class Relay:
    """One request through the proxy: its checks, its upstream exchange, its bookkeeping
    for the access log and metrics. It is the upstream connection's ResponseHandler."""

    def __init__(self, proxy: Proxy, exchange: Exchange):
        self.proxy = proxy
        self.cfg = proxy.cfg
        self.exchange = exchange
        self.peer = exchange.peer
        self.started = time.perf_counter()
        self.identity: Identity | None = None
        self.authority: str | None = None
        self.note = ""
        self.websocket = False
        self.chunked_upload = False
        self.upstream: UpstreamConnection | None = None
        self._sent_at = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._pending_head: tuple[int, bytes, HeaderList, int] | None = None
        self._done = False
        self._frames_in: FrameBoundaries | None = None
        self._frames_out: FrameBoundaries | None = None
        self._going_away = False
        self._said_goodbye = False
        exchange.on_client_gone = self._client_gone
        exchange.on_client_writable = self._client_writable

    # --- deciding ----------------------------------------------------------------

    def start(self) -> None:
        request = self.exchange.request
        if request.method == "CONNECT":
            return self.refuse(405, "method", "CONNECT is not proxied", "405 Method Not Allowed")
        if request.method == "OPTIONS" and request.target == "*":
            return self.answer(200, b"")  # about the server itself, as Go's net/http answers it
        target = origin_form(request.target)
        if target is None:
            return self.refuse(400, "target", f"request target {request.target[:100]!r} is not a path",
                               "400 Bad Request: the request target must be a path.")
        path_and_query, self.authority = target
        raw_path, _, raw_query = path_and_query.partition("?")
        decoded = unquote(raw_path)
        if has_control_characters(decoded):
            return self.refuse(400, "target", f"request path {raw_path[:100]!r} has control characters",
                               "400 Bad Request: the request path has control characters.")
        clean = clean_path(decoded)
        if clean != decoded:
            # 308, not 301: a POST must stay a POST.
            self.note = "redirected to clean path"
            location = quote(clean) + ("?" + raw_query if raw_query else "")
            return self.answer(308, b"", [(b"Location", location.encode("latin-1"))])
        decision = self.proxy.paths.decide(raw_path, self.peer.provenance)
        if not decision.allowed:
            return self.refuse(404, "prefix", decision.reason, "404 Not Found")
        self._raw_path, self._raw_query = raw_path, raw_query
        self._upstream_path = join_url_path(self.proxy._base_path, decision.upstream_raw_path)
        if not _valid_target(self._upstream_path):  # exactly the path that was checked, or nothing
            return self.refuse(400, "target", f"request path {self._upstream_path[:100]!r} is not a valid path",
                               "400 Bad Request: the request target is not a valid path.")
        self.websocket = request.upgrade and (request.header(b"upgrade") or b"").lower() == b"websocket"
        whois = self.proxy.whois
        if whois is not None and not self.peer.is_funnel:
            hit, identity = whois.cached(self.peer.address)
            if not hit:
                asyncio.ensure_future(self._look_up_then_continue(whois))
                return
            self.identity = identity
        self._judge_and_send(identity_unavailable=False)

    async def _look_up_then_continue(self, whois: WhoisCache) -> None:
        unavailable = False
        try:
            self.identity = await whois.lookup(self.peer.address)
        except IdentityUnavailable:
            unavailable = True
        if not self.exchange.client_gone:
            self._judge_and_send(unavailable)

    def _judge_and_send(self, identity_unavailable: bool) -> None:
        access = self.proxy.access.decide(self._raw_path, self.peer.provenance, self.identity, identity_unavailable)
        if access.unavailable:
            return self.refuse(503, "identity_unavailable", access.reason,
                               f"503 Service Unavailable: {self.cfg.name} could not check who you are; try again.")
        if not access.allowed:
            return self.refuse(403, "access_rule", access.reason,
                               f"403 Forbidden: {self.proxy.who(self)} may not use {self.cfg.name} here.")
        query = "&".join(part for part in (self.proxy._base_query, self._raw_query) if part)
        self._head = self.proxy.upstream_head(self, self._upstream_path, query)
        connection = self.proxy.pool.take_idle()
        if connection is not None:
            self._send(connection)
        else:
            asyncio.ensure_future(self._connect_then_send())

    async def _connect_then_send(self) -> None:
        try:
            connection = await self.proxy.pool.connect()
        except Exception as exc:  # noqa: BLE001 - every failure maps to a 502/504 page
            return self._upstream_failed(exc)
        if self.exchange.client_gone:
            self.proxy.pool.release(connection)
            return self._finish()
        self._send(connection)

    # --- relaying ----------------------------------------------------------------

    def _send(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        request = self.exchange.request
        connection.begin(self, head_only=request.method == "HEAD")
        connection.write(self._head)
        self._sent_at = time.perf_counter()
        if (request.header(b"expect") or b"").lower() == b"100-continue":
            self.exchange.informational(100, b"Continue", [])
        self.exchange.read_body(self._upload_chunk, self._upload_end)
        self._touch()

    def _upload_chunk(self, chunk: bytes) -> None:
        upstream = self.upstream
        if upstream is None:
            return
        self.proxy.metrics.bytes_from_clients.inc(len(chunk))
        if self.chunked_upload:
            upstream.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
        else:
            upstream.write(chunk)
        if upstream.writing_paused:
            self.exchange.connection.pause_reading()
        self._touch()

    def _upload_end(self, trailers: HeaderList) -> None:
        if self.upstream is not None and self.chunked_upload:
            self.upstream.write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")
        timeout = self.cfg.upstream_response_header_timeout
        if timeout and self._pending_head is None and not self.exchange.response_started and not self._done:
            self._head_timer = asyncio.get_running_loop().call_later(timeout, self._head_timed_out, timeout)

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.exchange.connection.resume_reading()

    def _client_writable(self, writable: bool) -> None:
        if self.upstream is not None:
            if writable:
                self.upstream.resume_reading()
            else:
                self.upstream.pause_reading()

    def on_informational(self, status: int, reason: bytes, headers: HeaderList) -> None:
        if status != 100:  # ours went out already, if the client asked for one
            self.exchange.informational(status, reason, self._response_headers(headers))

    def on_head(self, status: int, reason: bytes, headers: HeaderList) -> None:
        self._cancel_head_timer()
        self.proxy.metrics.upstream_response.observe(time.perf_counter() - self._sent_at)
        out = self._response_headers(headers)
        if status == 101:
            if not self.websocket:  # only a websocket upgrade is asked for, and relayed
                return self._upstream_failed(UpstreamProtocolError("101 Switching Protocols unasked"))
            return self._start_websocket(reason, headers)
        no_body = self.exchange.request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        length_header = header_value(headers, b"content-length")
        if self.exchange.request.method == "HEAD":
            if length_header is not None:
                out.append((b"Content-Length", length_header))
            self.exchange.start_response(status, out, reason=reason, no_body=True)
            return
        length = int(length_header) if length_header is not None and length_header.isdigit() else None
        if length and not no_body:
            self._pending_head = (status, reason, out, length)  # out with the first body bytes, in one write
            return
        self.exchange.start_response(status, out, reason=reason, length=0 if length == 0 else None, no_body=no_body)

    def on_body(self, chunk: bytes) -> None:
        pending = self._pending_head
        if pending is not None:
            self._pending_head = None
            status, reason, out, length = pending
            self.exchange.start_response(status, out, reason=reason, length=length, first=chunk)
        else:
            self.exchange.write(chunk)
        self.proxy.metrics.bytes_to_clients.inc(len(chunk))
        if self.exchange.connection.writing_paused and self.upstream is not None:
            self.upstream.pause_reading()
        self._touch()

    def on_end(self, trailers: HeaderList) -> None:
        if self.websocket and self.exchange.status == 101:
            self._finish_websocket()
            return
        if self._pending_head is not None:  # a length was announced but no body came
            status, reason, out, length = self._pending_head
            self._pending_head = None
            self.exchange.start_response(status, out, reason=reason, length=length)
        if not self.exchange.response_started:
            return self._upstream_failed(UpstreamProtocolError("no response"))
        self.exchange.finish(trailers or None)
        if self.upstream is not None:
            self.proxy.pool.release(self.upstream)
            self.upstream = None
        self._finish()

    def on_error(self, exc: BaseException) -> None:
        self.upstream = None
        if self.websocket and self.exchange.status == 101:
            self._finish_websocket()
            return
        self._upstream_failed(exc)

    def _response_headers(self, headers: HeaderList) -> HeaderList:
        dropped = connection_tokens(headers)
        return [(name, value) for name, value in headers
                if (lower := name.lower()) not in HOP_BY_HOP and lower not in dropped and lower != b"content-length"]

    # --- websockets --------------------------------------------------------------

    def _start_websocket(self, reason: bytes, headers: HeaderList) -> None:
        out = [(name, value) for name, value in headers if name.lower() not in (b"content-length",)]
        self.exchange.start_response(101, out, reason=reason, no_body=True)
        self._frames_in, self._frames_out = FrameBoundaries(), FrameBoundaries()
        self.proxy.websockets.add(self)
        self.proxy.metrics.websockets.inc()
        self.proxy.metrics.websockets_open.inc()
        self.exchange.upgraded(self._from_client)

    def on_upgraded(self, early: bytes) -> None:
        if early and self._frames_out is not None:
            self.on_raw(early)

    def _from_client(self, data: bytes) -> None:
        frames = self._frames_in
        assert frames is not None
        frames.feed(data)
        if self._said_goodbye:
            if frames.closed:
                self._finish_websocket()  # the client answered our close: the session is over
            return
        self.exchange.bytes_in += len(data)
        self.proxy.metrics.bytes_from_clients.inc(len(data))
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            if upstream.writing_paused:
                self.exchange.connection.pause_reading()
        if self.cfg.upstream_idle_timeout:
            self._touch()
        if self._going_away:
            self._maybe_say_goodbye()

    def on_raw(self, data: bytes) -> None:
        frames = self._frames_out
        assert frames is not None
        frames.feed(data)
        if self._said_goodbye:
            return  # the client has our close already: the upstream's answer to its own is not for it
        connection = self.exchange.connection
        self.exchange.bytes_out += len(data)
        self.proxy.metrics.bytes_to_clients.inc(len(data))
        connection.write(data)
        if connection.writing_paused and self.upstream is not None:
            self.upstream.pause_reading()
        if self.cfg.upstream_idle_timeout:
            self._touch()
        if self._going_away:
            self._maybe_say_goodbye()

    def going_away(self) -> None:
        self._going_away = True
        self._maybe_say_goodbye()

    def _maybe_say_goodbye(self) -> None:
        frames_in, frames_out = self._frames_in, self._frames_out
        if not self._going_away or frames_in is None or frames_out is None:
            return
        if not (frames_in.at_boundary and frames_out.at_boundary):
            return  # between frames only; the next byte that ends one brings us back here
        self._going_away, self._said_goodbye = False, True
        if not frames_out.closed:
            self.exchange.connection.write(close_frame(GOING_AWAY, b"server shutting down", masked=False))
        if not frames_in.closed and self.upstream is not None:
            self.upstream.write(close_frame(GOING_AWAY, b"proxy shutting down", masked=True))

    def _finish_websocket(self) -> None:
        if self in self.proxy.websockets:
            self.proxy.websockets.discard(self)
            self.proxy.metrics.websockets_open.dec()
        self.exchange.response_done = True
        self.exchange.connection.close()
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._finish()

    # --- ends ----------------------------------------------------------------------

    def _client_gone(self) -> None:
        if self.upstream is not None:
            self.upstream.abort()  # nobody waits for the rest: free the upstream too
            self.upstream = None
        if self.exchange.status != 101:
            self.exchange.status = 499
        if self.websocket and self in self.proxy.websockets:
            self._finish_websocket()
            return
        self._finish()

    def answer(self, status: int, body: bytes, headers: HeaderList | None = None) -> None:
        self.exchange.respond(status, body, headers)
        self.proxy.metrics.bytes_to_clients.inc(len(body))
        self._finish()

    def refuse(self, status: int, reason: str, why: str, page: str) -> None:
        self.note = why
        self.proxy.metrics.denied.labels(reason).inc()
        log.info("denied %s %s from %s: %s", self.exchange.request.method, self.exchange.request.target[:200],
                 self.proxy.who(self), why)
        self.answer(status, (page + "\n").encode())

    def _upstream_failed(self, exc: BaseException) -> None:
        self._cancel_head_timer()
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if isinstance(exc, (UpstreamTimeout, TimeoutError)):
            status, kind, what = 504, "timeout", f"timed out ({exc or 'connect timeout'})"
        elif isinstance(exc, UpstreamProtocolError):
            status, kind, what = 502, "protocol", f"sent no valid response ({exc})"
        elif isinstance(exc, (ConnectionRefusedError, FileNotFoundError, OSError)) and not self._sent_at:
            status, kind, what = 502, "connect", f"could not be reached ({getattr(exc, 'strerror', None) or exc})"
        elif isinstance(exc, (ConnectionError, OSError)):
            status, kind, what = 502, "reset", f"dropped the connection ({exc})"
        else:
            status, kind, what = 502, "protocol", f"sent no valid response ({type(exc).__name__}: {exc})"
        self.proxy.metrics.upstream_failed(kind)
        self.note = f"upstream {kind}: {exc}"
        request = self.exchange.request
        if self.exchange.response_started:
            # Headers are gone already: all we can do is cut the client off mid-body.
            log.warning("%s: upstream %s failed mid-response: %s", self.cfg.name, request.target[:200], exc or kind)
            self.note = f"upstream failed mid-response: {exc or kind}"
            self.exchange.abort()
            self._finish()
            return
        if self.exchange.client_gone:
            self._finish()
            return
        log.warning("%s: upstream %s for %s %s: %s", self.cfg.name, kind, request.method, request.target[:200], exc)
        reason = "Gateway Timeout" if status == 504 else "Bad Gateway"
        self.answer(status, f"{status} {reason}: the upstream of {self.cfg.name} {what}.\n".encode())

    def _head_timed_out(self, timeout: float) -> None:
        self._head_timer = None
        self._upstream_failed(UpstreamTimeout(f"no response within {timeout:g}s"))

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _touch(self) -> None:
        """Bytes moved: the idle timeout starts again."""
        idle = self.cfg.upstream_idle_timeout
        if not idle or self._done:
            return
        loop = asyncio.get_running_loop()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = loop.call_later(idle, self._idle_timed_out, idle)

    def _idle_timed_out(self, idle: float) -> None:
        self._idle_timer = None
        if self.websocket and self.exchange.status == 101:
            self.note = f"websocket idle for {idle:g}s"
            self._finish_websocket()
        else:
            self._upstream_failed(UpstreamTimeout(f"no bytes either way for {idle:g}s"))

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_head_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        proxy = self.proxy
        proxy.in_flight.discard(self)
        proxy.metrics.requests_in_flight.dec()
        status = self.exchange.status or 499
        duration = time.perf_counter() - self.started
        proxy.metrics.observe_response(status, self.peer.provenance, duration)
        if self.cfg.access_log:
            self._log(status, duration)

    def _log(self, status: int, duration: float) -> None:
        identity, peer, exchange = self.identity, self.peer, self.exchange
        client = "funnel" if peer.is_funnel else (identity.user if identity and identity.user else "-")
        fields: list[tuple[str, Any]] = [
            ("method", exchange.request.method), ("path", exchange.request.target), ("status", status),
            ("bytes_in", exchange.bytes_in), ("bytes_out", exchange.bytes_out),
            ("duration_ms", f"{duration * 1000:.1f}"), ("client", client),
            ("node", identity.node_name if identity else "-"), ("source", peer.provenance), ("remote", peer.address),
        ]
        if identity is not None and identity.node_tags:
            fields.append(("tags", ",".join(identity.node_tags)))
        if self.note:
            fields.append(("note", self.note))
        access_log.info("request", extra={"fields": fields})


class _HeadWaiter:
    """A ResponseHandler that only wants the status of the response head."""

    def __init__(self, head: asyncio.Future[int]):
        self._head = head

    def on_head(self, status: int, reason: bytes, headers: HeaderList) -> None:
        if not self._head.done():
            self._head.set_result(status)

    def on_error(self, exc: BaseException) -> None:
        if not self._head.done():
            self._head.set_exception(exc)

    def on_informational(self, status: int, reason: bytes, headers: HeaderList) -> None: ...
    def on_body(self, chunk: bytes) -> None: ...
    def on_end(self, trailers: HeaderList) -> None: ...
    def on_upgraded(self, early: bytes) -> None: ...
    def on_raw(self, data: bytes) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...
