"""The request path's pure parts (tsnsrv.proxy, access.clean_path): path cleaning and the
308 redirect, upstream URL joining, what tsnsrv refuses itself (404/403/405), and the
headers the upstream receives (spoofed ones stripped, ours set).

Requests go to the real Proxy through a recording stand-in for the client connection
(harness/inprocess.py); every case here is decided before any upstream connection is
attempted (an unreachable unix socket makes sure of that).
"""

from __future__ import annotations

import asyncio

import ssl
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from harness.inprocess import recorded_exchange, upstream_headers_of
from tsnsrv.access import FUNNEL, TAILNET, Identity, clean_path
from tsnsrv.config import load
from tsnsrv.front import Peer
from tsnsrv.identity import WhoisCache, is_spoofable
from tsnsrv.metrics import Metrics
from tsnsrv.proxy import Proxy, join_url_path
from tsnsrv.upstream import upstream_ssl_context

BOB_WHOIS = {"Node": {"ID": 20, "ComputedName": "bob-phone"},
             "UserProfile": {"ID": 2, "LoginName": "bob@example.com", "DisplayName": "Bob"}}
ALICE_WHOIS = {"Node": {"ID": 10, "ComputedName": "alice-laptop"},
               "UserProfile": {"ID": 1, "LoginName": "alice@example.com", "DisplayName": "Alice"}}
TAILNET_PEER = Peer("100.64.0.5", 40000, TAILNET, tls=True)
FUNNEL_PEER = Peer("203.0.113.7", 50000, FUNNEL, tls=True)


# --- clean paths ------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "clean"), [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/a/b/", "/a/b/"),
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/a/../../b", "/b"),
    ("/..", "/"),
    ("/a/.", "/a"),
    ("/a/./", "/a/"),
    ("//a", "/a"),
    ("///a//b", "/a/b"),
    ("/a//", "/a/"),
    ("a/b", "/a/b"),
    ("", "/"),
])
def test_clean_path_like_go_servemux(path, clean):
    assert clean_path(path) == clean


path_chars = st.sampled_from(["/", ".", "..", "a", "b", "%", "_"])


@given(st.lists(path_chars, max_size=12).map(lambda parts: "/" + "".join(parts)))
def test_clean_path_is_idempotent_and_has_no_dot_segments(path):
    cleaned = clean_path(path)
    assert clean_path(cleaned) == cleaned
    assert cleaned.startswith("/") and "//" not in cleaned
    assert "/./" not in cleaned + "/" and "/../" not in cleaned + "/"


# --- upstream URL joining ------------------------------------------------------------


@pytest.mark.parametrize(("base", "path", "joined"), [
    ("", "/x", "/x"),
    ("", "", "/"),
    ("/app", "", "/app"),
    ("/app", "/x", "/app/x"),
    ("/app/", "/x", "/app/x"),
    ("/app/", "x", "/app/x"),
    ("/app", "x", "/app/x"),
    ("/", "/", "/"),
    ("/app/", "/", "/app/"),
])
def test_join_url_path_like_go_httputil(base, path, joined):
    assert join_url_path(base, path) == joined


# --- what tsnsrv refuses itself --------------------------------------------------------


def make_proxy(tmp_path: Path, whois_answers: dict[str, dict] | None = None, **config) -> Proxy:
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083/app", "upstreamUnixAddr":
                str(tmp_path / "no-upstream.sock"), "upstreamRetryWindow": 0, **config})

    async def whois(address: str, _timeout: float | None) -> dict | None:
        return (whois_answers or {}).get(address)

    metrics = Metrics()
    return Proxy(cfg, WhoisCache(whois, 1.0, metrics) if whois_answers is not None else None, metrics)


async def handle(proxy: Proxy, target: str, peer: Peer = TAILNET_PEER, method: str = "GET", headers=None):
    try:
        return await recorded_exchange(proxy.handle, method, target, headers or {"Host": "books.tail1234.ts.net"},
                                       peer)
    finally:
        await proxy.close()


def denied(proxy: Proxy, reason: str) -> float:
    return proxy.metrics.registry.get_sample_value("tsnsrv_denied_requests_total", {"reason": reason}) or 0.0


@pytest.mark.asyncio
@pytest.mark.parametrize(("target", "location"), [
    ("/a/../admin", "/admin"),
    ("/a/./b?x=1&y=2", "/a/b?x=1&y=2"),
    ("//admin", "/admin"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/a//b/", "/a/b/"),
    ("/caf%C3%A9/./x", "/caf%C3%A9/x"),
    ("/sp%20ace/../x%20y", "/x%20y"),
])
async def test_unclean_paths_are_redirected(tmp_path, target, location):
    response = await handle(make_proxy(tmp_path), target)
    assert response.status == 308
    assert response.headers["Location"] == location


@pytest.mark.asyncio
async def test_deny_prefix_is_404(tmp_path):
    proxy = make_proxy(tmp_path, denyPrefixes=["/admin"])
    response = await handle(proxy, "/%61dmin/users")
    assert response.status == 404 and response.text == "404 Not Found\n"
    assert denied(proxy, "prefix") == 1


@pytest.mark.asyncio
async def test_path_outside_allowed_prefixes_is_404_for_that_client_kind(tmp_path):
    proxy = make_proxy(tmp_path, prefixes=["funnel:/public", "tailnet:/"])
    assert (await handle(proxy, "/private", peer=FUNNEL_PEER)).status == 404
    assert denied(proxy, "prefix") == 1


@pytest.mark.asyncio
async def test_connect_is_405(tmp_path):
    proxy = make_proxy(tmp_path)
    response = await handle(proxy, "books.tail1234.ts.net:443", method="CONNECT")
    assert response.status == 405 and response.text == "405 Method Not Allowed\n"
    assert denied(proxy, "method") == 1


@pytest.mark.asyncio
async def test_access_rule_is_403_naming_the_client(tmp_path):
    proxy = make_proxy(tmp_path, {"100.64.0.5": BOB_WHOIS}, accessRules=["allow /admin user:alice@example.com"])
    response = await handle(proxy, "/admin/x")
    assert response.status == 403
    assert response.text == "403 Forbidden: bob@example.com on bob-phone may not use books here.\n"
    assert denied(proxy, "access_rule") == 1


@pytest.mark.asyncio
async def test_access_rule_page_for_funnel_and_unknown_clients(tmp_path):
    proxy = make_proxy(tmp_path, {}, accessRules=["allow / user:alice@example.com"])
    funnel = await handle(proxy, "/", peer=FUNNEL_PEER)
    assert funnel.text == "403 Forbidden: A public (Funnel) client may not use books here.\n"
    unknown = await handle(proxy, "/")
    assert unknown.text == "403 Forbidden: Client 100.64.0.5 may not use books here.\n"


@pytest.mark.asyncio
async def test_access_rules_see_the_decoded_path(tmp_path):
    proxy = make_proxy(tmp_path, {"100.64.0.5": BOB_WHOIS}, accessRules=["deny /admin"])
    assert (await handle(proxy, "/%61dmin")).status == 403


@pytest.mark.asyncio
async def test_absolute_form_targets_do_not_bypass_deny_prefixes_and_rules(tmp_path):
    proxy = make_proxy(tmp_path, {"100.64.0.5": BOB_WHOIS}, denyPrefixes=["/admin"],
                       accessRules=["allow / user:alice@example.com"])
    response = await handle(proxy, "http://books.tail1234.ts.net/admin/x")
    assert response.status in (400, 403, 404)


@pytest.mark.asyncio
async def test_deny_rules_by_identity_fail_closed_when_whois_fails(tmp_path):
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083/", "upstreamUnixAddr": str(tmp_path / "none.sock"),
                "accessRules": ["deny /admin user:bob@example.com"]})

    async def failing_whois(_address: str, _timeout: float | None) -> dict | None:
        raise ConnectionError("tailscaled is restarting")

    metrics = Metrics()
    proxy = Proxy(cfg, WhoisCache(failing_whois, 1.0, metrics), metrics)
    response = await handle(proxy, "/admin/x")
    assert response.status in (403, 503)


@pytest.mark.asyncio
async def test_an_allowed_request_goes_upstream(tmp_path):
    # The only upstream is a unix socket that does not exist: reaching it is a 502 naming the service.
    proxy = make_proxy(tmp_path, {"100.64.0.5": ALICE_WHOIS}, accessRules=["allow / user:alice@example.com"])
    response = await handle(proxy, "/x")
    assert response.status == 502
    assert response.text.startswith("502 Bad Gateway: the upstream of books could not be reached")
    assert proxy.metrics.registry.get_sample_value("tsnsrv_upstream_errors_total", {"kind": "connect"}) == 1


@pytest.mark.asyncio
async def test_a_restarting_upstream_is_waited_for_and_the_request_goes_through(tmp_path):
    socket_path = tmp_path / "restarting.sock"
    proxy = make_proxy(tmp_path, upstreamUnixAddr=str(socket_path), upstreamRetryWindow=10)

    async def hello(_request: web.BaseRequest) -> web.Response:
        return web.Response(text="back")

    async def come_back_later() -> web.AppRunner:
        await asyncio.sleep(0.5)  # the upstream's restart: its socket is missing this long
        app = web.Application()
        app.router.add_get("/{tail:.*}", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(socket_path)).start()
        return runner

    restart = asyncio.ensure_future(come_back_later())
    response = await handle(proxy, "/x")
    await (await restart).cleanup()
    assert response.status == 200 and response.text == "back"
    assert proxy.metrics.registry.get_sample_value("tsnsrv_proxy_errors") == 0


@pytest.mark.asyncio
async def test_a_refused_upstream_is_a_502_once_the_retry_window_is_over(tmp_path):
    proxy = make_proxy(tmp_path, upstreamRetryWindow=0.3)
    started = asyncio.get_running_loop().time()
    response = await handle(proxy, "/x")
    assert response.status == 502 and "could not be reached" in response.text
    assert asyncio.get_running_loop().time() - started >= 0.3


# --- headers sent upstream --------------------------------------------------------------


def upstream_headers(tmp_path: Path, inbound: dict[str, str], peer: Peer = TAILNET_PEER,
                     identity: Identity | None = None, **config):
    return upstream_headers_of(make_proxy(tmp_path, **config), inbound, peer, identity)


SPOOFED = {
    "X-Tailscale-User": "evil", "x-tailscale-user-login": "evil", "TAILSCALE-USER-LOGIN": "evil",
    "Tailscale-App-Capabilities": "evil", "Tailscale-Funnel-Request": "evil", "Forwarded": "for=evil",
    "X-Forwarded-For": "evil", "x-forwarded-host": "evil", "X-Forwarded-Proto": "evil", "X-Forwarded-Port": "evil",
    "X-Forwarded-Server": "evil", "X-Real-Ip": "evil", "x-real-ip": "evil", "X-Scheme": "evil",
}


def test_spoofed_headers_are_replaced_by_ours(tmp_path):
    alice = Identity.from_whois(ALICE_WHOIS)
    headers = upstream_headers(tmp_path, {"Host": "books.tail1234.ts.net", **SPOOFED, "Cookie": "a=b",
                                          "User-Agent": "curl/8"}, identity=alice, identityHeaders=["tsnsrv", "serve"])
    assert "evil" not in str(list(headers.values()))
    assert "Forwarded" not in headers
    assert headers["Host"] == "books.tail1234.ts.net"
    assert headers["X-Forwarded-For"] == "100.64.0.5"
    assert headers["X-Forwarded-Host"] == "books.tail1234.ts.net"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Scheme"] == "https"
    assert headers["X-Real-Ip"] == "100.64.0.5"
    assert headers["X-Forwarded-Server"] == "books.tail1234.ts.net"
    assert "X-Forwarded-Port" not in headers
    assert headers["X-Tailscale-User-LoginName"] == "alice@example.com"
    assert headers["Tailscale-User-Login"] == "alice@example.com"
    assert headers.getall("X-Tailscale-User") == ["userid:1"]
    assert headers["Cookie"] == "a=b" and headers["User-Agent"] == "curl/8"


@given(name=st.sampled_from(sorted(SPOOFED)), flips=st.lists(st.booleans(), min_size=30, max_size=30))
def test_spoofed_headers_in_any_case_never_reach_the_upstream(tmp_path_factory, name, flips):
    mixed = "".join(c.upper() if flip else c.lower() for c, flip in zip(name, flips))
    headers = upstream_headers(tmp_path_factory.mktemp("p"), {"Host": "h", mixed: "evil"})
    assert all(value != "evil" for value in headers.values())
    assert all(not is_spoofable(n) or n in ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Scheme",
                                            "X-Real-Ip", "X-Forwarded-Server") for n in headers)


def test_no_identity_means_no_identity_headers(tmp_path):
    headers = upstream_headers(tmp_path, {"Host": "h", "X-Tailscale-User": "evil"}, identity=None)
    assert not [name for name in headers if name.lower().startswith(("x-tailscale-", "tailscale-"))]


def test_suppress_whois_sends_no_identity(tmp_path):
    headers = upstream_headers(tmp_path, {"Host": "h"}, identity=Identity.from_whois(ALICE_WHOIS),
                               suppressWhois=True, identityHeaders=["tsnsrv", "serve"])
    assert not [name for name in headers if "tailscale" in name.lower()]


def test_funnel_request_marker_in_serve_schema(tmp_path):
    headers = upstream_headers(tmp_path, {"Host": "h", "Tailscale-Funnel-Request": "?0"}, peer=FUNNEL_PEER,
                               identityHeaders=["serve"])
    assert headers.getall("Tailscale-Funnel-Request") == ["?1"]
    assert headers["X-Forwarded-For"] == "203.0.113.7"


def test_hop_by_hop_and_connection_listed_headers_are_dropped(tmp_path):
    headers = upstream_headers(tmp_path, {"Host": "h", "Connection": "keep-alive, X-Private-Hop", "Keep-Alive": "300",
                                          "X-Private-Hop": "1", "TE": "trailers", "Proxy-Authorization": "Basic x",
                                          "Expect": "100-continue", "Upgrade": "h2c", "X-Kept": "yes"})
    # TE too: trailers would not reach the client (aiohttp's client drops them), so the
    # upstream is not told that the client takes them.
    assert set(headers) == {"Host", "X-Kept", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Scheme",
                            "X-Real-Ip", "X-Forwarded-Server"}


@pytest.mark.parametrize(("host", "server", "port"), [
    ("books.tail1234.ts.net:8443", "books.tail1234.ts.net", "8443"),
    ("[fd7a:115c:a1e0::3]:443", "[fd7a:115c:a1e0::3]", "443"),
    ("[fd7a:115c:a1e0::3]", "[fd7a:115c:a1e0::3]", None),
    ("100.64.0.3", "100.64.0.3", None),
])
def test_forwarded_server_and_port_from_host(tmp_path, host, server, port):
    headers = upstream_headers(tmp_path, {"Host": host})
    assert headers["X-Forwarded-Server"] == server
    assert headers.get("X-Forwarded-Port") == port


def test_plaintext_peer_is_http(tmp_path):
    headers = upstream_headers(tmp_path, {"Host": "h"}, peer=Peer("100.64.0.5", 1, TAILNET, tls=False))
    assert headers["X-Forwarded-Proto"] == "http" and headers["X-Scheme"] == "http"


def test_without_recommended_headers_host_is_the_upstreams(tmp_path):
    headers = upstream_headers(tmp_path, {"Host": "books.tail1234.ts.net"}, recommendedProxyHeaders=False,
                               toURL="http://user:pw@127.0.0.1:8083/app")
    assert headers["Host"] == "127.0.0.1:8083"  # and never the URL's credentials
    assert "X-Scheme" not in headers and "X-Real-Ip" not in headers and "X-Forwarded-Server" not in headers
    assert headers["X-Forwarded-Host"] == "books.tail1234.ts.net"


def test_configured_upstream_headers_win(tmp_path):
    headers = upstream_headers(tmp_path, {"Host": "h", "X-Env": "client"},
                               upstreamHeaders={"X-Env": "prod", "X-Forwarded-Proto": "https-forced"},
                               )
    assert headers.getall("X-Env") == ["prod"]
    assert headers.getall("X-Forwarded-Proto") == ["https-forced"]


# --- upstream TLS -----------------------------------------------------------------------


def test_upstream_tls_verifies_and_offers_only_forward_secret_tls12_suites():
    context = upstream_ssl_context(load({"name": "a", "toURL": "https://nas.lan"}))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)


def test_upstream_tls_insecure_options():
    context = upstream_ssl_context(load({"name": "a", "toURL": "https://nas.lan", "insecureHTTPS": True,
                                         "upstreamAllowInsecureCiphers": True}))
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    assert any(c["kea"] == "kx-rsa" for c in context.get_ciphers())


def test_proxy_never_sends_url_credentials_upstream(tmp_path):
    proxy = make_proxy(tmp_path, toURL="https://user:secret@nas.lan:8443/base?token=1")
    assert proxy.upstream.netloc == "nas.lan:8443"
    assert proxy.upstream.base_path == "/base" and proxy.upstream.base_query == "token=1"
