"""Bodies stream both ways and nothing is held back: large and chunked bodies, server-sent
events as they happen, websockets with every frame type, HEAD and bodiless statuses."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from harness.processes import wait_for
from harness.upstream import pattern_sha256

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def service(module_tsnsrv, upstream):
    return module_tsnsrv("stream", upstream.url)


def test_large_download_arrives_byte_exact(service, laptop):
    size = 64 * 1024 * 1024
    result = laptop.run(["sh", "-c", f"curl -sS --max-time 120 http://{service.ip}/bytes/{size} | sha256sum"])
    assert result.stdout.split()[0].decode() == pattern_sha256(size)


def test_download_of_unknown_length_is_chunked_and_complete(service, laptop):
    size = 3 * 1024 * 1024 + 17
    result = laptop.curl("-D", "-", "-o", "/dev/null", "-w", "%{size_download}",
                         f"http://{service.ip}/bytes/{size}?chunked=1")
    headers, _, downloaded = result.stdout.decode().rpartition("\r\n\r\n")
    assert "transfer-encoding: chunked" in headers.lower()
    assert int(downloaded) == size


def test_chunked_upload_streams_to_the_upstream(service, laptop):
    size = 32 * 1024 * 1024
    # A pipe has no length, so curl sends it chunked.
    script = f"head -c {size} /dev/urandom | tee >(sha256sum >&2) | " \
             f"curl -sS --max-time 120 -T - -H 'Content-Type: application/octet-stream' http://{service.ip}/upload"
    result = laptop.run(["bash", "-c", script])
    answer = json.loads(result.stdout)
    assert answer["length"] == size
    assert answer["sha256"] == result.stderr.split()[0].decode()


def test_upload_with_expect_100_continue(service, laptop, tmp_path):
    body = tmp_path / "body"
    body.write_bytes(b"x" * 2_000_000)
    result = laptop.curl("-H", "Expect: 100-continue", "--data-binary", f"@{body}", "-D", "-",
                         f"http://{service.ip}/upload")
    assert result.stdout.startswith(b"HTTP/1.1 100 Continue")
    assert json.loads(result.stdout.rpartition(b"\r\n\r\n")[2])["sha256"] == hashlib.sha256(body.read_bytes()).hexdigest()


SSE_CLIENT = """
import sys, time, urllib.request
started = time.monotonic()
with urllib.request.urlopen(sys.argv[1], timeout=30) as response:
    for line in response:
        if line.startswith(b"data:"):
            print(f"{time.monotonic() - started:.2f} {line.decode().strip()}", flush=True)
"""


def test_server_sent_events_are_delivered_as_they_happen(service, laptop):
    result = laptop.run([sys.executable, "-c", SSE_CLIENT, f"http://{service.ip}/sse?n=3&gap=1.5"])
    arrivals = [float(line.split()[0]) for line in result.stdout.decode().splitlines()]
    print("event arrival times:", arrivals)
    assert len(arrivals) == 3
    # Buffering would deliver all three together at the end (after 4.5 s).
    assert arrivals[1] - arrivals[0] > 1.0 and arrivals[2] - arrivals[1] > 1.0


def test_head_and_bodiless_statuses(service, laptop):
    head = laptop.curl("-I", f"http://{service.ip}/bytes/12345")
    assert b"200" in head.stdout.split(b"\r\n")[0]
    assert b"content-length: 12345" in head.stdout.lower()
    for code in (204, 304):
        result = laptop.curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                             f"http://{service.ip}/status/{code}")
        assert result.stdout.decode() == f"{code} 0"


WEBSOCKET_CLIENT = """
import asyncio, sys, json
import websockets

async def main(url, idle):
    results = {}
    async with websockets.connect(url, subprotocols=["chat"], ping_interval=None, max_size=None) as ws:
        results["subprotocol"] = ws.subprotocol
        results["extensions"] = ws.response.headers.get("Sec-WebSocket-Extensions", "").split(";")[0]
        await ws.send("hello")
        results["text"] = await ws.recv()
        payload = bytes(range(256)) * 4096
        await ws.send(payload)
        results["binary_ok"] = (await ws.recv()) == payload
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 10)
        results["pong"] = True
        await asyncio.sleep(idle)
        await ws.send("still here")
        results["after_idle"] = await ws.recv()
        await ws.send("close:4001")
        try:
            await ws.recv()
        except websockets.ConnectionClosed as closed:
            results["close_code"] = closed.rcvd.code if closed.rcvd else None
    print(json.dumps(results))

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def run_websocket_client(laptop, ip: str, idle: float) -> dict:
    result = laptop.run([sys.executable, "-c", WEBSOCKET_CLIENT, f"ws://{ip}/ws", str(idle)], timeout=idle + 60)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_websocket_frames_and_close_codes_are_relayed(service, laptop):
    opened = service.metric("tsnsrv_websocket_sessions_total")
    results = run_websocket_client(laptop, service.ip, idle=2)

    # permessage-deflate, negotiated by the client and the upstream: the frames pass through untouched.
    assert results == {"subprotocol": "chat", "extensions": "permessage-deflate", "text": "hello", "binary_ok": True,
                       "pong": True, "after_idle": "still here", "close_code": 4001}
    assert service.metric("tsnsrv_websocket_sessions_total") == opened + 1


CLIENT_CLOSES = """
import asyncio, sys, json
import websockets

async def main(url):
    async with websockets.connect(url, ping_interval=None) as ws:
        await ws.send("hi")
        await ws.recv()
        await ws.close(code=4002, reason="client leaving")
    print(json.dumps({"code": ws.close_code, "reason": ws.close_reason}))

asyncio.run(main(sys.argv[1]))
"""


def test_a_close_by_the_client_reaches_the_upstream_and_its_answer_the_client(service, laptop, upstream):
    before = service.metric("tsnsrv_responses_total", 'status_class="1xx"')
    result = laptop.run([sys.executable, "-c", CLIENT_CLOSES, f"ws://{service.ip}/ws"], timeout=60)
    assert result.returncode == 0, result.stderr.decode()

    assert json.loads(result.stdout) == {"code": 4002, "reason": "client leaving"}
    assert upstream.websocket_closes[-1] == (4002, "client leaving")
    # The session is logged and counted as what it was: a 101, with its length and bytes.
    wait_for(lambda: service.metric("tsnsrv_responses_total", 'status_class="1xx"') == before + 1, 10,
             "the session to be counted")
    line = next(line for line in reversed(service.log().splitlines()) if "path=/ws " in line)
    assert " status=101 " in line and " bytes_out=0 " not in line and " bytes_in=0 " not in line, line
