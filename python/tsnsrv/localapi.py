"""A client for tailscaled's LocalAPI (HTTP/1.1 over its unix socket).

Only the endpoints tsnsrv needs. tailscaled refuses requests that carry a Referer or
Origin, and wants `Host: local-tailscaled.sock`; a client with the daemon's uid (or
root) may write.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

HOST = "local-tailscaled.sock"

# ipn.NotifyWatchOpt bits (ipn/backend.go)
NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_INITIAL_PREFS = 1 << 2
NOTIFY_INITIAL_NETMAP = 1 << 3
NOTIFY_INITIAL_HEALTH = 1 << 7
NOTIFY_RATE_LIMIT = 1 << 8

# A restarted tailscaled leaves no pooled connection behind to fail on: one per request.
_CONNECTOR_OPTIONS = {"force_close": True, "limit": 0}


class LocalAPIError(Exception):
    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"LocalAPI {method} {path}: HTTP {status}: {body.strip()[:300]}")
        self.status = status
        self.body = body


class TailscaledUnreachable(Exception):
    """The LocalAPI socket does not answer (tailscaled not started yet, or gone)."""


class LocalAPI:
    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket_path), **_CONNECTOR_OPTIONS),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                skip_auto_headers=("User-Agent", "Accept-Encoding"), cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _unreachable(self, exc: BaseException) -> TailscaledUnreachable:
        return TailscaledUnreachable(f"tailscaled LocalAPI at {self.socket_path}: {exc}")

    async def _request(self, method: str, path: str, *, expect: tuple[int, ...] = (200,), timeout: float | None = 30,
                       params: dict[str, str] | None = None, json_body: Any = None,
                       headers: dict[str, str] | None = None) -> tuple[int, bytes, aiohttp.ClientResponse]:
        try:
            async with asyncio.timeout(timeout):
                async with self.session.request(method, f"http://{HOST}/localapi/v0/{path}", params=params,
                                                data=None if json_body is None else json.dumps(json_body),
                                                headers=headers) as response:
                    body = await response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unreachable(exc) from exc
        if response.status not in expect:
            raise LocalAPIError(method, path, response.status, body.decode(errors="replace"))
        return response.status, body, response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        _, body, _ = await self._request(method, path, **kwargs)
        return json.loads(body) if body else None

    async def status(self, peers: bool = True) -> dict[str, Any]:
        return await self._json("GET", "status", params=None if peers else {"peers": "false"})

    async def whois(self, addr: str, timeout: float | None) -> dict[str, Any] | None:
        """Who is behind a tailnet address; None if tailscaled does not know it."""
        status, body, _ = await self._request("GET", "whois", params={"addr": addr}, expect=(200, 404),
                                              timeout=timeout)
        return json.loads(body) if status == 200 else None

    async def prefs(self) -> dict[str, Any]:
        return await self._json("GET", "prefs")

    async def edit_prefs(self, masked: dict[str, Any]) -> dict[str, Any]:
        return await self._json("PATCH", "prefs", json_body=masked)

    async def start(self, prefs: dict[str, Any], auth_key: str | None) -> None:
        options: dict[str, Any] = {"UpdatePrefs": prefs}
        if auth_key:
            options["AuthKey"] = auth_key
        await self._request("POST", "start", json_body=options, expect=(200, 204))

    async def login_interactive(self) -> None:
        await self._request("POST", "login-interactive", expect=(200, 204))

    async def logout(self) -> None:
        await self._request("POST", "logout", expect=(200, 204), timeout=10)

    async def serve_config(self) -> tuple[dict[str, Any], str]:
        _, body, response = await self._request("GET", "serve-config")
        return (json.loads(body) or {}), response.headers.get("ETag", "")

    async def set_serve_config(self, config: dict[str, Any], etag: str | None = None) -> None:
        headers = {"If-Match": etag} if etag else None
        await self._request("POST", "serve-config", json_body=config, headers=headers, expect=(200, 204))

    async def cert_pair(self, domain: str, min_validity_seconds: int) -> tuple[bytes, bytes]:
        """The node's TLS key and certificate chain for `domain`, as PEM."""
        _, body, _ = await self._request("GET", f"cert/{domain}",
                                         params={"type": "pair", "min_validity": f"{min_validity_seconds}s"},
                                         timeout=300)
        marker = body.find(b"-----BEGIN CERTIFICATE-----")
        if marker < 0:
            raise LocalAPIError("GET", f"cert/{domain}", 200, "response holds no certificate")
        return body[:marker], body[marker:]

    async def watch_ipn_bus(self, mask: int) -> AsyncIterator[dict[str, Any]]:
        """Notifications from tailscaled, one JSON object per line, until the stream ends."""
        try:
            async with self.session.get(f"http://{HOST}/localapi/v0/watch-ipn-bus",
                                        params={"mask": str(mask)}) as response:
                if response.status != 200:
                    raise LocalAPIError("GET", "watch-ipn-bus", response.status,
                                        (await response.read()).decode(errors="replace"))
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            yield json.loads(line)
        except (aiohttp.ClientError, OSError) as exc:
            raise TailscaledUnreachable(f"tailscaled IPN bus at {self.socket_path}: {exc}") from exc


def daemon_credentials(socket_path: Path) -> tuple[int, int]:
    """(pid, uid) of the process serving the LocalAPI socket, from SO_PEERCRED."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path))
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        return pid, uid
