"""The fast unit tier: pure pieces of tsnsrv, no processes, no network, no root.

Hypothesis runs a modest number of examples per property so the whole tier stays
within a few seconds; set HYPOTHESIS_PROFILE=thorough for a deeper search.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import web
from hypothesis import HealthCheck, settings

from harness.inprocess import Front

settings.register_profile("unit", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unit"))


@pytest_asyncio.fixture
async def fronts() -> AsyncIterator[list[Front]]:
    started: list[Front] = []
    yield started
    for front in started:
        await front.listener.stop_accepting()


@pytest_asyncio.fixture
async def upstream(tmp_path) -> AsyncIterator[tuple[str, list[dict]]]:
    """A real upstream on a unix socket that records what reaches it: (socket path, requests)."""
    seen: list[dict] = []

    async def record(request: web.Request) -> web.Response:
        seen.append({"path_qs": request.raw_path, "headers": dict(request.headers)})
        return web.Response(text="hello from upstream", headers={"X-Upstream": "1", "Connection": "close"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    path = str(tmp_path / "upstream.sock")
    await web.UnixSite(runner, path).start()
    yield path, seen
    await runner.cleanup()
