"""HTTPS clients that look at the certificate a service serves, run on a client device.

`peer_certificate(device, host, ip, ca_file)`: serial and validity of the certificate
one new TLS connection gets, verified against `ca_file` for `host`.

`watch_renewal(device, host, ip, ca_file, timeout)`: what a busy client sees while the
certificate is renewed: it holds a websocket open (echoing on it now and then) and makes
a new HTTPS connection every 0.2 s, until a different certificate has been served for a
while; returns every failure, the serials in the order first seen, and the echoes that
crossed the websocket before and after the change.

The device runs this file as a script (stdlib and websockets only).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tailnet import ClientDevice

REQUEST_GAP = 0.2
AFTER_CHANGE = 15  # new connections to make once the renewed certificate shows up


def peer_certificate(device: ClientDevice, host: str, ip: str, ca_file: Path, port: int = 443) -> dict[str, Any]:
    result = device.run([sys.executable, __file__, "peer", host, ip, str(port), str(ca_file)], timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"TLS connection to {host} at {ip}:{port} failed: {result.stderr.decode()[-800:]}")
    return json.loads(result.stdout)


def watch_renewal(device: ClientDevice, host: str, ip: str, ca_file: Path, timeout: float) -> dict[str, Any]:
    result = device.run([sys.executable, __file__, "watch", host, ip, str(ca_file), str(timeout)], timeout=timeout + 60)
    if result.returncode != 0:
        raise AssertionError(f"the renewal watcher failed: {result.stderr.decode()[-1500:]}")
    return json.loads(result.stdout)


def _described(cert: dict[str, Any]) -> dict[str, Any]:
    return {"serial": int(cert["serialNumber"], 16), "notBefore": ssl.cert_time_to_seconds(cert["notBefore"]),
            "notAfter": ssl.cert_time_to_seconds(cert["notAfter"])}


async def _get(host: str, ip: str, port: int, context: ssl.SSLContext, path: str) -> tuple[int, dict[str, Any]]:
    """One request on a new connection, which the client drops once it has the response.

    The client closes first, at once (no TLS close_notify exchange, after which the
    server would close first too), as many clients do. Where the node closes first, its
    netstack keeps the connection in TIME-WAIT for 60 s and drops a new SYN on the same
    addresses and ports meanwhile (gVisor hands such a SYN only to a listening
    endpoint; tailscaled accepts through a forwarder). Linux picks a new random range
    of source ports every 10 s or so, so a watcher making hundreds of connections would
    now and then reuse one and wait up to a minute for an answer -- no part of what it
    watches. Closing first leaves the TIME-WAIT here, where the kernel does not reuse it."""
    reader, writer = await asyncio.open_connection(ip, port, ssl=context, server_hostname=host)
    try:
        cert = _described(writer.get_extra_info("ssl_object").getpeercert())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.split(":", 1) for line in head[1:] if line)
        lengths = [value for name, value in fields.items() if name.strip().lower() == "content-length"]
        if not lengths:
            raise ValueError(f"a response without Content-Length: {head}")
        await reader.readexactly(int(lengths[0]))
        return int(head[0].split(" ", 2)[1]), cert
    finally:
        writer.transport.abort()


async def _peer(host: str, ip: str, port: int, ca_file: str) -> dict[str, Any]:
    status, cert = await _get(host, ip, port, ssl.create_default_context(cafile=ca_file), "/")
    return {**cert, "status": status}


async def _watch(host: str, ip: str, ca_file: str, timeout: float) -> dict[str, Any]:
    import websockets  # only the watcher needs it

    context = ssl.create_default_context(cafile=ca_file)
    serials: list[int] = []
    failures: list[str] = []
    echoes = {"before": 0, "after": 0}
    after_change = 0
    deadline = time.monotonic() + timeout
    async with websockets.connect(f"wss://{host}/ws", ssl=context, host=ip, port=443, ping_interval=None,
                                  open_timeout=30) as websocket:
        index = 0
        while time.monotonic() < deadline and after_change < AFTER_CHANGE:
            index += 1
            try:
                status, cert = await asyncio.wait_for(_get(host, ip, 443, context, f"/anything?i={index}"), 20)
                if status != 200:
                    failures.append(f"request {index}: HTTP {status}")
                if cert["serial"] not in serials:
                    serials.append(cert["serial"])
            except (OSError, EOFError, ssl.SSLError, asyncio.TimeoutError, ValueError, IndexError) as exc:
                failures.append(f"request {index}: {exc!r}")
            if len(serials) > 1:
                after_change += 1
            if index % 5 == 0 or after_change == AFTER_CHANGE:
                message = f"echo {index}"
                await websocket.send(message)
                if await asyncio.wait_for(websocket.recv(), 20) == message:
                    echoes["after" if len(serials) > 1 else "before"] += 1
                else:
                    failures.append(f"websocket echo {index} garbled")
            await asyncio.sleep(REQUEST_GAP)
        requests = index
    return {"serials": serials, "failures": failures, "requests": requests, "echoes": echoes}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "peer":
        host, ip, port, ca_file = args
        print(json.dumps(asyncio.run(_peer(host, ip, int(port), ca_file))))
    else:
        host, ip, ca_file, timeout = args
        print(json.dumps(asyncio.run(_watch(host, ip, ca_file, float(timeout)))))
