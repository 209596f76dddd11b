"""The upstream web application of the tailnet VM test (and of the systemd tier, which runs
the same scenarios): answers every request with what it received, as JSON; `/bytes/N`
streams N bytes; `/ws` echoes websocket messages. With --udp it also echoes UDP datagrams
on the same port, prefixed "private " (a host-loopback-only service to keep private).

    upstream.py HOST PORT [--udp]
"""

import asyncio
import sys

from aiohttp import WSMsgType, web

CHUNK = bytes(range(256)) * 4096  # 1 MiB


async def echo(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path_qs, "headers": dict(request.headers)})


async def some_bytes(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    while size > 0:
        await response.write(CHUNK[:size])
        size -= len(CHUNK)
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, address):
        self.transport.sendto(b"private " + data, address)


async def main(host: str, port: int, udp: bool) -> None:
    app = web.Application()
    app.router.add_get("/bytes/{size:[0-9]+}", some_bytes)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    if udp:
        await asyncio.get_running_loop().create_datagram_endpoint(UdpEcho, local_addr=(host, port))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), "--udp" in sys.argv[3:]))
