"""The front listener (tsnsrv.front) in-process, on a loopback port, without a tailnet.

The peer check is a stand-in (harness/inprocess.py). What is proved here: the PROXY header decides the client and its kind (tailnet or Funnel),
refused connections are closed and counted, TLS is served after the PROXY header, and a
whole request flows front → proxy → a real upstream on a unix socket.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import pytest
import trustme

from tsnsrv import proxyproto
from tsnsrv.config import load
from tsnsrv.identity import WhoisCache
from tsnsrv.metrics import Metrics
from tsnsrv.proxy import Proxy
from tsnsrv.tlscerts import server_context

from harness.inprocess import HOST, body, exchange, make_front, request


@pytest.mark.asyncio
async def test_tailnet_client_from_the_proxy_header(fronts):
    front = make_front()
    fronts.append(front)
    response = await exchange(front.port, proxyproto.encode("100.64.0.9", 41000, "127.0.0.2", 443) + b"|"
                              + request("/x?y=1"))
    assert body(response) == {"address": "100.64.0.9", "port": 41000, "provenance": "tailnet", "tls": False,
                              "path": "/x?y=1"}
    assert front.check.checked == 1


@pytest.mark.asyncio
async def test_public_source_is_a_funnel_client(fronts):
    front = make_front()
    fronts.append(front)
    response = await exchange(front.port, proxyproto.encode("203.0.113.7", 5000, "127.0.0.2", 443) + b"|"
                              + request())
    assert body(response)["provenance"] == "funnel"


@pytest.mark.asyncio
async def test_ipv4_mapped_tailnet_source_is_a_tailnet_client(fronts):
    front = make_front()
    fronts.append(front)
    response = await exchange(front.port, proxyproto.encode("::ffff:100.64.0.9", 1, "::1", 443) + b"|" + request())
    assert body(response)["address"] == "100.64.0.9" and body(response)["provenance"] == "tailnet"


@pytest.mark.asyncio
@pytest.mark.parametrize(("source", "options", "reason"), [
    ("203.0.113.7", {"accept_funnel": False}, "funnel_not_served"),
    ("100.64.0.9", {"accept_tailnet": False}, "tailnet_not_served"),
])
async def test_client_kinds_not_served_are_closed_and_counted(fronts, source, options, reason):
    front = make_front(**options)
    fronts.append(front)
    response = await exchange(front.port, proxyproto.encode(source, 1, "127.0.0.2", 443) + b"|" + request())
    assert response == b""
    assert front.refused(reason) == 1


@pytest.mark.asyncio
async def test_a_connection_without_proxy_header_is_closed_and_counted(fronts):
    front = make_front()
    fronts.append(front)
    assert await exchange(front.port, b"|" + request()) == b""
    assert front.refused("bad_proxy_header") == 1


@pytest.mark.asyncio
async def test_a_connection_the_peer_check_refuses_is_closed_unread(fronts):
    front = make_front(refusal="socket belongs to uid 1234, not tailscaled")
    fronts.append(front)
    response = await exchange(front.port, proxyproto.encode("100.64.0.9", 1, "127.0.0.2", 443) + b"|" + request())
    assert response == b""
    assert front.refused("not_tailscaled") == 1


@pytest.mark.asyncio
async def test_tls_after_the_proxy_header(fronts):
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, not_after=dt.datetime(2040, 1, 1, tzinfo=dt.timezone.utc))
    front = make_front()
    fronts.append(front)
    front.listener.tls_context = server_context(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    client = ssl.create_default_context()
    ca.configure_trust(client)
    response = await exchange(front.port, proxyproto.encode("100.64.0.9", 7, "127.0.0.2", 443) + b"|" + request(),
                              tls=client)
    assert body(response)["tls"] is True


@pytest.mark.asyncio
async def test_slow_request_head_is_cut_off(fronts):
    front = make_front(read_header_timeout=0.2)
    fronts.append(front)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(proxyproto.encode("100.64.0.9", 1, "127.0.0.2", 443) + b"GET / HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no response
    writer.close()


# --- front → proxy → upstream ---------------------------------------------------------


@pytest.mark.asyncio
async def test_a_request_flows_to_the_upstream_with_identity_and_clean_headers(fronts, upstream):
    socket_path, seen = upstream
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083/app?base=1", "upstreamUnixAddr": socket_path,
                "prefixes": ["/api"], "identityHeaders": ["tsnsrv", "serve"]})

    async def whois(address: str, _timeout):
        return {"Node": {"ID": 7, "ComputedName": "alice-laptop"},
                "UserProfile": {"ID": 1, "LoginName": "alice@example.com", "DisplayName": "Zoë"}}

    metrics = Metrics()
    proxy = Proxy(cfg, WhoisCache(whois, 1.0, metrics), metrics)
    front = make_front(handler=proxy.handle)
    fronts.append(front)
    try:
        response = await exchange(front.port, proxyproto.encode("100.64.0.9", 1, "127.0.0.2", 443) + b"|" + request(
            "/api/v1/items?q=a%20b", "X-Tailscale-User: 0\r\nX-Forwarded-For: 6.6.6.6\r\n"))
    finally:
        await proxy.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"X-Upstream: 1" in head
    assert payload == b"hello from upstream"
    [got] = seen
    assert got["path_qs"] == "/app/v1/items?base=1&q=a%20b"
    assert got["headers"]["X-Tailscale-User"] == "userid:1"
    assert got["headers"]["X-Tailscale-User-LoginName"] == "alice@example.com"
    assert got["headers"]["Tailscale-User-Name"] == "=?utf-8?q?Zo=C3=AB?="
    assert got["headers"]["X-Forwarded-For"] == "100.64.0.9"
    assert got["headers"]["Host"] == HOST
    assert metrics.registry.get_sample_value("tsnsrv_responses_total", {"status_class": "2xx", "source": "tailnet"}) == 1
