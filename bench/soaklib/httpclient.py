"""HTTP/1.1 as the soak's clients speak it: one connection at a time, its framing seen.

Client libraries hide exactly what the soak must see (whether a body ended by its framing
or by a dropped connection, which answer belongs to which pipelined request), so the
clients write requests and parse answers with h11, a strict sans-I/O HTTP/1.1 parser.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any

import h11

READ_SIZE = 256 * 1024


class Failure(Exception):
    """The exchange failed in a way its client sees (the `what` is its class)."""

    def __init__(self, what: str, detail: str = ""):
        super().__init__(f"{what}: {detail}" if detail else what)
        self.what = what


class KeepingReader(asyncio.StreamReader):
    """A stream that keeps what arrived before a connection error readable, as a client
    reading its socket would (curl shows a 502 that came just before a reset): the error
    comes after the data, as the end of the stream with `error` set."""

    error: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.error = exc
        self.feed_eof()


class SourcePorts:
    """The clients' source ports, taken in turn from below the kernel's ephemeral range.

    A service node's netstack (gVisor, in tailscaled and in the Go tsnsrv's tsnet alike)
    keeps a connection it closed in TIME-WAIT for 60 s and drops a SYN that reuses its
    addresses and ports: gVisor hands a SYN only to a listening endpoint, and tailscaled
    accepts through a forwarder. Linux picks ephemeral ports from an offset that moves
    every 10 s, so now and then it picks one that the node still holds, and that connect
    hangs whatever the proxy does. Ports taken in turn from a range of their own stay
    unused for minutes (the soak opens far fewer than the range per minute), so a connect
    without an answer says something about the candidate, not about port reuse."""

    FIRST, LAST = 10000, 32767  # below Linux's default ephemeral range (32768-60999)

    def __init__(self) -> None:
        self.next = self.FIRST

    def bind(self, sock: socket.socket) -> None:
        for _ in range(self.LAST - self.FIRST + 1):
            port, self.next = self.next, self.next + 1 if self.next < self.LAST else self.FIRST
            try:
                sock.bind(("", port))
                return
            except OSError:  # still in use by a connection of a previous turn: the next
                continue
        raise Failure("connect", "no free source port")


SOURCE_PORTS = SourcePorts()


async def tcp_connect(ip: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket from a port of SOURCE_PORTS, or Failure("connect-timeout" or
    "connect"), so that a SYN without an answer is told from a slow handshake on top."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        SOURCE_PORTS.bind(sock)
    except Failure:
        sock.close()
        raise
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), timeout)
    except TimeoutError as exc:
        sock.close()
        raise Failure("connect-timeout") from exc
    except OSError as exc:
        sock.close()
        raise Failure("connect", exc.strerror or str(exc)) from exc
    return sock


class Target:
    """Where the service is, and how a client reaches it (TLS against the test CA)."""

    def __init__(self, ip: str, port: int, host: str, ca_file: str | None, connect_timeout: float,
                 read_timeout: float):
        self.ip = ip
        self.port = port
        self.host = host
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl: ssl.SSLContext | None = None
        if ca_file:
            self.ssl = ssl.create_default_context(cafile=ca_file)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl else "http"


def request_bytes(method: str, target: str, host: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A request head as h11 writes it (for pipelining, where requests go out before answers)."""
    writer = h11.Connection(h11.CLIENT)
    return writer.send(h11.Request(method=method, target=target, headers=[("Host", host), *headers]))


class Answer:
    """One response as it arrived: status, headers, and how it ended."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.status = status
        self.headers = headers
        self.length = 0
        self.complete = False  # ended by its own framing (length, last chunk, or close)
        self.close_delimited = False


class HttpConnection:
    """A client connection: TCP (and TLS) to the service, h11 on top."""

    def __init__(self, target: Target):
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h11 = h11.Connection(h11.CLIENT)
        self.opened_at = 0.0
        self.serial: str | None = None  # the TLS certificate's serial number, in hex
        self.reused = False

    async def open(self) -> HttpConnection:
        target = self.target
        self.opened_at = time.monotonic()
        deadline = self.opened_at + target.connect_timeout
        loop = asyncio.get_running_loop()
        reader = KeepingReader(limit=READ_SIZE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        sock = await tcp_connect(target.ip, target.port, target.connect_timeout)
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
        self.reader, self.writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)
        if target.ssl is not None:
            try:  # apart from the TCP connect, so that a hang says which it was
                await asyncio.wait_for(self.writer.start_tls(target.ssl, server_hostname=target.host),
                                       max(0.1, deadline - time.monotonic()))
            except TimeoutError as exc:
                self.writer.transport.abort()
                raise Failure("tls-timeout") from exc
            except (ssl.SSLError, OSError) as exc:
                self.writer.transport.abort()
                raise Failure("tls", str(exc)) from exc
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.serial = ssl_object.getpeercert()["serialNumber"]
        return self

    @property
    def open_for_more(self) -> bool:
        return self.writer is not None and self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE

    def close(self, reset: bool = False) -> None:
        if self.writer is None:
            return
        if reset:
            self.writer.transport.abort()
        else:
            self.writer.close()
        self.writer = None

    async def write(self, data: bytes) -> None:
        assert self.writer is not None
        if not data:
            return  # the end of a body with Content-Length: nothing goes out, nothing can fail
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.target.read_timeout)
        except TimeoutError as exc:
            raise Failure("write-timeout") from exc
        except (OSError, ssl.SSLError) as exc:
            raise Failure("write", type(exc).__name__) from exc

    async def send_head(self, method: str, target: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.write(self.h11.send(h11.Request(method=method, target=target,
                                                   headers=[("Host", self.target.host), *headers])))

    async def send_body(self, data: bytes) -> None:
        await self.write(self.h11.send(h11.Data(data=data)))

    async def end_body(self) -> None:
        await self.write(self.h11.send(h11.EndOfMessage()))

    def expect(self, method: str, target: str) -> None:
        """For pipelining: this request went out already (as `request_bytes`); its answer comes next."""
        self.h11.send(h11.Request(method=method, target=target, headers=[("Host", self.target.host)]))
        self.h11.send(h11.EndOfMessage())

    async def _event(self) -> Any:
        assert self.reader is not None
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise Failure("cut-visible", str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.target.read_timeout)
            except TimeoutError as exc:
                raise Failure("timeout", f"nothing for {self.target.read_timeout:g}s") from exc
            except ssl.SSLError as exc:
                raise Failure("tls-cut", str(exc)) from exc
            except OSError as exc:
                raise Failure("read", exc.strerror or str(exc)) from exc
            if not data and isinstance(self.reader, KeepingReader) and self.reader.error is not None:
                error = self.reader.error
                if isinstance(error, ssl.SSLError):
                    raise Failure("tls-cut", str(error))
                raise Failure("reset" if isinstance(error, ConnectionResetError) else "read", str(error))
            self.h11.receive_data(data)

    async def head(self) -> Answer:
        """The next answer's head (an informational answer is skipped)."""
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                headers = {name.decode().lower(): value.decode() for name, value in event.headers}
                answer = Answer(event.status_code, headers)
                answer.close_delimited = ("content-length" not in headers
                                          and "chunked" not in headers.get("transfer-encoding", ""))
                return answer
            if isinstance(event, h11.ConnectionClosed):
                raise Failure("no-answer", "closed before an answer")
            if not isinstance(event, h11.InformationalResponse):
                raise Failure("protocol", repr(event))

    async def body_piece(self, answer: Answer) -> bytes | None:
        """The next piece of the body; None once it ended by its framing."""
        event = await self._event()
        if isinstance(event, h11.Data):
            answer.length += len(event.data)
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            answer.complete = True
            return None
        raise Failure("protocol", repr(event))

    def next_cycle(self) -> bool:
        """After a complete exchange: whether the connection can carry another request."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.reused = True
            return True
        return False
