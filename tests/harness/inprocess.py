"""An in-process front listener for the unit tier: no tailnet, no tailscaled.

The peer check (sock_diag: "is this our tailscaled?") is replaced by a stand-in that
admits or refuses, because that check is proved by the end-to-end hazard suite.
`tests/unit/conftest.py` turns these into fixtures.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import attrs
from aiohttp import web

from tsnsrv.front import FrontListener
from tsnsrv.metrics import Metrics

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
    return web.json_response({**attrs.asdict(request.protocol.peer), "path": request.raw_path})


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
