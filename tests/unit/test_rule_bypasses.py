"""Requests shaped to slip past prefixes, rules or header stripping, sent through a real
front listener and proxy to a real upstream on a unix socket: none may get through."""

from __future__ import annotations

import pytest

from harness.inprocess import exchange, make_front, request
from tsnsrv import proxyproto
from tsnsrv.access import AccessPolicy, Identity, PathPolicy, has_control_characters, routing_views
from tsnsrv.config import AccessRule, load
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


# --- every reading of a path that some upstream routes by ---------------------------

@pytest.mark.parametrize(("raw", "reading"), [
    ("/api\\admin", "/api/admin"),             # Node's URL parser, browsers
    ("/api/%5Cadmin", "/api/admin"),           # a decoded backslash
    ("/api/admin;x", "/api/admin"),            # servlet path parameters
    ("/api;x/admin", "/api/admin"),
    ("/api/x/..;/admin", "/api/admin"),        # Tomcat drops ";" and then resolves ".."
    ("/api/public\\..\\admin", "/api/admin"),
    ("/api/%2561dmin", "/api/admin"),          # decoded twice
    ("/api/admin.json", "/api/admin"),         # format suffixes (Django REST framework, Rails)
    ("/api/admin.json/", "/api/admin"),
    ("/api/admin%2ejson", "/api/admin"),
])
def test_routing_views_include_what_upstreams_route_to(raw, reading):
    assert reading in routing_views(raw)


def test_an_ordinary_path_has_one_reading():
    assert routing_views("/api/public/books") == {"/api/public/books"}
    assert routing_views("/.well-known/") == {"/.well-known/"}  # a dot file has no format suffix
    assert routing_views("/v1./") == {"/v1./"}  # nor a name that ends in a dot


def test_only_the_last_suffix_of_the_last_segment_is_a_format():
    assert routing_views("/v1.2/app.tar.gz") == {"/v1.2/app.tar.gz", "/v1.2/app.tar"}


@pytest.mark.parametrize("raw", ["/api\\admin", "/API/admin", "/api/Admin/x", "/api/admin;jsessionid=1",
                                 "/api/x/..;/admin", "/api/%2561dmin", "/api/public\\..\\admin",
                                 "/api/admin.json", "/API/Admin.json/", "/api/admin.api"])
def test_a_deny_prefix_holds_for_every_spelling(raw):
    assert not PathPolicy.from_config([], ["/api/admin"], True).decide(raw, "tailnet").allowed


@pytest.mark.parametrize("raw", ["/api/admin;x", "/API/ADMIN", "/api\\admin", "/api/public/..;/admin",
                                 "/api/admin.json"])
def test_identity_rules_hold_for_every_spelling(raw):
    rules = AccessPolicy.from_rules([AccessRule.parse("deny /api/admin user:alice"),
                                     AccessRule.parse("allow /api/ops tag:ci")])
    alice = Identity(login_name="alice", node_name="laptop")
    assert not rules.decide(raw, "tailnet", alice).allowed
    assert not rules.decide(raw.replace("admin", "ops").replace("ADMIN", "OPS"), "tailnet", alice).allowed


def test_an_allow_list_must_hold_for_every_reading():
    policy = PathPolicy.from_config(["/public"], [], True)
    assert policy.decide("/public/file;v=2", "tailnet").allowed
    assert not policy.decide("/public/..;/admin", "tailnet").allowed
    assert not policy.decide("/public\\..\\admin", "tailnet").allowed
    assert policy.decide("/public/app.min.js", "tailnet").allowed
    assert not policy.decide("/public.json", "tailnet").allowed
    versioned = PathPolicy.from_config(["/v1.0"], [], True)  # a suffix reading never leaves the directory
    assert versioned.decide("/v1.0", "tailnet").allowed and versioned.decide("/v1.0/", "tailnet").allowed


def test_control_characters_are_spotted():
    assert has_control_characters("/api/admin\x00.png") and has_control_characters("/a\nb")
    assert not has_control_characters("/api/caf\u00e9")
