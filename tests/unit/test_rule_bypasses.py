"""Requests shaped to slip past prefixes, rules or header stripping, sent through a real
front listener and proxy to a real upstream on a unix socket: none may get through."""

from __future__ import annotations

import pytest

from test_front import exchange, fronts, make_front, request, upstream  # noqa: F401 (fixtures)
from tsnsrv import proxyproto
from tsnsrv.access import PathPolicy
from tsnsrv.config import load
from tsnsrv.identity import WhoisCache, is_spoofable
from tsnsrv.metrics import Metrics
from tsnsrv.proxy import Proxy

ALICE = {"Node": {"ID": 7, "ComputedName": "alice-laptop"},
         "UserProfile": {"ID": 1, "LoginName": "alice@example.com", "DisplayName": "Alice"}}
TAILNET_CLIENT, FUNNEL_CLIENT = "100.64.0.9", "203.0.113.7"


async def through_front(fronts, socket_path, extra, target, source=TAILNET_CLIENT, headers=""):
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083", "upstreamUnixAddr": socket_path, **extra})

    async def whois(_address, _timeout):
        return ALICE

    metrics = Metrics()
    proxy = Proxy(cfg, WhoisCache(whois, 1.0, metrics), metrics)
    front = make_front(handler=proxy.handle)
    fronts.append(front)
    try:
        return await exchange(front.port, proxyproto.encode(source, 1, "127.0.0.2", 443) + b"|"
                              + request(target, headers))
    finally:
        await proxy.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("rules", [
    {"denyPrefixes": ["/admin"]},
    {"denyPrefixes": ["funnel:/admin"], "funnel": True},
    {"accessRules": ["deny /admin user:alice@example.com"]},
    {"accessRules": ["allow /admin user:bob@example.com"]},
])
@pytest.mark.parametrize("target", ["/admin#", "/admin#x", "/admin%23x/../"])
async def test_a_fragment_in_the_target_does_not_dodge_rules(fronts, upstream, rules, target):
    socket_path, seen = upstream
    source = FUNNEL_CLIENT if rules.get("funnel") else TAILNET_CLIENT
    response = await through_front(fronts, socket_path, rules, target, source=source)
    assert seen == [], f"upstream was asked for {[s['path_qs'] for s in seen]}; client got {response[:20]!r}"


@pytest.mark.asyncio
async def test_underscore_spellings_of_identity_headers_are_stripped(fronts, upstream):
    socket_path, seen = upstream
    await through_front(fronts, socket_path, {}, "/", source=FUNNEL_CLIENT,
                        headers="X_Tailscale_User_LoginName: alice@example.com\r\nX_Forwarded_For: 10.0.0.1\r\n")
    [got] = seen
    assert not any("_" in name for name in got["headers"]), got["headers"]


@pytest.mark.parametrize("name", ["X_Tailscale_User_LoginName", "tailscale_user_login", "X_Forwarded_Host",
                                  "x_real_ip"])
def test_underscore_spellings_count_as_spoofable(name):
    assert is_spoofable(name)


def test_a_deny_prefix_with_a_trailing_slash_covers_the_bare_directory():
    policy = PathPolicy.from_config([], ["/admin/"], True)
    assert not policy.decide("/admin", "tailnet").allowed
    assert not policy.decide("/admin/x", "tailnet").allowed
    assert policy.decide("/administrator", "tailnet").allowed
