"""Kinds of upstreams (TCP, unix socket, fixed address, HTTPS) and what happens when
they fail or are slow: 502/504 pages that name the service, and timeouts that do not
break streams."""

from __future__ import annotations

import json

import socket
import ssl
import sys

import pytest
import trustme

from harness.upstream import Upstream, echo


def fetch(client, url: str, *args: str) -> tuple[int, bytes]:
    result = client.curl("-w", "\n%{http_code}", *args, url)
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code or 0), body


def test_unix_socket_upstream(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("unix-up", "http://app.internal/base", "--upstream-unix", str(upstream.unix_socket))

    code, body = fetch(laptop, f"http://{service.ip}/x?y=1")

    assert code == 200
    assert echo(body)["path"] == "/base/x"


def test_fixed_dial_address_keeps_the_url_host(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("fixed-addr", "http://app.internal:9999/", "--upstream-tcp-addr",
                          f"127.0.0.1:{upstream.port}", "--no-recommended-proxy-headers")

    code, body = fetch(laptop, f"http://{service.ip}/dial")

    assert code == 200
    assert echo(body)["header"]["host"] == "app.internal:9999"


def test_upstream_connections_are_reused(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("pooled", upstream.url)

    ports = {echo(fetch(laptop, f"http://{service.ip}/pool/{n}")[1])["peer_port"] for n in range(3)}

    assert len(ports) == 1, ports


@pytest.fixture(scope="module")
def https_upstream(tmp_path_factory):
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA).configure_cert(context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.parent.chmod(0o755)
    server = Upstream(ssl_context=context).start()
    yield server, ca_file
    server.stop()


def test_https_upstream_is_verified(make_tsnsrv, https_upstream, laptop):
    server, ca_file = https_upstream
    unverified = make_tsnsrv("tls-unknown-ca", server.url)
    trusted = make_tsnsrv("tls-own-ca", server.url, "--upstream-ca-file", str(ca_file))
    insecure = make_tsnsrv("tls-insecure", server.url, "--insecure-https")

    code, body = fetch(laptop, f"http://{unverified.ip}/")
    assert code == 502
    assert b"tls-unknown-ca" in body
    assert fetch(laptop, f"http://{trusted.ip}/")[0] == 200
    assert fetch(laptop, f"http://{insecure.ip}/")[0] == 200


def test_upstreams_without_forward_secrecy_need_the_legacy_switch(make_tsnsrv, tmp_path_factory, laptop):
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-GCM-SHA256")  # RSA key exchange: no forward secrecy
    ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA).configure_cert(context)
    old = Upstream(ssl_context=context).start()
    try:
        strict = make_tsnsrv("tls-strict", old.url, "--insecure-https")
        legacy = make_tsnsrv("tls-legacy", old.url, "--insecure-https", "--upstream-allow-insecure-ciphers")

        assert fetch(laptop, f"http://{strict.ip}/")[0] == 502
        assert fetch(laptop, f"http://{legacy.ip}/")[0] == 200
    finally:
        old.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refused_upstream_is_a_502_page_naming_the_service(make_tsnsrv, laptop):
    service = make_tsnsrv("gone", f"http://127.0.0.1:{closed_port()}")

    code, body = fetch(laptop, f"http://{service.ip}/")

    assert code == 502
    assert b"gone" in body and b"could not be reached" in body
    assert service.metric("tsnsrv_proxy_errors") == 1
    assert service.metric("tsnsrv_upstream_errors_total", 'kind="connect"') == 1


def test_upstream_that_never_accepts_is_a_504_after_the_connect_timeout(make_tsnsrv, laptop):
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # one connection fills the accept queue; later SYNs go unanswered
        with socket.create_connection(full.getsockname()):
            service = make_tsnsrv("stuck", f"http://127.0.0.1:{full.getsockname()[1]}",
                                  "--upstream-connect-timeout", "1s")
            code, body = fetch(laptop, f"http://{service.ip}/")
    assert code == 504
    assert b"stuck" in body


def test_slow_response_headers_are_a_504(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("slowpoke", upstream.url, "--upstream-response-header-timeout", "1s")

    code, body = fetch(laptop, f"http://{service.ip}/slow?seconds=5")

    assert code == 504
    assert b"slowpoke" in body and b"timed out" in body
    assert fetch(laptop, f"http://{service.ip}/slow?seconds=0.1")[0] == 200


def test_idle_timeout_cuts_a_silent_stream_but_not_a_flowing_one(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("idler", upstream.url, "--upstream-idle-timeout", "1s")

    flowing = laptop.curl(f"http://{service.ip}/sse?n=6&gap=0.5")
    silent = laptop.curl(f"http://{service.ip}/sse?n=3&gap=3")

    assert flowing.returncode == 0 and flowing.stdout.count(b"data:") == 6
    assert silent.returncode != 0  # cut off mid-stream
    assert silent.stdout.count(b"data:") == 1


WEBSOCKET_TICKS = """
import asyncio, json, sys
import websockets

async def main(url):
    async with websockets.connect(url, ping_interval=None) as ws:
        ticks = 0
        for i in range(10):  # 3 s of traffic, past the 1 s idle timeout
            await ws.send(f"tick {i}")
            ticks += await ws.recv() == f"tick {i}"
            await asyncio.sleep(0.3)
        await asyncio.sleep(3)  # then silence
        try:
            await ws.send("anyone?")
            await asyncio.wait_for(ws.recv(), 10)
            closed = False
        except websockets.ConnectionClosed:
            closed = True
    print(json.dumps({"ticks": ticks, "closed_after_silence": closed}))

asyncio.run(main(sys.argv[1]))
"""


def test_idle_timeout_ends_a_silent_websocket_but_not_a_talking_one(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("ws-idler", upstream.url, "--upstream-idle-timeout", "1s")

    result = laptop.run([sys.executable, "-c", WEBSOCKET_TICKS, f"ws://{service.ip}/ws"], timeout=60)

    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == {"ticks": 10, "closed_after_silence": True}
    assert 'note="websocket idle for 1s"' in service.log()


SLOWLORIS = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], 80), timeout=30)
started = time.monotonic()
sock.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n")
try:
    while True:
        time.sleep(0.5)
        sock.sendall(b"X-Slow: 1\\r\\n")
except OSError:
    pass
print(f"{time.monotonic() - started:.1f}")
"""


def test_a_client_that_trickles_its_headers_is_disconnected(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("no-slowloris", upstream.url, "--read-header-timeout", "2s")

    result = laptop.run([sys.executable, "-c", SLOWLORIS, service.ip], timeout=60)

    assert result.returncode == 0, result.stderr
    seconds = float(result.stdout)
    print(f"slowloris connection closed after {seconds}s (read header timeout 2s)")
    assert seconds < 25
