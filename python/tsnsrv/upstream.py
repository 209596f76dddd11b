"""The upstream: one aiohttp `ClientSession` per service, tuned for relaying.

Keep-alive connections to the upstream (TCP, TLS or a unix socket) are aiohttp's pool;
bodies are neither decompressed nor given headers the client did not send; the request
target goes out exactly as it was checked. A connection the upstream refuses (it is
restarting) is tried again for up to `upstreamRetryWindow`: nothing was sent yet, so
any request may wait for it, whatever its method, with its body still unread.

Relayed requests go out through the session's public parts (`ClientRequest`, the
connector's `connect`, `ClientResponse.start`), not through `ClientSession.request`:
what that adds per request (redirects, cookies, proxies, auth, tracing, a timer, header
merging) is nothing a relay uses, and cost a tenth of the proxy's CPU instructions per
small request (bench/README.md, "The aiohttp core"). What it does that a relay needs is
kept: a keep-alive connection that turns out dead is tried once more on a new one for an
idempotent request whose body was not yet read. One piece is beyond aiohttp's documented
API, the connection protocol's `set_response_params` (aiohttp is pinned in
python/pyproject.toml; every test through the proxy fails if a new version moves it).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import TimerNoop
from multidict import CIMultiDict
from yarl import URL

from .config import ServiceConfig
from .metrics import Metrics

log = logging.getLogger(__name__)

IDLE_KEEPALIVE_SECONDS = 30.0
MAX_RESPONSE_HEAD = 10 << 20  # Go's http.Transport default for response headers
READ_BUFFER = 1 << 18  # response body aiohttp holds before it stops reading the upstream
# An upstream that is restarting refuses connections (or its unix socket is missing).
RESTARTING = frozenset({errno.ECONNREFUSED, errno.ENOENT})
RETRY_FIRST_DELAY, RETRY_MAX_DELAY = 0.05, 1.0
# Requests that may go out again when their pooled connection was dead (RFC 9112 9.3.1).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NO_TIMER = TimerNoop()  # the proxy's own deadlines time the exchange
# Set where a refusal must be reported at once (the health probe), not waited out.
_waits_for_restarts = contextvars.ContextVar("waits_for_restarts", default=True)

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


# Headers aiohttp would add when the client sent none: the upstream gets exactly the
# client's headers and tsnsrv's.
_NOT_ADDED = CIMultiDict((name, None) for name in ("Accept", "Accept-Encoding", "Content-Type", "User-Agent"))


class _RelayedRequest(aiohttp.ClientRequest):
    """A request that adds none of aiohttp's default headers. (What `skip_auto_headers`
    does, without rebuilding the same skip list for every request.)"""

    def update_auto_headers(self, skip_auto_headers: Any) -> None:
        self._skip_auto_headers = _NOT_ADDED


class RelayedResponse(aiohttp.ClientResponse):
    """A response that can tell whether its connection ended in a reset.

    A body without a length (close-delimited) ends when the upstream closes its
    connection: aiohttp ends it the same way for a reset, which may have cut it short;
    passed on as complete, the client would take half a body for all of it."""

    _upstream_protocol: Any = None

    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        self._upstream_protocol = connection.protocol
        return await super().start(connection)

    @property
    def cut_by_reset(self) -> bool:
        """Whether its connection ended in an error (a reset), not a clean close."""
        return isinstance(self._upstream_protocol.exception(), OSError)


class FixedAddressResolver(AbstractResolver):
    """Every upstream host name resolves to one configured address (--upstream-tcp-addr)."""

    def __init__(self, host: str, port: int):
        self._host, self._port = host, port
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
        results = await self._resolver.resolve(self._host, self._port, family)
        return [{**result, "hostname": host} for result in results]

    async def close(self) -> None:
        await self._resolver.close()


def _refused(exc: aiohttp.ClientConnectorError) -> bool:
    return exc.os_error.errno in RESTARTING


def _connector_class(base: type[aiohttp.BaseConnector], metrics: Metrics, retry_window: float) -> type:
    """`base` that times new connections and waits out an upstream's restart.

    Both where aiohttp opens a connection (`_create_connection`), rather than in a
    TraceConfig, which would dispatch signals on every request and body chunk."""

    said_at = [float("-inf")]

    class Connector(base):  # type: ignore[valid-type, misc]
        async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + retry_window
            delay = RETRY_FIRST_DELAY
            while True:
                started = time.perf_counter()
                try:
                    protocol = await super()._create_connection(*args, **kwargs)
                except aiohttp.ClientConnectorError as exc:
                    remaining = give_up - loop.time()
                    if not _refused(exc) or remaining <= 0 or not _waits_for_restarts.get():
                        raise
                    if loop.time() - said_at[0] > retry_window:  # once per restart, not per request
                        said_at[0] = loop.time()
                        log.warning("the upstream refused a connection (%s); requests wait up to %gs for it",
                                    exc.os_error.strerror, retry_window)
                    await asyncio.sleep(min(delay, remaining))
                    delay = min(delay * 2, RETRY_MAX_DELAY)
                    continue
                metrics.upstream_connect.observe(time.perf_counter() - started)
                return protocol

    return Connector


async def _close_body(request: aiohttp.ClientRequest) -> None:
    if payload := request.body:
        await payload.close()


class Upstream:
    def __init__(self, cfg: ServiceConfig, metrics: Metrics):
        self.cfg = cfg
        self._metrics = metrics
        url = urlsplit(cfg.to_url)
        self.netloc = url.netloc.rpartition("@")[2]  # credentials never go to the upstream
        self.base_path = url.path
        self.base_query = url.query
        self._origin = f"{url.scheme}://{self.netloc}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._make_session()
        return self._session

    def _make_session(self) -> aiohttp.ClientSession:
        cfg = self.cfg
        options: dict[str, Any] = {"limit": 0, "keepalive_timeout": IDLE_KEEPALIVE_SECONDS}
        if cfg.upstream_unix_addr is not None:
            base: type[aiohttp.BaseConnector] = aiohttp.UnixConnector
            options["path"] = str(cfg.upstream_unix_addr)
        else:
            base = aiohttp.TCPConnector
            if cfg.upstream_tcp_addr is not None:
                host, _, port = cfg.upstream_tcp_addr.rpartition(":")
                options["resolver"] = FixedAddressResolver(host.strip("[]"), int(port))
            if self._origin.startswith("https:"):
                options["ssl"] = upstream_ssl_context(cfg)
        connector = _connector_class(base, self._metrics, cfg.upstream_retry_window)(**options)
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to the clients, not to the proxy
            request_class=_RelayedRequest,
            response_class=RelayedResponse,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.upstream_connect_timeout or None),
            read_bufsize=READ_BUFFER,
            max_line_size=MAX_RESPONSE_HEAD,
            max_field_size=MAX_RESPONSE_HEAD,
            max_headers=MAX_RESPONSE_HEAD // 4,
        )

    def url(self, target: str) -> URL:
        """The upstream URL of an origin-form target, which goes out byte for byte."""
        return URL(self._origin + target, encoded=True)

    async def request(self, method: str, url: URL, headers: list[tuple[str, str]],
                      body: Any) -> aiohttp.ClientResponse:
        """Send a request; the response, once its head is in."""
        session, loop = self.session, asyncio.get_running_loop()
        may_retry = method in IDEMPOTENT_METHODS
        while True:
            request = _RelayedRequest(method, url, headers=headers, data=body, loop=loop,
                                      response_class=RelayedResponse, session=session, timer=_NO_TIMER)
            try:
                response = await self._send(request)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if may_retry and not isinstance(exc, aiohttp.ClientConnectorError):
                    await request.close()  # its body's writer has settled
                    payload = request.body
                    if not (payload and payload.consumed):
                        # A pooled connection was dead: once more on a new one, with the body still unread.
                        may_retry, body = False, payload or None
                        continue
                await _close_body(request)
                raise
            except BaseException as exc:
                await _close_body(request)
                if isinstance(exc, OSError) and not isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError)):
                    raise aiohttp.ClientOSError(*exc.args) from exc
                raise
            await _close_body(request)
            return response

    async def _send(self, request: aiohttp.ClientRequest) -> aiohttp.ClientResponse:
        """What `ClientSession.request` does for one attempt, less what a relay does not use."""
        connector, timeout = self.session.connector, self.session.timeout
        assert connector is not None
        try:
            connection = await connector.connect(request, [], timeout)
        except asyncio.TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {request.url}") from exc
        connection.protocol.set_response_params(  # type: ignore[union-attr]
            timer=_NO_TIMER, skip_payload=request.method == "HEAD", read_until_eof=True, auto_decompress=False,
            read_bufsize=READ_BUFFER, max_line_size=MAX_RESPONSE_HEAD, max_field_size=MAX_RESPONSE_HEAD,
            max_headers=MAX_RESPONSE_HEAD // 4)
        try:
            response = await request.send(connection)
            try:
                await response.start(connection)
            except BaseException:
                response.close()
                raise
        except BaseException:
            connection.close()
            raise
        return response

    async def probe(self) -> dict[str, Any]:
        """Does the upstream answer a HEAD of its base path (on a connection of its own)?"""
        started = time.perf_counter()
        _waits_for_restarts.set(False)  # this task's own context: requests still wait
        try:
            async with asyncio.timeout(3):
                async with self.session.head(self.url(self.base_path or "/"), allow_redirects=False,
                                             headers={"Host": self.netloc, "Connection": "close"}) as response:
                    status = response.status
            return {"answers": True, "status": status, "latencyMs": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:  # noqa: BLE001 - the probe reports any failure
            reason = getattr(getattr(exc, "os_error", None), "strerror", None) or getattr(exc, "strerror", None)
            return {"answers": False, "error": reason or str(exc) or type(exc).__name__}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
