"""An upstream web service the tests control, and that records what reached it.

It runs in a thread of the test process (its own asyncio loop) on 127.0.0.1 and,
optionally, a unix socket. Endpoints:

  /anything        echo: JSON with method, path, query, headers, body length and sha256
  /bytes/N         N bytes of a fixed pattern (Content-Length set; ?chunked=1 for none)
  /upload          consumes the body as it streams; JSON with its length and sha256
  /sse?n=&gap=     n server-sent events, `gap` seconds apart
  /slow?seconds=   answers after a delay
  /status/CODE     an empty response with that status
  /ws              websocket echo; "close:CODE" closes with that code; a client's close is
                   answered with its code and reason; pings are answered
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

PATTERN = bytes(range(256)) * 4096  # 1 MiB


def pattern_bytes(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(size, len(PATTERN))
    for _ in range(full):
        digest.update(PATTERN)
    digest.update(PATTERN[:rest])
    return digest.hexdigest()


class Upstream:
    def __init__(self, unix_socket: Path | None = None, ssl_context: ssl.SSLContext | None = None, port: int = 0):
        self.unix_socket = unix_socket
        self.ssl_context = ssl_context
        self.requests: list[dict[str, Any]] = []
        self.websocket_closes: list[tuple[int, str]] = []  # (code, reason) of closes by clients
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        self._thread = threading.Thread(target=self._run, name="test-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the test upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def last_request(self) -> dict[str, Any]:
        assert self.requests, "no request reached the upstream"
        return self.requests[-1]

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/bytes/{size}", self._bytes)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_get("/sse", self._sse)
        app.router.add_get("/slow", self._slow)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/ws", self._websocket)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.unix_socket is not None:
            await web.UnixSite(self._runner, str(self.unix_socket)).start()

    def _record(self, request: web.Request, **extra: Any) -> dict[str, Any]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        entry = {"method": request.method, "path": request.path, "raw_path": request.raw_path,
                 "query": request.query_string, "headers": list(request.headers.items()),
                 "peer_port": peer[1] if isinstance(peer, tuple) else None,
                 "version": f"{request.version.major}.{request.version.minor}", **extra}
        self.requests.append(entry)
        return entry

    async def _echo(self, request: web.Request) -> web.Response:
        digest, length = await _consume(request)
        entry = self._record(request, body_length=length, body_sha256=digest)
        return web.json_response(entry)

    async def _upload(self, request: web.Request) -> web.Response:
        digest, length = await _consume(request)
        self._record(request, body_length=length, body_sha256=digest)
        return web.json_response({"length": length, "sha256": digest})

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        if not request.query.get("chunked"):
            response.content_length = size
        await response.prepare(request)
        sent = size if request.method == "HEAD" else 0
        while sent < size:
            block = PATTERN[:min(len(PATTERN), size - sent)]
            await response.write(block)
            sent += len(block)
        await response.write_eof()
        return response

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        count, gap = int(request.query.get("n", "3")), float(request.query.get("gap", "0.5"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for index in range(count):
            await response.write(f"id: {index}\ndata: event {index}\n\n".encode())
            await asyncio.sleep(gap)
        await response.write_eof()
        return response

    async def _slow(self, request: web.Request) -> web.Response:
        self._record(request)
        await asyncio.sleep(float(request.query.get("seconds", "2")))
        return web.Response(text="slow response done\n")

    async def _status(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(status=int(request.match_info["code"]))

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse(protocols=("echo", "chat"), autoclose=False, compress=True)
        await ws.prepare(request)
        while True:
            message = await ws.receive()
            if message.type == web.WSMsgType.TEXT:
                if message.data.startswith("close:"):
                    await ws.close(code=int(message.data.split(":")[1]), message=b"bye")
                    break
                await ws.send_str(message.data)
            elif message.type == web.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
            elif message.type == web.WSMsgType.CLOSE:
                # Closed by the client: answer with its own code and reason, as RFC 6455 suggests.
                self.websocket_closes.append((message.data, message.extra))
                await ws.close(code=message.data, message=(message.extra or "").encode())
                break
            else:
                break
        return ws


async def _consume(request: web.Request) -> tuple[str, int]:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return digest.hexdigest(), length


def echo(response_body: bytes) -> dict[str, Any]:
    """The echo endpoint's JSON, with headers as a case-insensitive lookup."""
    entry = json.loads(response_body)
    entry["header"] = {name.lower(): value for name, value in entry["headers"]}
    return entry
