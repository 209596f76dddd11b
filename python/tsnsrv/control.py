"""What the service reports about itself: /health and /metrics on a local unix socket.

`tsnsrv status` reads these sockets; systemd readiness follows the same `ready` flag.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs

from . import __version__
from .http1 import Exchange, ServerConnection
from .metrics import Metrics

log = logging.getLogger(__name__)


@attrs.define
class Health:
    name: str
    mode: str  # "spawn" or "attach"
    upstream: str
    listen_port: int
    tls_mode: str  # "plaintext", "tailscale" or "files"
    funnel: bool
    tailscaled_socket: str = ""
    tailscaled: str = "starting"  # starting, running, restarting, unreachable, stopped
    tailscaled_pid: int | None = None
    tailscaled_restarts: int = 0
    confined: str = "unknown"
    peer_check: str = "unknown"  # how front connections are matched to tailscaled: "uid and fd" or "uid only"
    backend_state: str = "Unknown"
    dns_name: str = ""
    addresses: tuple[str, ...] = ()
    warnings: dict[str, str] = attrs.field(factory=dict)
    serve_config: bool = False
    front: str = ""
    accepting: bool = False
    certificate_not_after: dt.datetime | None = None
    certificate_source: str = ""
    stopping: bool = False
    started: float = attrs.field(factory=time.time)

    @property
    def ready(self) -> bool:
        return (not self.stopping and self.tailscaled == "running" and self.backend_state == "Running"
                and self.serve_config and self.accepting
                and (self.tls_mode == "plaintext" or self.certificate_not_after is not None))

    @property
    def url(self) -> str:
        if not self.dns_name:
            return ""
        scheme = "http" if self.tls_mode == "plaintext" else "https"
        default = 80 if scheme == "http" else 443
        port = "" if self.listen_port == default else f":{self.listen_port}"
        return f"{scheme}://{self.dns_name}{port}/"

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        if self.stopping:
            return "stopping"
        if self.ready:
            return f"serving {self.url} -> {self.upstream}"
        return f"not ready: tailscaled {self.tailscaled}, node {self.backend_state}"

    def as_json(self) -> dict[str, Any]:
        expiry = self.certificate_not_after
        return {
            "name": self.name,
            "version": __version__,
            "ready": self.ready,
            "status": self.summary(),
            "pid": os.getpid(),
            "uptimeSeconds": round(time.time() - self.started, 1),
            "tailscaled": {"mode": self.mode, "socket": self.tailscaled_socket, "state": self.tailscaled,
                           "pid": self.tailscaled_pid,
                           "restarts": self.tailscaled_restarts, "loopbackGuard": self.confined},
            "node": {"state": self.backend_state, "dnsName": self.dns_name, "addresses": list(self.addresses),
                     "url": self.url, "warnings": self.warnings},
            "serve": {"configured": self.serve_config, "port": self.listen_port, "funnel": self.funnel,
                      "front": self.front, "accepting": self.accepting, "peerCheck": self.peer_check},
            "tls": {"mode": self.tls_mode, "source": self.certificate_source,
                    "notAfter": expiry.isoformat() if expiry else None,
                    "secondsLeft": round((expiry - dt.datetime.now(dt.timezone.utc)).total_seconds())
                    if expiry else None},
            "upstream": {"url": self.upstream},
        }


UpstreamProbe = Callable[[], Awaitable[dict[str, Any]]]


class ControlServer:
    """/health (JSON; 503 until ready; ?probe=1 also tries the upstream) and /metrics."""

    def __init__(self, health: Health, metrics: Metrics, probe_upstream: UpstreamProbe):
        self.health = health
        self.metrics = metrics
        self.probe_upstream = probe_upstream
        self._servers: list[asyncio.Server] = []

    def _answer(self, exchange: Exchange, with_health: bool) -> None:
        request = exchange.request
        path, _, query = request.target.partition("?")
        if path == "/metrics":
            exchange.respond(200, self.metrics.exposition(), content_type=b"text/plain; version=0.0.4; charset=utf-8")
        elif path == "/health" and with_health:
            asyncio.ensure_future(self._health(exchange, probe="probe=" in query))
        else:
            exchange.respond(404, b"404 Not Found\n")

    async def _health(self, exchange: Exchange, probe: bool) -> None:
        body = self.health.as_json()
        body["tasks"] = len(asyncio.all_tasks())  # for leak checks (bench/soak): back to its idle count
        if probe:
            body["upstream"].update(await self.probe_upstream())
        if not exchange.client_gone:
            exchange.respond(200 if self.health.ready else 503, json.dumps(body).encode(),
                             content_type=b"application/json")

    async def start_unix(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.is_socket():
            path.unlink()
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: ServerConnection(lambda exchange: self._answer(exchange, with_health=True)), str(path))
        os.chmod(path, 0o660)  # root and the service's own user/group may ask
        self._servers.append(server)

    async def start_tcp(self, host: str, port: int) -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: ServerConnection(lambda exchange: self._answer(exchange, with_health=False)), host or None, port)
        self._servers.append(server)
        log.info("metrics on http://%s:%d/metrics", host or "*", port)

    def tailnet_metrics(self, exchange: Exchange) -> None:
        """/metrics for a front listener on a tailnet port (--metrics-addr tailnet:PORT)."""
        self._answer(exchange, with_health=False)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        await asyncio.gather(*(server.wait_closed() for server in self._servers), return_exceptions=True)
