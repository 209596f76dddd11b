"""Deny prefixes and access rules hold for every spelling a real upstream routes to the
denied area: Node (Express, and its URL parser), Go net/http, aiohttp, Django REST
framework (format suffixes) and Tomcat each decide for themselves, as real upstreams
behind tsnsrv, which area a request reached.

Each stack is first asked directly (from the host) so the test shows, per stack, the
spellings its router maps onto a protected area; then the same bytes go through tsnsrv
from alice's laptop, and none may reach a protected area.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.rawhttp import raw_get
from harness.routing_stacks import STACKS, RoutingUpstream

PROTECTED = ("admin", "secret", "ops")  # alice may reach none of them, by three kinds of rule
RULES = ("--deny-prefix", "/api/admin",
         "--access", "deny /api/secret user:alice",
         "--access", "allow /api/ops tag:ci")


def spellings(area: str) -> list[str]:
    upper = area.upper()
    return [
        f"/api/{area}", f"/api/{area}/", f"/api/{area}/x",
        f"/API/{area}", f"/api/{upper}", f"/Api/{area.capitalize()}/x",         # case-insensitive routers
        f"/api\\{area}", f"/api/public\\..\\{area}", f"/api/public/..\\{area}",  # "\" read as "/"
        f"/api%5c{area}", f"/api/public/..%5c{area}",
        f"/api/{area};x", f"/api;x/{area}", f"/api/{area};jsessionid=1/x",       # servlet path parameters
        f"/api/x/..;/{area}", f"/api/public/..;/{area}",
        f"/api/%2e%2e/api/{area}", f"/api/public/%2e%2e/{area}", f"/api/public/..%2f{area}",
        f"/api%2f{area}", f"/api/%{ord(area[0]):02x}{area[1:]}", f"/api/%25{ord(area[0]):02x}{area[1:]}",
        f"/api//{area}", f"/api/./{area}", f"/api/{area}%2f", f"/api/{area}#x", f"/api/{area}%00",
        f"/api/{area}.json", f"/api/{area}.json/", f"/API/{upper}.api", f"/api/{area}%2ejson",  # format suffixes
    ]


PROTECTED_ROUTES = {f"route={area}" for area in PROTECTED}
ALL_SPELLINGS = [spelling for area in PROTECTED for spelling in spellings(area)]
# What each stack's router does differently from Go's, seen directly (asserted below).
QUIRK = {"express": "/API/admin", "node-url": "/api\\admin", "tomcat": "/api/admin;x",
         "go": "/api/%61dmin", "python": "/api/%61dmin", "drf": "/api/admin.json"}


@pytest.fixture(scope="module", params=STACKS)
def stack(request, tmp_path_factory, module_tsnsrv):
    upstream = RoutingUpstream(request.param, tmp_path_factory.mktemp(f"routing-{request.param}")).start()
    service = module_tsnsrv(f"rules-{request.param}", upstream.url, *RULES)
    yield upstream, service
    service.stop()
    upstream.stop()


def host_run(argv: list[str], input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=120, input=input)


def test_no_spelling_reaches_a_protected_area_through_tsnsrv(stack, laptop):
    upstream, service = stack
    direct = raw_get(host_run, sys.executable, "127.0.0.1", upstream.port, ALL_SPELLINGS)
    reached_directly = {spelling: line for spelling, (_status, line) in zip(ALL_SPELLINGS, direct)
                        if line in PROTECTED_ROUTES}
    assert QUIRK[upstream.stack] in reached_directly, \
        f"{upstream.stack} should route {QUIRK[upstream.stack]!r} to a protected area; it reached {reached_directly}"

    through = raw_get(laptop.run, sys.executable, service.ip, 80, ALL_SPELLINGS)

    leaked = {spelling: (status, line) for spelling, (status, line) in zip(ALL_SPELLINGS, through)
              if line in PROTECTED_ROUTES}
    assert leaked == {}, f"reached through tsnsrv on {upstream.stack}: {leaked}"
    # Refused by tsnsrv (400/403/404, or a 308 to the clean path), not by luck of the upstream.
    assert all(status in (308, 400, 403, 404) for status, _line in through), list(zip(ALL_SPELLINGS, through))


def test_ordinary_spellings_of_allowed_areas_still_work(stack, laptop):
    upstream, service = stack
    targets = ["/api/public", "/api/public/", "/api/public/books?page=2"]
    if upstream.stack == "tomcat":
        targets.append("/api/public;jsessionid=0123ABC")  # URL-rewritten sessions of servlet apps
    if upstream.stack == "express":
        targets.append("/api/Public")
    if upstream.stack == "drf":
        targets.append("/api/public.json")
    through = raw_get(laptop.run, sys.executable, service.ip, 80, targets)
    assert through == [(200, "route=public")] * len(targets), list(zip(targets, through))
