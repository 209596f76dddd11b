"""The soak's clients: every kind at once, from the client device, each answer checked.

    python -m soaklib.clients --ip IP --port 443 --host NAME --ca CA --events FILE --seed N [sizes]

Runs inside the client's network namespace. Kinds (how many of each in KINDS):

  probe        a new connection every 0.2 s for one small GET: when new clients get through
  keepalive    small GETs one after another on a keep-alive connection
  pipeline     batches of small GETs written at once, answers read in order
  download     GETs of random sizes (log-uniform up to --max-transfer)
  upload       POSTs of random sizes, Content-Length or chunked; the upstream returns the
               SHA-256 it computed and whether the body was the one sent
  sse          server-sent event streams, every event checked
  websocket    long-lived sessions: every echo and every pushed tick checked
  slow-reader  downloads read at about 300 KB/s
  slow-writer  uploads written at about 300 KB/s
  hangup       downloads and uploads abandoned half-way (by close or by reset)

Every answer is checked against what its request must get (bodies.py): the X-Soak-Id
header and the body's seed say whether it belongs to this request, the bytes whether it is
whole. Each exchange ends as ok, failed (visibly: an error status, a reset, a cut the
framing betrays, a timeout), violation (a wrong answer, a corrupted body, or a cut body
that ended by its framing), or hangup (ours, on purpose).

Commands on stdin: `pause` (finish what runs, start nothing new, close every connection,
then print {"paused": EPOCH, "counts": ...}), `resume`, `stop`. The counts are what the
clients sent and saw during the epoch, to compare with the proxy's metrics.
Events (JSON lines, monotonic times) go to --events: every failure, violation and probe,
per-second totals, and the TLS certificate serial whenever it changes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from . import bodies
from .httpclient import Answer, Failure, HttpConnection, Target, request_bytes, tcp_connect
from .upstream import FRAMINGS, sse_end, sse_event, tick_tag

# A mix that exercises every path without saturating a small machine: the soak is about
# what goes wrong, not about throughput (latency under saturation would look like faults).
KINDS = {"probe": 1, "keepalive": 3, "pipeline": 2, "download": 1, "upload": 1, "sse": 2, "websocket": 2,
         "slow-reader": 1, "slow-writer": 1, "hangup": 1}
SLOW_PIECE, SLOW_PAUSE = 16 * 1024, 0.05


class Exchange:
    """One request (or websocket session, or event stream) and how it ended."""

    def __init__(self, kind: str, request_id: str, connection: HttpConnection | None = None, framing: str = "",
                 size: int = 0):
        self.kind = kind
        self.id = request_id
        self.start = time.monotonic()
        self.opened = connection.opened_at if connection else self.start
        self.reused = connection.reused if connection else False
        self.framing = framing
        self.size = size
        self.received = 0
        self.status: int | None = None
        self.result = "ok"
        self.what = ""
        self.sent = False  # the request reached an open connection (so the proxy counts it)
        self.violation = ""

    def on(self, connection: HttpConnection) -> None:
        """The exchange goes over this connection (opened for it, or kept from before)."""
        self.opened, self.reused = connection.opened_at, connection.reused

    def fail(self, what: str) -> Exchange:
        self.result, self.what = "failed", what
        return self

    def violate(self, kind: str, what: str) -> Exchange:
        """`kind`: wrong-answer, corrupt, cut-complete (a cut that ended by its framing) or lost."""
        self.result, self.what, self.violation = "violation", what, kind
        return self

    def hang_up(self) -> Exchange:
        self.result, self.what = "hangup", "by the client"
        return self

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "start": self.start, "end": time.monotonic(),
                "opened": self.opened, "reused": self.reused, "result": self.result, "what": self.what,
                "status": self.status, "framing": self.framing, "size": self.size, "received": self.received,
                "violation": self.violation}


class Ledger:
    """What the clients saw, for the analysis (events file) and per epoch (for the metrics)."""

    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)
        self.epoch = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.seconds: dict[int, collections.Counter[str]] = {}
        self.failures = 0  # over the whole run, for the loops' back-off
        self._serial: str | None = None

    def write(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "epoch": self.epoch, **fields}) + "\n")

    def connection(self, connection: HttpConnection | None = None, serial: str | None = None,
                   opened: float = 0.0) -> None:
        if connection is not None:
            serial, opened = connection.serial, connection.opened_at
        if serial is not None and serial != self._serial:
            self._serial = serial
            self.write("serial", t=opened, serial=serial)

    def status(self, status: int) -> None:
        self.counts[f"{status // 100}xx"] += 1

    def done(self, exchange: Exchange) -> None:
        record = exchange.record()
        self.counts[exchange.result] += 1
        self.counts["sent"] += exchange.sent
        # Sent, but ended without an answer: the proxy may have answered (and counted) it anyway.
        self.counts["unanswered"] += exchange.sent and exchange.status is None
        self.failures += exchange.result == "failed"
        if exchange.result == "ok" and exchange.status is not None and exchange.status // 100 == 2:
            self.counts["ok-2xx"] += 1
        second = self.seconds.setdefault(int(record["end"]), collections.Counter())
        second[exchange.result] += 1
        if exchange.result != "ok" or exchange.kind == "probe":
            self.write("exchange", **record)

    def flush_seconds(self, before: float) -> None:
        for second in sorted(s for s in self.seconds if s < before):
            self.write("second", t=second, **self.seconds.pop(second))

    def new_epoch(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), collections.Counter()
        self.epoch += 1
        return counts


class Clients:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.target = Target(args.ip, args.port, args.host, args.ca, args.connect_timeout, args.read_timeout)
        self.ledger = Ledger(args.events)
        self.go = asyncio.Event()
        self.go.set()
        self.stopping = False
        self.parked = 0
        self.loops = sum(KINDS.values())
        self.all_parked = asyncio.Event()
        self.counter = 0
        self.probes: set[asyncio.Future[None]] = set()

    # --- control -------------------------------------------------------------------

    @property
    def pausing(self) -> bool:
        return not self.go.is_set()

    async def park(self) -> None:
        """Where each loop waits while the clients are paused."""
        self.parked += 1
        if self.parked == self.loops:
            self.all_parked.set()
        await self.go.wait()
        self.parked -= 1

    async def control(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while raw := await reader.readline():
            line = raw.decode().strip()
            if line == "pause":
                self.all_parked.clear()
                self.go.clear()
                await self.all_parked.wait()
                self.ledger.flush_seconds(math.inf)
                self.reply({"paused": self.ledger.epoch, "counts": self.ledger.new_epoch(), "t": time.monotonic()})
            elif line == "resume":
                self.go.set()
                self.reply({"resumed": self.ledger.epoch, "t": time.monotonic()})
            elif line == "stop":
                break
        self.stopping = True
        self.go.set()

    @staticmethod
    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(self.kind_loop(kind, index))
                 for kind, count in KINDS.items() for index in range(count)]
        tasks.append(asyncio.ensure_future(self.flusher()))
        await self.control()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.ledger.flush_seconds(math.inf)

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(2)
            self.ledger.flush_seconds(int(time.monotonic()) - 1)

    def new_id(self, kind: str, index: int) -> str:
        self.counter += 1
        return f"{kind}-{index}-{self.counter}-{self.args.seed}"

    # --- the kinds -----------------------------------------------------------------

    async def kind_loop(self, kind: str, index: int) -> None:
        rng = random.Random(f"{self.args.seed}:{kind}:{index}")
        work: Callable[[random.Random, str, KeepAlive], Awaitable[None]] = getattr(self, kind.replace("-", "_"))
        keep = KeepAlive(self)
        while not self.stopping:
            if self.pausing:
                keep.drop()
                await asyncio.gather(*self.probes)
                await self.park()
                continue
            failures = self.ledger.failures
            try:
                await work(rng, self.new_id(kind, index), keep)
            except Exception as exc:  # noqa: BLE001 - a bug in a client must show, not end the soak
                self.ledger.write("client-error", kind=kind, error=f"{type(exc).__name__}: {exc}")
                keep.drop()
                await asyncio.sleep(1)
            if self.ledger.failures > failures and kind != "probe":
                await asyncio.sleep(rng.uniform(0.2, 0.5))  # as a client retrying after an error would

    def size(self, rng: random.Random, low: int, high: int) -> int:
        """Log-uniform: mostly small, sometimes very large."""
        return int(math.exp(rng.uniform(math.log(low), math.log(max(low + 1, high)))))

    async def probe(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        """Every 0.2 s a new connection, each on its own, so that one hanging does not hold up
        the next: the first success after a fault is seen within 0.2 s."""
        task = asyncio.ensure_future(self.get_body(rng, request_id, "probe", rng.randint(16, 512), keep=None))
        self.probes.add(task)
        task.add_done_callback(self.probes.discard)
        await asyncio.sleep(0.2)

    async def keepalive(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        await self.get_body(rng, request_id, "keepalive", rng.randint(0, 4096), keep=keep)
        await asyncio.sleep(rng.uniform(0.02, 0.1))

    async def download(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        await self.get_body(rng, request_id, "download", self.size(rng, 1024, self.args.max_transfer), keep=keep)
        await asyncio.sleep(rng.uniform(0.2, 1))

    async def slow_reader(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        await self.get_body(rng, request_id, "slow-reader", self.size(rng, 64 * 1024, 2 * 1024 * 1024),
                            keep=None, slow=True)

    async def hangup(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        reset = rng.random() < 0.5
        if rng.random() < 0.5:
            await self.get_body(rng, request_id, "hangup", self.size(rng, 256 * 1024, self.args.max_transfer),
                                keep=None, hang_up=(rng.uniform(0.05, 0.9), reset))
        else:
            await self.post_upload(rng, request_id, "hangup", self.size(rng, 256 * 1024, self.args.max_transfer),
                                   hang_up=(rng.uniform(0.05, 0.9), reset))
        await asyncio.sleep(rng.uniform(0.1, 1))

    async def upload(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        await self.post_upload(rng, request_id, "upload", self.size(rng, 1024, self.args.max_transfer), keep=keep)
        await asyncio.sleep(rng.uniform(0.2, 1))

    async def slow_writer(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        await self.post_upload(rng, request_id, "slow-writer", self.size(rng, 64 * 1024, 1024 * 1024), slow=True)

    async def connect(self, exchange: Exchange, keep: KeepAlive | None) -> HttpConnection:
        """The loop's kept connection, or a new one for this exchange alone."""
        connection = await (keep.connection() if keep else HttpConnection(self.target).open())
        self.ledger.connection(connection)
        exchange.on(connection)
        return connection

    # --- one GET of a seeded body ----------------------------------------------------

    async def get_body(self, rng: random.Random, request_id: str, kind: str, size: int, keep: KeepAlive | None,
                       slow: bool = False, hang_up: tuple[float, bool] | None = None) -> None:
        framing = rng.choice(FRAMINGS)
        connection: HttpConnection | None = None
        exchange = Exchange(kind, request_id, framing=framing, size=size)
        try:
            connection = await self.connect(exchange, keep)
            await connection.send_head("GET", f"/body?id={request_id}&size={size}&framing={framing}")
            await connection.end_body()
            exchange.sent = True
            answer = await connection.head()
            await self.read_body(connection, exchange, answer, slow, hang_up)
        except Failure as failure:
            exchange.fail(failure.what)
        finally:
            self.finish(exchange, connection, keep)

    async def read_body(self, connection: HttpConnection, exchange: Exchange, answer: Answer, slow: bool = False,
                        hang_up: tuple[float, bool] | None = None) -> None:
        """Reads and checks the body of a GET /body answer; sets the exchange's outcome."""
        if not await self.answered(connection, exchange, answer):
            return
        if answer.headers.get("x-soak-id") != exchange.id:
            exchange.violate("wrong-answer", f"answer for {answer.headers.get('x-soak-id')!r}")
            return
        check = bodies.BodyCheck(bodies.seed_of(exchange.id), exchange.size)
        while (piece := await connection.body_piece(answer)) is not None:
            check.feed(piece)
            exchange.received = check.received
            if hang_up is not None and check.received >= hang_up[0] * exchange.size:
                connection.close(reset=hang_up[1])
                exchange.hang_up()
                return
            if slow:
                await asyncio.sleep(SLOW_PAUSE * len(piece) / SLOW_PIECE)
        self.judge(exchange, check)

    async def answered(self, connection: HttpConnection, exchange: Exchange, answer: Answer) -> bool:
        """Notes the answer's status; an error status fails the exchange (its body is read, so
        the connection can go on). Whether the answer is a 200 worth checking."""
        exchange.status = answer.status
        self.ledger.status(answer.status)
        if answer.status == 200:
            return True
        await self.drain(connection, answer)
        exchange.fail(f"status {answer.status}")
        return False

    @staticmethod
    def judge(exchange: Exchange, check: bodies.BodyCheck) -> None:
        """A body that ended by its framing: it must be exactly the one expected."""
        if check.problem == "foreign":
            exchange.violate("wrong-answer", f"another request's body at byte {check.problem_offset}")
        elif check.problem is not None:
            exchange.violate("corrupt", f"corrupt body ({check.problem}) at byte {check.problem_offset}")
        elif not check.complete:
            exchange.violate("cut-complete", f"cut body taken as complete: {check.received} of {check.size} bytes")

    @staticmethod
    async def drain(connection: HttpConnection, answer: Answer) -> None:
        while await connection.body_piece(answer) is not None:
            pass

    def finish(self, exchange: Exchange, connection: HttpConnection | None, keep: KeepAlive | None) -> None:
        """Keeps the connection for the next exchange when this one ended cleanly (an error
        status with its whole body is a clean end too)."""
        if (exchange.result in ("violation", "hangup") or connection is None or keep is None
                or not connection.next_cycle()):
            if connection is not None:
                connection.close()
            if keep is not None:
                keep.current = None
        self.ledger.done(exchange)

    # --- uploads ------------------------------------------------------------------

    async def post_upload(self, rng: random.Random, request_id: str, kind: str, size: int,
                          keep: KeepAlive | None = None, slow: bool = False,
                          hang_up: tuple[float, bool] | None = None) -> None:
        framing = rng.choice(FRAMINGS)
        chunked = rng.random() < 0.5
        connection: HttpConnection | None = None
        exchange = Exchange(kind, request_id, framing=framing, size=size)
        try:
            connection = await self.connect(exchange, keep)
            headers = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(size))]
            await connection.send_head("POST", f"/upload?id={request_id}&size={size}&framing={framing}",
                                       [("Content-Type", "application/octet-stream"), *headers])
            exchange.sent = True
            if not await self.send_upload(connection, exchange, slow, hang_up):
                return
            answer = await connection.head()
            if not await self.answered(connection, exchange, answer):
                return
            text = b""
            while (piece := await connection.body_piece(answer)) is not None:
                text += piece
            if answer.headers.get("x-soak-id") != request_id:
                exchange.violate("wrong-answer", f"answer for {answer.headers.get('x-soak-id')!r}")
            else:
                self.judge_upload(exchange, text)
        except Failure as failure:
            exchange.fail(failure.what)
        finally:
            self.finish(exchange, connection, keep)

    async def send_upload(self, connection: HttpConnection, exchange: Exchange, slow: bool,
                          hang_up: tuple[float, bool] | None) -> bool:
        """Sends the seeded body; False when the client hangs up on purpose half-way."""
        sent = 0
        try:
            for piece in bodies.chunks(bodies.seed_of(exchange.id), exchange.size,
                                       SLOW_PIECE if slow else bodies.BLOCK):
                if hang_up is not None and sent + len(piece) >= hang_up[0] * exchange.size:
                    await self.early_answer(connection, exchange, 0.05)  # one already there is seen first
                    connection.close(reset=hang_up[1])
                    exchange.received = sent
                    exchange.hang_up()
                    return False
                await connection.send_body(piece)
                sent += len(piece)
                if slow:
                    await asyncio.sleep(SLOW_PAUSE)
            await connection.end_body()
        except Failure as failure:
            # The server may have answered early (a 502 before it read the body) and closed.
            status = await self.early_answer(connection, exchange, 2)
            raise Failure(f"status {status}" if status else failure.what) from failure
        return True

    async def early_answer(self, connection: HttpConnection, exchange: Exchange, wait: float) -> int | None:
        """The status of an answer that came before the request's body was all sent, if any."""
        try:
            answer = await asyncio.wait_for(connection.head(), wait)
        except (Failure, TimeoutError):
            return None
        exchange.status = answer.status
        self.ledger.status(answer.status)
        return answer.status

    @staticmethod
    def judge_upload(exchange: Exchange, text: bytes) -> None:
        try:
            report = json.loads(text)
        except ValueError:
            exchange.violate("corrupt", f"cut or corrupt upload answer ({len(text)} bytes)")
            return
        exchange.received = report["length"]
        if report["id"] != exchange.id:
            exchange.violate("wrong-answer", f"answer for upload {report['id']!r}")
        elif report["check"] != "ok" or report["length"] != exchange.size:
            kind = "cut-complete" if report["check"] == "short" else "corrupt"
            exchange.violate(kind, f"the upstream received a different body: {report['check']}, "
                                   f"{report['length']} bytes")
        elif report["sha256"] != bodies.sha256_of(bodies.seed_of(exchange.id), exchange.size):
            exchange.violate("corrupt", "SHA-256 differs")

    # --- pipelining -----------------------------------------------------------------

    async def pipeline(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        batch = [(f"{request_id}.{n}", rng.randint(0, 2048), rng.choice(FRAMINGS)) for n in range(rng.randint(2, 8))]
        while batch:
            batch = await self.pipelined(batch, keep)
        await asyncio.sleep(rng.uniform(0.05, 0.2))

    async def pipelined(self, batch: list[tuple[str, int, str]], keep: KeepAlive) -> list[tuple[str, int, str]]:
        """Writes the whole batch, then reads the answers in order; returns the requests left
        unanswered because the server announced it would close (sent again, as clients do)."""
        try:
            connection = await keep.connection()
        except Failure as failure:
            for request_id, size, framing in batch:
                self.ledger.done(Exchange("pipeline", request_id, None, framing, size).fail(failure.what))
            return []
        self.ledger.connection(connection)
        targets = [f"/body?id={request_id}&size={size}&framing={framing}" for request_id, size, framing in batch]
        exchanges = [Exchange("pipeline", request_id, connection, framing, size) for request_id, size, framing in batch]
        try:
            await connection.write(b"".join(request_bytes("GET", target, self.target.host) for target in targets))
        except Failure as failure:
            for exchange in exchanges:
                self.ledger.done(exchange.fail(failure.what))
            keep.drop()
            return []
        for exchange in exchanges:
            exchange.sent = True  # on the wire: the proxy reads it unless the connection breaks
        for position, (exchange, target) in enumerate(zip(exchanges, targets)):
            clean = False
            try:
                connection.expect("GET", target)
                answer = await connection.head()
                await self.read_body(connection, exchange, answer)
                clean = exchange.result != "violation"
            except Failure as failure:
                exchange.fail(failure.what)
            if clean and not connection.next_cycle():
                self.ledger.done(exchange)
                keep.drop()
                rest = batch[position + 1:]  # the server said it would close: never answered, so sent again
                for unanswered in exchanges[position + 1:]:
                    unanswered.sent = False
                return rest
            self.ledger.done(exchange)
            if not clean:
                keep.drop()
                for rest in exchanges[position + 1:]:
                    rest.sent = False  # the connection broke before its turn: the server never read it
                    self.ledger.done(rest.fail("pipeline broken"))
                return []
        return []

    # --- server-sent events -----------------------------------------------------------

    async def sse(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        count, gap = rng.randint(5, self.args.max_events), rng.uniform(0.1, 0.4)
        framing = rng.choice(FRAMINGS)
        connection: HttpConnection | None = None
        exchange = Exchange("sse", request_id, framing=framing, size=count)
        try:
            connection = await self.connect(exchange, None)
            await connection.send_head("GET", f"/sse?id={request_id}&n={count}&gap={gap:.3f}&framing={framing}",
                                       [("Accept", "text/event-stream")])
            await connection.end_body()
            exchange.sent = True
            answer = await connection.head()
            if not await self.answered(connection, exchange, answer):
                return
            expected = b"".join(sse_event(request_id, index) for index in range(count)) + sse_end(count)
            received = b""
            while (piece := await connection.body_piece(answer)) is not None:
                received += piece
                exchange.received = received.count(b"\n\n")
                if not expected.startswith(received):
                    exchange.violate("corrupt", f"wrong event after {exchange.received} events")
                    return
                if self.pausing:
                    connection.close()
                    exchange.hang_up()
                    return
            if received != expected:
                exchange.violate("cut-complete", f"cut stream taken as complete: {exchange.received} of {count + 1} events")
        except Failure as failure:
            exchange.fail(failure.what)
        finally:
            if connection is not None:
                connection.close()
            self.ledger.done(exchange)
        await asyncio.sleep(rng.uniform(0.1, 1))

    # --- websockets -------------------------------------------------------------------

    async def websocket(self, rng: random.Random, request_id: str, keep: KeepAlive) -> None:
        count, every = rng.randint(10, self.args.max_messages), rng.uniform(0.05, 0.3)
        target = self.target
        scheme = "wss" if target.ssl else "ws"
        exchange = Exchange("websocket", request_id, size=count)
        try:
            sock = await tcp_connect(target.ip, target.port, target.connect_timeout)
            async with websocket_connect(
                    f"{scheme}://{target.ip}:{target.port}/ws?id={request_id}&tick=1", sock=sock,
                    ssl=target.ssl, server_hostname=target.host if target.ssl else None,
                    open_timeout=target.read_timeout, ping_interval=None,
                    close_timeout=target.read_timeout, max_size=None, compression=None) as ws:
                exchange.sent = True
                exchange.status = 101
                self.ledger.status(101)
                ssl_object = ws.transport.get_extra_info("ssl_object")
                if ssl_object is not None:
                    self.ledger.connection(serial=ssl_object.getpeercert()["serialNumber"], opened=exchange.start)
                if ws.response.headers.get("X-Soak-Id") != request_id:
                    exchange.violate("wrong-answer", f"session for {ws.response.headers.get('X-Soak-Id')!r}")
                    return
                await self.converse(ws, exchange, rng, count, every)
        except InvalidStatus as exc:
            exchange.sent = True
            exchange.status = exc.response.status_code
            self.ledger.status(exc.response.status_code)
            exchange.fail(f"status {exc.response.status_code}")
        except Failure as failure:
            exchange.fail(failure.what)
        except TimeoutError:
            exchange.fail("timeout")
        except (OSError, WebSocketException) as exc:
            exchange.fail(f"websocket: {type(exc).__name__}")
        finally:
            self.ledger.done(exchange)
        await asyncio.sleep(rng.uniform(0.1, 1))

    async def converse(self, ws: Any, exchange: Exchange, rng: random.Random, count: int, every: float) -> None:
        """Sends `count` messages `every` s; every echo must come back whole and in order, and
        the upstream's ticks must count up without a gap."""
        pending: collections.deque[bytes] = collections.deque()
        done_sending = asyncio.Event()

        async def send() -> None:
            for sequence in range(count):
                if self.pausing:
                    break
                payload = bodies.expected(bodies.seed_of(f"{exchange.id}:{sequence}"), 0, rng.randint(1, 32 * 1024))
                pending.append(payload)
                await ws.send(payload)
                await asyncio.sleep(every)
            done_sending.set()

        sender = asyncio.ensure_future(send())
        tick = 0
        try:
            while not (done_sending.is_set() and not pending):
                message = await asyncio.wait_for(ws.recv(), self.target.read_timeout)
                if isinstance(message, str):
                    if message != f"tick:{tick}:{tick_tag(exchange.id, tick)}":
                        exchange.violate("lost", f"tick {message[:40]!r} where tick {tick} was due")
                        return
                    tick += 1
                elif not pending or message != pending.popleft():
                    exchange.violate("lost", f"echo {exchange.received} is not the message sent")
                    return
                else:
                    exchange.received += 1
            await ws.close()
            if ws.close_code != 1000:
                exchange.fail(f"closed with {ws.close_code}")
        finally:
            sender.cancel()


class KeepAlive:
    """The connection a loop keeps between its exchanges."""

    def __init__(self, clients: Clients):
        self.clients = clients
        self.current: HttpConnection | None = None

    async def connection(self) -> HttpConnection:
        if self.current is None or not self.current.open_for_more:
            self.drop()
            self.current = await HttpConnection(self.clients.target).open()
        return self.current

    def drop(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", required=True, help="the name the certificate is for (SNI)")
    parser.add_argument("--ca", help="the test CA's certificate: use TLS, verified against it")
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-transfer", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-events", type=int, default=30)
    parser.add_argument("--max-messages", type=int, default=60)
    parser.add_argument("--connect-timeout", type=float, default=10)
    parser.add_argument("--read-timeout", type=float, default=30)
    asyncio.run(Clients(parser.parse_args()).run())


if __name__ == "__main__":
    main()
