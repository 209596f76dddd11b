"""Runtime faults are survived and reported: tailscaled killed, the control server
restarted under traffic, the upstream gone and back. Recovery times are printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.processes import wait_for
from harness.tailnet import TailscaleNode
from harness.upstream import Upstream

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node

# A new connection per request, each from the next source port: the node's netstack keeps
# a connection it closed in TIME-WAIT for 60 s and drops a SYN that reuses its ports (see
# SourcePorts in bench/soaklib/httpclient.py), and the kernel's own choice of port comes
# back within seconds now and then, which would fail a request whatever the control server
# does. Failures are printed with their reason.
TRAFFIC = """
import http.client, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
source_port = 10000
end = time.monotonic() + seconds
while time.monotonic() < end:
    connection = http.client.HTTPConnection(host, timeout=5, source_address=("", source_port))
    source_port += 1
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        if response.status == 200:
            ok += 1
        else:
            failed += 1
            print(f"status {response.status}", file=sys.stderr)
    except Exception as exc:
        failed += 1
        print(repr(exc), file=sys.stderr)
    finally:
        connection.close()
    time.sleep(0.05)
print(ok, failed)
"""


def ok(client, service) -> bool:
    return client.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}/").stdout == b"200"


def test_a_killed_tailscaled_is_restarted_and_serving_resumes(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("phoenix", upstream.url)
    old_pid = service.tailscaled_pid
    pipes = open_pipes(service.process.pid)  # tailscaled's output, and the pipe it dies with tsnsrv by

    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: service.health()["tailscaled"]["pid"] not in (None, old_pid) and service.health()["ready"],
             60, "tsnsrv to bring tailscaled back")
    wait_for(lambda: ok(laptop, service), 60, "the laptop to reach the service again", interval=0.2)
    recovered = time.monotonic() - killed_at

    print(f"serving again {recovered:.1f}s after kill -9 of tailscaled")
    assert recovered < 60
    health = service.health()
    assert health["tailscaled"]["restarts"] == 1
    assert "tailscaled exited (status -9); restarting it" in service.log()
    assert "recovered" in service.log()
    assert service.metric("tsnsrv_tailscaled_restarts_total") == 1
    assert open_pipes(service.process.pid) == pipes, "every restart left a pipe of the old tailscaled open"


def open_pipes(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:"))


def test_traffic_survives_a_control_server_restart(make_tsnsrv, upstream, laptop, headscale, bin_dir,
                                                  tmp_path):
    service = make_tsnsrv("steady", upstream.url)
    traffic = laptop.popen([sys.executable, "-c", TRAFFIC, service.ip, "12"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)

    headscale.stop()
    try:
        wait_for(lambda: "control-unreachable" in service.health()["node"]["warnings"], 60,
                 "tsnsrv to notice the control server is gone")
    finally:
        headscale.start()
    restarted_at = time.monotonic()
    wait_for(lambda: not service.health()["node"]["warnings"], 120, "the node to reconnect to control")
    reconnected = time.monotonic() - restarted_at

    output, reasons = traffic.communicate(timeout=60)
    served, failed = map(int, output.split())
    # A node that joins after the outage can reach the service: its network map flows again.
    newcomer = TailscaleNode("newcomer", bin_dir, tmp_path / "newcomer").start()
    try:
        newcomer.up(headscale.url, headscale.auth_key("alice"))
        newcomer.wait_for_peer(service.ip, timeout=60)
    finally:
        newcomer.stop()
    print(f"during the control outage: {served} requests served, {failed} failed ({reasons.strip()}); "
          f"back in contact {reconnected:.1f}s after headscale came back")
    assert failed == 0 and served > 50
    log = service.log()
    assert "lost contact with the control server" in log and "back in contact with the control server" in log
    assert ok(laptop, service)


def test_an_upstream_outage_is_reported_and_survived(make_tsnsrv, laptop):
    first = Upstream().start()
    port = first.port
    service = make_tsnsrv("flaky", first.url)
    assert ok(laptop, service)

    first.stop()
    during = laptop.curl("-w", "%{http_code}", f"http://{service.ip}/").stdout
    second = Upstream(port=port).start()
    try:
        assert during.endswith(b"502") and b"flaky" in during
        assert ok(laptop, service)
        assert service.metric("tsnsrv_proxy_errors") == 1
        assert service.health(probe=True)["upstream"]["answers"] is True
    finally:
        second.stop()
