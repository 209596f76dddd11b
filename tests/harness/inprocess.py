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
from multidict import CIMultiDict

from tsnsrv.front import FrontListener
from tsnsrv.http1 import Exchange, Request
from tsnsrv.proxy import Relay
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


def echo_peer(exchange: Exchange) -> None:
    """An application that answers with who the front listener says the client is."""
    exchange.respond(200, json.dumps({**attrs.asdict(exchange.peer), "path": exchange.request.target}).encode(),
                     content_type=b"application/json")


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


# --- the proxy without a front listener ---------------------------------------------


class RecordingConnection:
    """Stands in for an http1.ServerConnection: keeps what the application writes."""

    def __init__(self, peer):
        self.peer = peer
        self.written: list[bytes] = []
        self.close_after_response = False
        self.writing_paused = False
        self.closed = False
        self.finished: asyncio.Future | None = None  # set to wait for the exchange to finish

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, parts) -> None:
        self.written.extend(parts)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def exchange_finished(self, _exchange) -> None:
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


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


async def recorded_exchange(app, method: str, target: str, headers: dict[str, str], peer) -> Recorded:
    """What `app` answers to one request without a body, from the bytes it writes."""
    connection = RecordingConnection(peer)
    connection.finished = asyncio.get_running_loop().create_future()
    request = Request(method, target, "1.1", [(n.encode(), v.encode()) for n, v in headers.items()], True, False)
    exchange = Exchange(connection, request)  # type: ignore[arg-type]
    exchange._body_end()
    app(exchange)
    await asyncio.wait_for(connection.finished, 5)
    return parse_response(b"".join(connection.written))


@attrs.frozen
class UpstreamHead:
    request_line: str
    headers: CIMultiDict


def upstream_head_of(proxy, inbound: dict[str, str], peer, identity, target: str = "/") -> UpstreamHead:
    """The request head `proxy` would send upstream for a GET from `peer` known as `identity`."""
    request = Request("GET", target, "1.1", [(n.encode(), v.encode()) for n, v in inbound.items()], True, False)
    relay = Relay(proxy, Exchange(RecordingConnection(peer), request))  # type: ignore[arg-type]
    relay.identity = identity
    head = proxy.upstream_head(relay, target, "").decode("latin-1")
    request_line, *lines = head.rstrip("\r\n").split("\r\n")
    return UpstreamHead(request_line, CIMultiDict(line.split(": ", 1) for line in lines))
