"""The bench's websocket upstream: echoes every message; a text message "stream N" is
answered with N bytes in 1 MiB binary messages and then the text "done".

    python bench/wsecho.py PORT
"""

import asyncio
import sys

import websockets

CHUNK = bytes(range(256)) * 4096  # 1 MiB


async def session(ws) -> None:
    async for message in ws:
        if isinstance(message, str) and message.startswith("stream "):
            left = int(message.split()[1])
            while left > 0:
                await ws.send(CHUNK[:left])
                left -= len(CHUNK)
            await ws.send("done")
        else:
            await ws.send(message)


async def main(port: int) -> None:
    async with websockets.serve(session, "127.0.0.1", port, max_size=None, compression=None, ping_interval=None):
        print("listening", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
