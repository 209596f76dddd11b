"""A FAKE tailscaled LocalAPI, for what a real one never does: hand out a certificate
whose key does not fit it.

It answers the few LocalAPI calls tsnsrv makes (status, prefs, the IPN bus, the Serve
config, cert pairs, whois) on a unix socket, keeps the Serve config tsnsrv set, and lets the
test play tailscaled's other half: since it runs in the test process, the test's own
connections to the front listener come from "tailscaled" (SO_PEERCRED of this socket
names the test process). It sits beside the real-tailnet suites, never instead of them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from tsnsrv import proxyproto


class FakeLocalAPI:
    def __init__(self, socket_path: Path, name: str, cert_pem: bytes, key_pem: bytes):
        self.socket_path = socket_path
        self.dns_name = f"{name}.fake-tailnet.ts.net"
        self.address = "100.100.7.7"
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.prefs: dict[str, Any] = {"ControlURL": "https://controlplane.tailscale.com", "Hostname": name,
                                      "WantRunning": True}
        self.serve_config: dict[str, Any] = {}
        self.identities: dict[str, dict[str, Any]] = {}  # tailnet address -> whois answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()

    # --- the LocalAPI --------------------------------------------------------------

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "BackendState": "Running", "HaveNodeKey": True, "TailscaleIPs": [self.address],
            "CertDomains": [self.dns_name],
            "Self": {"ID": "n-fake", "DNSName": self.dns_name + ".", "TailscaleIPs": [self.address],
                     "CapMap": {}, "Online": True},
        })

    async def _prefs(self, request: web.Request) -> web.Response:
        if request.method == "PATCH":
            edit = await request.json()
            self.prefs.update({k: v for k, v in edit.items() if not k.endswith("Set") and edit.get(f"{k}Set")})
        return web.json_response(self.prefs)

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(json.dumps({"State": 6, "Health": {"Warnings": {}}}).encode() + b"\n")
        while True:  # a live bus: nothing more to say until tsnsrv hangs up
            await asyncio.sleep(3600)

    async def _serve_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self.serve_config = await request.json()
            return web.Response(status=200)
        return web.json_response(self.serve_config, headers={"Etag": "fake"})

    async def _cert(self, request: web.Request) -> web.Response:
        return web.Response(body=self.key_pem + self.cert_pem, content_type="application/x-pem-file")

    async def _whois(self, request: web.Request) -> web.Response:
        ip = request.query["addr"].rsplit(":", 1)[0].strip("[]")
        if ip not in self.identities:
            return web.Response(status=404, text="no match for IP:port")
        return web.json_response(self.identities[ip])

    # --- the test's side -----------------------------------------------------------

    def front(self) -> tuple[str, int]:
        """Where the Serve config forwards tailnet port 443 (tsnsrv's front listener)."""
        host, port = self.serve_config["TCP"]["443"]["TCPForward"].rsplit(":", 1)
        return host, int(port)

    def request(self, source_ip: str, path: str, headers: dict[str, str] | None = None,
                ca_file: Path | None = None) -> tuple[int, dict[str, str], bytes, dict[str, Any]]:
        """One HTTPS request to the service as tailscaled would forward it from `source_ip`:
        PROXY v2 header, TLS, HTTP/1.1. Returns status, headers, body and the peer certificate."""
        host, port = self.front()
        with socket.create_connection((host, port), timeout=10) as raw:
            raw.sendall(proxyproto.encode(source_ip, 40000, self.address, 443))
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            with context.wrap_socket(raw, server_hostname=self.dns_name) as tls:
                lines = [f"GET {path} HTTP/1.1", f"Host: {self.dns_name}", "Connection: close",
                         *(f"{k}: {v}" for k, v in (headers or {}).items())]
                tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                peer_cert = tls.getpeercert()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        response_headers = dict(line.split(": ", 1) for line in header_lines)
        return int(status_line.split()[1]), response_headers, body, peer_cert

    # --- running it ----------------------------------------------------------------

    def start(self) -> FakeLocalAPI:
        threading.Thread(target=self._run, daemon=True).start()
        if not self._started.wait(10):
            raise AssertionError("the fake LocalAPI did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._started.set()
        self._loop.run_forever()

    async def _serve(self) -> None:
        app = web.Application()
        base = "/localapi/v0/"
        app.router.add_get(base + "status", self._status)
        app.router.add_route("*", base + "prefs", self._prefs)
        app.router.add_get(base + "watch-ipn-bus", self._watch)
        app.router.add_route("*", base + "serve-config", self._serve_config)
        app.router.add_get(base + "cert/{domain}", self._cert)
        app.router.add_get(base + "whois", self._whois)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
