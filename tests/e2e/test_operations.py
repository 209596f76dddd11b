"""What an operator relies on: readiness and status for systemd, /health, `tsnsrv status`,
and a graceful shutdown that lets in-flight requests finish."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.notify import NotifySocket
from harness.processes import free_port, wait_for
from harness.tsnsrv import tsnsrv_command

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


def serve_config(socket_path: str, bin_dir: Path) -> dict:
    result = subprocess.run([str(bin_dir / "tailscale"), f"--socket={socket_path}", "serve", "status", "--json"],
                            capture_output=True, text=True, timeout=10)
    return json.loads(result.stdout or "{}")


def test_systemd_hears_status_then_ready_then_watchdog_then_stopping(make_tsnsrv, upstream, laptop, node_bin_dir,
                                                                     service_dir):
    tailscaled_socket = {}

    def look_at_serve_config():
        return serve_config(tailscaled_socket["path"], node_bin_dir)

    notify = NotifySocket(service_dir / "notify.sock", on_ready=look_at_serve_config)
    service = make_tsnsrv("notified", upstream.url, start=False, workdir=service_dir,
                          env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    service.process.start()
    try:
        wait_for(lambda: service.control_socket.exists(), 30, "the control socket")
        tailscaled_socket["path"] = wait_for(lambda: service.health()["tailscaled"]["socket"], 30,
                                             "tailscaled's socket path")
        wait_for(lambda: "READY=1" in notify.flat(), 60, "READY=1")
        messages = notify.flat()
        ready_at = messages.index("READY=1")
        statuses_before = [m for m in messages[:ready_at] if m.startswith("STATUS=")]
        assert statuses_before, "STATUS= lines are sent while starting"
        assert notify.seen_at_ready["TCP"]["80"]["ProxyProtocol"] == 2, "READY=1 came before the Serve config"
        log = service.log()
        assert log.index("serve config set") < log.index("ready: serving")

        wait_for(lambda: notify.flat().count("WATCHDOG=1") >= 3, 10, "three watchdog pings at 200 ms intervals")

        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(30) == 0
        assert "STOPPING=1" in notify.flat()
    finally:
        notify.close()


def test_without_notify_socket_readiness_is_still_visible_in_health(make_tsnsrv, upstream):
    service = make_tsnsrv("health-check", upstream.url)
    health = service.health(probe=True)
    assert health["ready"] is True
    assert health["node"]["state"] == "Running"
    assert health["node"]["url"] == "http://health-check.tailnet.test/"
    assert health["serve"]["front"].startswith("127.0.0.2:")
    assert health["tailscaled"]["state"] == "running"
    assert health["upstream"]["answers"] is True and health["upstream"]["status"] == 200


def test_health_counts_the_asyncio_tasks_which_return_to_their_idle_count(make_tsnsrv, upstream, laptop):
    """What bench/soak checks for leaks after every fault: the count comes back once the
    requests, and their connections, are gone."""
    service = make_tsnsrv("task-count", upstream.url)
    idle = service.health()["tasks"]
    assert isinstance(idle, int) and idle > 0
    for path in ("/a", "/bytes/300000", "/sse?n=2&gap=0.1"):
        assert laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}{path}").stdout == b"200"
    wait_for(lambda: service.health()["tasks"] == idle, 10, "the task count back at its idle value")


def run_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tsnsrv_command(), "status", *args], capture_output=True, text=True, timeout=30)


def test_status_shows_each_service_at_a_glance(make_tsnsrv, upstream):
    up = make_tsnsrv("status-up", upstream.url)
    down = make_tsnsrv("status-down", "http://127.0.0.1:9")  # the discard port: nothing listens

    result = run_status("--socket", str(up.control_socket), "--socket", str(down.control_socket))

    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["SERVICE", "STATE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert up.ip in rows["status-up"] and "http://status-up.tailnet.test/" in rows["status-up"]
    assert "serving" in rows["status-up"] and "yes (200" in rows["status-up"]
    assert "NO:" in rows["status-down"]
    assert result.returncode == 0  # both are ready; an unreachable upstream is shown, not fatal

    up.stop()
    after = run_status("--socket", str(up.control_socket), "--socket", str(down.control_socket))
    assert after.returncode == 1
    assert "not answering" in after.stdout


def test_status_for_an_unknown_name_says_so(make_tsnsrv, upstream):
    service = make_tsnsrv("status-known", upstream.url)
    result = run_status("--socket", str(service.control_socket), "no-such-service")
    assert result.returncode == 2
    assert "no running service named no-such-service" in result.stderr


SLOW_THEN_NEW = """
import sys, threading, time, urllib.request
base = sys.argv[1]
results = {}
def slow():
    try:
        with urllib.request.urlopen(base + "/slow?seconds=3", timeout=30) as response:
            results["slow"] = f"{response.status} {response.read().decode().strip()}"
    except Exception as exc:
        results["slow"] = f"error {exc}"
thread = threading.Thread(target=slow)
thread.start()
print("in flight", flush=True)
sys.stdin.readline()  # the test sends SIGTERM, then a line
try:
    with urllib.request.urlopen(base + "/new", timeout=5) as response:
        results["new"] = f"{response.status}"
except Exception as exc:
    results["new"] = "refused"
thread.join()
print(results["slow"])
print(results["new"])
"""


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("graceful", upstream.url)
    slow_requests = len([r for r in upstream.requests if r["path"] == "/slow"])
    client = laptop.popen([sys.executable, "-c", SLOW_THEN_NEW, f"http://{service.ip}"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "in flight"
    wait_for(lambda: len([r for r in upstream.requests if r["path"] == "/slow"]) > slow_requests, 30,
             "the slow request to reach the upstream")

    service.process.send_signal(signal.SIGTERM)
    wait_for(lambda: not service.health()["serve"]["accepting"], 10, "the front listener to close")
    out, _ = client.communicate("go\n", timeout=60)

    slow, new = out.strip().splitlines()[-2:]
    assert slow == "200 slow response done"
    assert new == "refused"
    assert service.process.wait(30) == 0
    log = service.log()
    assert "finishing in-flight requests" in log and "stopped" in log
    assert "cannot tell whether tailscaled delivered" not in log, "the delivery wait must have watched the front port"


WEBSOCKET_HELD = """
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        print("open", flush=True)
        try:
            await asyncio.wait_for(ws.recv(), 60)
        except websockets.ConnectionClosed as closed:
            print(closed.rcvd.code if closed.rcvd else "no close frame")
asyncio.run(main())
"""


def test_open_websockets_are_told_the_server_is_going_away(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("ws-goodbye", upstream.url)
    client = laptop.popen([sys.executable, "-c", WEBSOCKET_HELD, f"ws://{service.ip}/ws"], stdout=subprocess.PIPE,
                          text=True)
    assert client.stdout.readline().strip() == "open"

    service.process.send_signal(signal.SIGTERM)

    out, _ = client.communicate(timeout=60)
    assert out.strip() == "1001"
    assert service.process.wait(30) == 0


@pytest.mark.parametrize("listen", ["127.0.0.1", "tailnet"])
def test_metrics_are_served_where_asked_with_the_go_tsnsrv_names(make_tsnsrv, upstream, laptop, listen):
    address = f"127.0.0.1:{free_port()}" if listen == "127.0.0.1" else "tailnet:9099"
    service = make_tsnsrv(f"metrics-{listen.replace('.', '-')}", upstream.url, "--metrics-addr", address)
    assert laptop.curl("-o", "/dev/null", f"http://{service.ip}/counted").returncode == 0

    if listen == "tailnet":
        scraped = laptop.curl(f"http://{service.ip}:9099/metrics").stdout.decode()
    else:
        import urllib.request
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            scraped = response.read().decode()

    samples = dict(line.rsplit(" ", 1) for line in scraped.splitlines() if line and not line.startswith("#"))
    # The Go tsnsrv's series, so existing dashboards keep working, and ours.
    assert float(samples["tsnsrv_request_duration_ns_count"]) >= 1
    assert float(samples['tsnsrv_response_status_classes{status_code_class="2xx"}']) >= 1
    assert samples["tsnsrv_proxy_errors"] == "0.0"
    assert float(samples['tsnsrv_responses_total{source="tailnet",status_class="2xx"}']) >= 1
    assert 'tsnsrv_request_duration_seconds_bucket{le="0.001",source="tailnet"}' in samples


def access_lines(service) -> list[str]:
    return [line for line in service.log().splitlines() if "logger=tsnsrv.access" in line]


def test_each_request_gets_one_structured_access_log_line(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("logged", upstream.url)
    laptop.curl("-o", "/dev/null", "--data-binary", "12345", f"http://{service.ip}/upload?x=1")

    [line] = [line for line in access_lines(service) if "/upload" in line]
    fields = dict(part.split("=", 1) for part in shlex.split(line) if "=" in part)
    assert fields["method"] == "POST" and fields["path"] == "/upload?x=1"
    assert fields["status"] == "200"
    assert fields["bytes_in"] == "5"
    assert int(fields["bytes_out"]) > 0
    assert float(fields["duration_ms"]) >= 0
    assert fields["client"] == "alice" and fields["node"] == "laptop"
    assert fields["source"] == "tailnet"
    assert fields["remote"] == laptop.node.ipv4


def test_the_access_log_can_be_turned_off_and_the_level_raised(make_tsnsrv, upstream, laptop):
    quiet = make_tsnsrv("quiet", upstream.url, "--no-access-log")
    warnings_only = make_tsnsrv("terse", upstream.url, "--log-level", "warning")
    for service in (quiet, warnings_only):
        assert laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}/x").stdout == b"200"
        assert access_lines(service) == []
    assert "ready: serving" in quiet.log()
    assert "ready: serving" not in warnings_only.log()
