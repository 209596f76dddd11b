"""The front listener: where tailscaled's Serve forwards tailnet (and Funnel) connections.

Each connection must come from our tailscaled (see peercheck), starts with a PROXY v2
header naming the real client, then carries TLS or plain HTTP, which aiohttp's server
takes over (httpserver.FrontServer), knowing its client (`Peer`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

import attrs

from . import proxyproto
from .access import FUNNEL, TAILNET
from .httpserver import BaseRequest, FrontServer, StreamResponse
from .identity import is_tailnet_address
from .metrics import Metrics
from .peercheck import PEER_GONE, TailscaledPeerCheck

log = logging.getLogger(__name__)

PROXY_HEADER_TIMEOUT = 10.0
Handler = Callable[[BaseRequest], Awaitable[StreamResponse]]


@attrs.frozen
class Peer:
    """The client behind one front connection, from its PROXY header."""

    address: str
    port: int
    provenance: str  # TAILNET or FUNNEL
    tls: bool

    @property
    def is_funnel(self) -> bool:
        return self.provenance == FUNNEL


def reserve_closed_port(address: str) -> socket.socket:
    """A port on `address` that nothing listens on and nobody else can take: connecting
    there is refused. Keep the socket open for as long as the port is in use."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    return sock


class FrontListener:
    """Requests of admitted connections go to `handler` (an aiohttp request handler)."""

    def __init__(self, address: str, handler: Handler, peer_check: TailscaledPeerCheck, metrics: Metrics, *,
                 read_header_timeout: float, funnel_read_header_timeout: float, accept_tailnet: bool,
                 accept_funnel: bool):
        self.address = address
        self.peer_check = peer_check
        self.metrics = metrics
        self.tls_context: ssl.SSLContext | None = None
        self.accept_tailnet = accept_tailnet
        self.accept_funnel = accept_funnel
        self._handler = handler
        self._timeouts = {TAILNET: read_header_timeout, FUNNEL: funnel_read_header_timeout}
        self._servers: dict[str, FrontServer] = {}  # per kind of client, made in the running loop
        self._socket: socket.socket | None = None
        self.port = 0  # until bound
        self._accept_task: asyncio.Task | None = None
        self._admissions: set[asyncio.Task] = set()
        self._last_refusal_log = 0.0

    def bind(self) -> int:
        """Bind to an ephemeral port on the front address; returns the port."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((self.address, 0))
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]  # kept: still needed to watch connections drain after closing
        return self.port

    @property
    def accepting(self) -> bool:
        return self._accept_task is not None and not self._accept_task.done()

    def start(self) -> None:
        self._servers = {kind: FrontServer(self._handler, timeout) for kind, timeout in self._timeouts.items()}
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"front-accept-{self.address}")

    async def stop_accepting(self) -> None:
        """Close the listening socket: tailscaled's forwards now fail and clients see a reset."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()
        for task in list(self._admissions):
            task.cancel()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._socket)
            except OSError as exc:
                log.warning("front listener accept failed: %s", exc)
                await asyncio.sleep(0.1)  # e.g. EMFILE: give closing connections a moment
                continue
            task = asyncio.create_task(self._admit(conn))
            self._admissions.add(task)
            task.add_done_callback(self._admissions.discard)

    async def _admit(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        refusal = self.peer_check.refusal(conn)
        if refusal == PEER_GONE:  # routine when a client hangs up at once; nothing to answer anyway
            self._refuse(conn, "closed_before_check", f"dropped a front connection: {refusal}", logging.DEBUG)
            return
        if refusal is not None:
            self._refuse(conn, "not_tailscaled", f"refused a front connection: {refusal}", logging.WARNING)
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            header = await asyncio.wait_for(proxyproto.read(loop, conn), PROXY_HEADER_TIMEOUT)
        except (proxyproto.ProxyHeaderError, asyncio.TimeoutError, OSError) as exc:
            self._refuse(conn, "bad_proxy_header", f"refused a front connection: {exc or 'PROXY header timeout'}",
                         logging.WARNING)
            return
        provenance = TAILNET if is_tailnet_address(header.source) else FUNNEL
        if (provenance == TAILNET and not self.accept_tailnet) or (provenance == FUNNEL and not self.accept_funnel):
            self._refuse(conn, f"{provenance}_not_served",
                         f"refused a {provenance} client {header.source}: this service does not serve them",
                         logging.INFO)
            return
        tls = self.tls_context
        peer = Peer(str(header.source), header.source_port, provenance, tls is not None)
        server = self._servers[provenance]
        try:
            await loop.connect_accepted_socket(lambda: server.connection(peer), conn, ssl=tls,
                                               ssl_handshake_timeout=(self._timeouts[provenance] or 60.0)
                                               if tls else None)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake with %s failed: %s", peer.address, exc)
            conn.close()

    async def shutdown(self, timeout: float) -> None:
        """Let the requests in flight finish (for up to `timeout`), close idle connections
        at once and every other one once its response is out; then cut off the rest."""
        await asyncio.gather(*(server.drain(timeout) for server in self._servers.values()))

    def _refuse(self, conn: socket.socket, reason: str, message: str, level: int) -> None:
        conn.close()
        self.metrics.refused_connections.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_refusal_log > 1.0:
            self._last_refusal_log = now
            log.log(level, message)
