"""aiohttp's URL dispatcher, as a Python upstream routes."""

import sys

from aiohttp import web


def area_handler(area: str):
    async def handle(_request: web.Request) -> web.Response:
        return web.Response(text=f"route={area}\n")
    return handle


async def not_found(request: web.Request) -> web.Response:
    return web.Response(status=404, text=f"route=none saw={request.path}\n")


app = web.Application()
for area in ("admin", "secret", "ops", "public"):
    app.router.add_route("*", f"/api/{area}", area_handler(area))
    app.router.add_route("*", f"/api/{area}/{{tail:.*}}", area_handler(area))
app.router.add_route("*", "/{tail:.*}", not_found)
print("listening", flush=True)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
