"""An in-process front listener and proxy for the unit tier: no tailnet, no tailscaled.

The peer check (sock_diag: "is this our tailscaled?") is replaced by a stand-in that
admits or refuses, because that check is proved by the end-to-end hazard suite.
Requests go over real loopback connections to aiohttp's server as tsnsrv sets it up
(httpserver.FrontServer), so what a test reads is what a client would get.
`tests/unit/conftest.py` turns these into fixtures.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from tsnsrv.front import FrontListener, Peer
from tsnsrv.httpserver import FrontServer
from tsnsrv.metrics import Metrics
from tsnsrv.proxy import Exchange

HOST = "books.tail1234.ts.net"


class StandInPeerCheck:
    """Admits every connection, or refuses all with a reason."""

    def __init__(self, refusal: str | None = None):
        self.reason = refusal
        self.checked = 0

    def refusal(self, _sock) -> str | None:
        self.checked += 1
        return self.reason


async def echo_peer(request: web.BaseRequest) -> web.Response:
    """A handler that answers with who the front listener says the client is."""
    peer = request.protocol.peer
    return web.json_response({**attrs.asdict(peer), "path": request.raw_path})


@attrs.define
class Front:
    listener: FrontListener
    metrics: Metrics
    check: StandInPeerCheck

    @property
    def port(self) -> int:
        return self.listener.port

    def refused(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("tsnsrv_refused_front_connections_total",
                                                      {"reason": reason}) or 0.0


def make_front(handler=echo_peer, refusal: str | None = None, **options) -> Front:
    metrics, check = Metrics(), StandInPeerCheck(refusal)
    settings = {"read_header_timeout": 5.0, "funnel_read_header_timeout": 5.0, "accept_tailnet": True,
                "accept_funnel": True, **options}
    listener = FrontListener("127.0.0.1", handler, check, metrics, **settings)
    listener.bind()
    listener.start()
    return Front(listener, metrics, check)


async def exchange(port: int, data: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    """Send the PROXY header and a request, return everything the server sends until it closes
    (b"" when it closes the connection without answering)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header, _, rest = data.partition(b"|")
    try:
        writer.write(header)
        await writer.drain()
        if tls is not None:
            await writer.start_tls(tls, server_hostname=HOST)
        writer.write(rest)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        writer.close()


def request(path: str = "/", headers: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n{headers}\r\n".encode()


def body(response: bytes) -> dict:
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(payload)


# --- aiohttp's server as tsnsrv sets it up, without a front listener ---------------------


@asynccontextmanager
async def served(handler, peer, idle_timeout: float = 5.0) -> AsyncIterator[int]:
    """A loopback port where `handler` serves every connection as coming from `peer`."""
    server = FrontServer(handler, idle_timeout)
    listening = await asyncio.get_running_loop().create_server(lambda: server.connection(peer), "127.0.0.1", 0)
    try:
        yield listening.sockets[0].getsockname()[1]
    finally:
        listening.close()
        await server.drain(1.0)


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Everything the server answers to `data` until it closes the connection."""
    return await exchange(port, b"|" + data)


@attrs.frozen
class Recorded:
    status: int
    headers: CIMultiDict
    text: str


def parse_response(data: bytes) -> Recorded:
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = CIMultiDict(line.split(": ", 1) for line in lines)
    return Recorded(int(status_line.split(" ")[1]), headers, payload.decode(errors="replace"))


async def recorded_exchange(handler, method: str, target: str, headers: dict[str, str], peer) -> Recorded:
    """What `handler` answers to one request without a body."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    async with served(handler, peer) as port:
        data = await raw_exchange(port, f"{method} {target} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
    return parse_response(data)


def upstream_headers_of(proxy, inbound: dict[str, str], peer, identity, target: str = "/") -> CIMultiDict:
    """The headers `proxy` would send upstream for a GET from `peer` known as `identity`."""
    exchange = Exchange(make_mocked_request("GET", target, headers=CIMultiDict(inbound)), peer)
    exchange.identity = identity
    return CIMultiDict(proxy.upstream_headers(exchange, None, target))
