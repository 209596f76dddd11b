"""A FAKE of the two Tailscale API endpoints that turn an OAuth client secret into an
auth key (they cannot exist offline). It hands out real headscale pre-auth keys, so the
node that uses one really joins the local tailnet with the tags that were asked for.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

TOKEN = "fake-access-token"


class FakeTailscaleAPI:
    def __init__(self, client_secret: str, mint_key: Callable[[list[str], bool], str]):
        self.client_secret = client_secret
        self.mint_key = mint_key
        self.key_requests: list[dict[str, Any]] = []
        self.token_requests = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeTailscaleAPI:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)  # type: ignore[union-attr]
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v2/oauth/token", self._token)
        app.router.add_post("/api/v2/tailnet/-/keys", self._keys)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        secret = base64.b64decode(encoded).decode().partition(":")[2] if scheme == "Basic" else ""
        if form.get("grant_type") != "client_credentials" or secret != self.client_secret:
            return web.json_response({"error": "invalid_client"}, status=401)
        return web.json_response({"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600})

    async def _keys(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"message": "unauthorized"}, status=401)
        body = await request.json()
        self.key_requests.append(body)
        create = body["capabilities"]["devices"]["create"]
        key = await asyncio.to_thread(self.mint_key, create["tags"], create["ephemeral"])
        return web.json_response({"id": "k1", "key": key})
