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
import prometheus_client

from . import __version__
from .httpserver import BaseRequest, Server, StreamResponse, WholeResponse, plain_response
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
    certificate_error: str = ""  # why the last attempt to get or renew the certificate failed
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
            "tls": {"mode": self.tls_mode, "source": self.certificate_source, "error": self.certificate_error or None,
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
        self.jwks: Callable[[], bytes] | None = None  # the assertion keys' JWKS, when assertions are on
        self._servers: list[tuple[asyncio.Server, Server]] = []

    async def _answer(self, request: BaseRequest, with_health: bool) -> StreamResponse:
        path = request.raw_path.partition("?")[0]
        if path == "/metrics":
            return WholeResponse(body=self.metrics.exposition(),
                                 headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})
        if path == "/jwks.json" and self.jwks is not None:
            return WholeResponse(body=self.jwks(), content_type="application/jwk-set+json")
        if path == "/health" and with_health:
            body = self.health.as_json()
            body["tasks"] = len(asyncio.all_tasks())  # for leak checks (bench/soak): back to its idle count
            if "probe" in request.query:
                body["upstream"].update(await self.probe_upstream())
            return WholeResponse(status=200 if self.health.ready else 503, text=json.dumps(body),
                                 content_type="application/json")
        return plain_response(404, "404 Not Found")

    async def _serve(self, with_health: bool, listen: Callable[[Server], Awaitable[asyncio.Server]]) -> None:
        handler = Server(lambda request: self._answer(request, with_health), access_log=None)
        self._servers.append((await listen(handler), handler))

    async def start_unix(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.is_socket():
            path.unlink()
        loop = asyncio.get_running_loop()
        await self._serve(True, lambda handler: loop.create_unix_server(handler, str(path)))
        os.chmod(path, 0o660)  # root and the service's own user/group may ask

    async def start_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        await self._serve(False, lambda handler: loop.create_server(handler, host or None, port))
        log.info("metrics on http://%s:%d/metrics", host or "*", port)

    async def tailnet_metrics(self, request: BaseRequest) -> StreamResponse:
        """/metrics for a front listener on a tailnet port (--metrics-addr tailnet:PORT)."""
        return await self._answer(request, with_health=False)

    async def close(self) -> None:
        for server, handler in self._servers:
            server.close()
            handler.pre_shutdown()
        await asyncio.gather(*(handler.shutdown(1.0) for _, handler in self._servers), return_exceptions=True)
        await asyncio.gather(*(server.wait_closed() for server, _ in self._servers), return_exceptions=True)
