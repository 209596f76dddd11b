"""The soak's upstream: an HTTP/1.1 server whose every answer the clients can check, and
which the fault schedule can make misbehave on command.

    python -m soaklib.upstream --port PORT --control SOCKET --events FILE

Endpoints (query parameters; `framing` is length, chunked or close: Content-Length,
Transfer-Encoding: chunked, or no length at all and the body ends when this server
closes the connection):

  GET  /body?id=&size=&framing=         the seeded body of `id` (bodies.py), `size` bytes
  POST /upload?id=&size=&framing=       reads the body, compares it with the seeded body of
                                        `id`; answers JSON {id, length, sha256, check}
  GET  /sse?id=&n=&gap=&framing=        `n` server-sent events `gap` s apart, then `end`
  GET  /ws?id=&tick=                    a websocket that echoes every message and pushes
                                        "tick:K:TAG" every `tick` seconds

Every answer carries X-Soak-Id: the id of the request it answers.

Commands on the control socket (a unix socket, one line each, one JSON line back):

  reset FRAMING COUNT    the next COUNT /body answers in FRAMING are cut by a TCP RST
                         half-way through their body
  slow HEAD STALL        until `fast`: every answer waits HEAD s before its head, or (every
                         other one with a body) stalls STALL s half-way through its body
  fast                   back to normal
  drop-idle              close the keep-alive connections waiting for a request
  status                 what has happened: resets done (ids), connections open

What a client could not see is written to the events file (JSON lines): each reset (so
the analysis can check that its client saw a failure), each upload that ended complete
by its framing but was not the body sent (a cut or corrupted body delivered as whole), and,
when SIGTERM stops it (at once, as a crashing app would), the answers it was writing: a
close-delimited one among them ends with the connection's FIN as if it were complete, a
cut no proxy can see.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
from websockets.frames import Opcode
from websockets.http11 import Request as WebsocketRequest
from websockets.server import ServerProtocol

from . import bodies

FRAMINGS = ("length", "chunked", "close")
READ_SIZE = 256 * 1024


def tick_tag(request_id: str, index: int) -> str:
    return hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:16]


def sse_event(request_id: str, index: int) -> bytes:
    return f"id: {index}\ndata: {request_id}:{index}:{tick_tag(request_id, index)}\n\n".encode()


def sse_end(count: int) -> bytes:
    return f"event: end\ndata: {count}\n\n".encode()


class Events:
    """The events file: one JSON object per line, with a monotonic time stamp."""

    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"t": time.monotonic(), "event": event, **fields}) + "\n")


class Faults:
    """What the control socket has armed."""

    def __init__(self) -> None:
        self.resets_armed: dict[str, int] = {framing: 0 for framing in FRAMINGS}
        self.resets_done: list[dict[str, Any]] = []
        self.slow: tuple[float, float] | None = None
        self._slow_turn = 0

    def take_reset(self, framing: str) -> bool:
        if self.resets_armed[framing] > 0:
            self.resets_armed[framing] -= 1
            return True
        return False

    def slowness(self, has_body: bool) -> tuple[float, float]:
        """(seconds before the head, seconds of stall half-way through the body)."""
        if self.slow is None:
            return 0.0, 0.0
        head, stall = self.slow
        self._slow_turn += 1
        if has_body and self._slow_turn % 2 == 0:
            return 0.0, stall
        return head, 0.0


class Reset(Exception):
    """This answer was cut by a TCP RST, as armed."""


class Connection:
    """One client connection (from the proxy): requests in turn, keep-alive."""

    def __init__(self, server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER)
        self.idle = False

    async def serve(self) -> None:
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    return
                keep_alive = await self._answer(request)
                if not keep_alive or self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return
                self.h11.start_next_cycle()
        except (Reset, ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writer.close()

    async def _receive(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.reader.read(READ_SIZE)
            self.h11.receive_data(data)

    async def _next_request(self) -> h11.Request | None:
        self.idle = True
        try:
            event = await self._receive()
        finally:
            self.idle = False
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        return event

    async def _answer(self, request: h11.Request) -> bool:
        url = urlsplit(request.target.decode())
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        request_id = query.get("id", "-")
        headers = {name.decode().lower(): value.decode() for name, value in request.headers}
        if url.path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
            await self._websocket(request, request_id, float(query.get("tick", "1")))
            return False
        if url.path == "/upload":
            body = await self._upload(request_id, int(query.get("size", "0")))
        else:
            await self._drain_request()
        framing = query.get("framing", "length")
        if url.path == "/body":
            size = int(query.get("size", "0"))
            reset = size >= 2 and self.server.faults.take_reset(framing)
            await self._respond(request_id, framing, "application/octet-stream", size,
                                bodies.chunks(bodies.seed_of(request_id), size, bodies.BLOCK), reset)
        elif url.path == "/upload":
            await self._respond(request_id, framing, "application/json", len(body), iter((body,)))
        elif url.path == "/sse":
            count, gap = int(query.get("n", "5")), float(query.get("gap", "0.2"))
            pieces = [sse_event(request_id, index) for index in range(count)] + [sse_end(count)]
            await self._respond(request_id, framing, "text/event-stream", sum(map(len, pieces)), iter(pieces),
                                gap=gap)
        else:
            text = b"not found\n"
            await self._respond(request_id, "length", "text/plain", len(text), iter((text,)), status=404)
        return framing != "close"

    async def _drain_request(self) -> None:
        while not isinstance(await self._receive(), h11.EndOfMessage):
            pass

    async def _upload(self, request_id: str, size: int) -> bytes:
        check = bodies.BodyCheck(bodies.seed_of(request_id), size)
        try:
            while True:
                event = await self._receive()
                if isinstance(event, h11.EndOfMessage):
                    break
                check.feed(event.data)
        except (ConnectionError, h11.RemoteProtocolError, asyncio.IncompleteReadError):
            # The body never ended by its framing: a cut the proxy made visible. Fine.
            self.server.events.write("upload-incomplete", id=request_id, received=check.received, size=size)
            raise
        verdict = "ok" if check.complete else (check.problem or "short")
        if verdict != "ok":
            # Complete by its framing, but not the body its client sent: a cut or corrupted
            # body delivered as whole.
            self.server.events.write("upload-violation", id=request_id, check=verdict, received=check.received,
                                     size=size, offset=check.problem_offset)
        return json.dumps({"id": request_id, "length": check.received, "sha256": check.sha256(),
                           "check": verdict}).encode()

    async def _respond(self, request_id: str, framing: str, content_type: str, size: int, pieces: Any,
                       reset: bool = False, gap: float = 0.0, status: int = 200) -> None:
        self.server.answering[request_id] = framing
        try:
            await self._respond_now(request_id, framing, content_type, size, pieces, reset, gap, status)
        finally:
            self.server.answering.pop(request_id, None)

    async def _respond_now(self, request_id: str, framing: str, content_type: str, size: int, pieces: Any,
                           reset: bool, gap: float, status: int) -> None:
        head_delay, stall = self.server.faults.slowness(size >= 2)
        if head_delay:
            await asyncio.sleep(head_delay)
        headers = [("Content-Type", content_type), ("X-Soak-Id", request_id), ("Cache-Control", "no-store")]
        if framing == "length":
            headers.append(("Content-Length", str(size)))
        elif framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        if framing == "close":
            # Written by hand: h11 (rightly) frames an HTTP/1.1 answer without a length as chunked.
            head = f"HTTP/1.1 {status} OK\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "Connection: close\r\n\r\n"
            self.writer.write(head.encode())
            self.h11 = h11.Connection(h11.SERVER)  # this connection ends with this answer
        else:
            self.writer.write(self.h11.send(h11.Response(status_code=status, headers=headers)))
        half = size // 2
        sent = 0
        first_piece = True
        for piece in pieces:
            if gap and not first_piece:
                await asyncio.sleep(gap)
            first_piece = False
            while piece:
                # Up to the half-way mark first, where a reset or a stall happens.
                cut = half - sent if (reset or stall) and sent < half < sent + len(piece) else len(piece)
                part, piece = piece[:cut], piece[cut:]
                self.writer.write(part if framing == "close" else self.h11.send(h11.Data(data=part)))
                sent += len(part)
                await self.writer.drain()
                if sent == half and reset:
                    await self._reset(request_id, framing, sent, size)
                if sent == half and stall:
                    await asyncio.sleep(stall)
                    stall = 0.0
        if framing != "close":
            self.writer.write(self.h11.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def _reset(self, request_id: str, framing: str, sent: int, size: int) -> None:
        await asyncio.sleep(0.05)  # let the first half leave, so the cut is mid-body
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
        record = {"id": request_id, "framing": framing, "sent": sent, "size": size, "t": time.monotonic()}
        self.server.faults.resets_done.append(record)
        self.server.events.write("reset", **record)
        raise Reset()

    async def _websocket(self, request: h11.Request, request_id: str, tick: float) -> None:
        protocol = ServerProtocol()
        # The protocol parses the handshake itself: hand it the head h11 has read.
        protocol.receive_data(b"GET " + request.target + b" HTTP/1.1\r\n"
                              + b"".join(name + b": " + value + b"\r\n" for name, value in request.headers) + b"\r\n")
        head = protocol.events_received()[0]
        assert isinstance(head, WebsocketRequest), head
        head_delay, _ = self.server.faults.slowness(False)
        if head_delay:
            await asyncio.sleep(head_delay)
        response = protocol.accept(head)
        response.headers["X-Soak-Id"] = request_id
        protocol.send_response(response)
        early, _closed = self.h11.trailing_data

        def flush() -> None:
            for data in protocol.data_to_send():
                if data:
                    self.writer.write(data)

        flush()
        if early:
            protocol.receive_data(early)
        ticker = asyncio.ensure_future(self._tick(protocol, request_id, tick, flush))
        try:
            while not protocol.close_expected():
                for frame in protocol.events_received():
                    if frame.opcode is Opcode.TEXT:
                        protocol.send_text(frame.data, fin=frame.fin)
                    elif frame.opcode is Opcode.BINARY:
                        protocol.send_binary(frame.data, fin=frame.fin)
                    elif frame.opcode is Opcode.CONT:
                        protocol.send_continuation(frame.data, fin=frame.fin)
                flush()
                await self.writer.drain()
                if protocol.close_expected():
                    break
                data = await self.reader.read(READ_SIZE)
                if not data:
                    protocol.receive_eof()
                    break
                protocol.receive_data(data)
            flush()
            await self.writer.drain()
        finally:
            ticker.cancel()

    @staticmethod
    async def _tick(protocol: ServerProtocol, request_id: str, every: float, flush: Any) -> None:
        index = 0
        while True:
            await asyncio.sleep(every)
            if protocol.state.name != "OPEN":
                return
            protocol.send_text(f"tick:{index}:{tick_tag(request_id, index)}".encode())
            flush()
            index += 1


class Upstream:
    def __init__(self, events: Events):
        self.events = events
        self.faults = Faults()
        self.connections: set[Connection] = set()
        self.answering: dict[str, str] = {}  # request id -> framing, while its answer is being written

    def exit_now(self) -> None:
        """SIGTERM: note the answers being written, then end at once; the kernel closes every
        connection (a FIN, or a RST where a request was still unread)."""
        self.events.write("exit", answering=self.answering)
        os._exit(0)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(self, reader, writer)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            words = line.decode().split()
            answer: dict[str, Any] = {"ok": True}
            if words[:1] == ["reset"]:
                armed = self.faults.resets_armed
                armed[words[1]] = max(0, armed[words[1]] + int(words[2]))  # a negative count disarms
            elif words[:1] == ["slow"]:
                self.faults.slow = (float(words[1]), float(words[2]))
            elif words[:1] == ["fast"]:
                self.faults.slow = None
            elif words[:1] == ["drop-idle"]:
                idle = [c for c in self.connections if c.idle]
                for connection in idle:
                    connection.writer.close()
                answer["dropped"] = len(idle)
            elif words[:1] == ["status"]:
                answer.update(resets_done=self.faults.resets_done, resets_armed=self.faults.resets_armed,
                              connections=len(self.connections))
            else:
                answer = {"ok": False, "error": f"unknown command {line!r}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()


async def main(args: argparse.Namespace) -> None:
    upstream = Upstream(Events(args.events))
    server = await asyncio.start_server(upstream.handle, args.host, args.port, reuse_address=True, backlog=1024)
    if args.control.exists():
        args.control.unlink()
    control = await asyncio.start_unix_server(upstream.control, str(args.control))
    upstream.events.write("started", pid=os.getpid())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, upstream.exit_now)
    async with server, control:
        await asyncio.gather(server.serve_forever(), control.serve_forever())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--events", type=Path, required=True)
    asyncio.run(main(parser.parse_args()))
