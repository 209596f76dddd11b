"""The two holes a per-service tailscaled opens on the host, closed (README.md, "Security").

Each test first shows the hole on a bare userspace tailscaled (the control), so the
test would fail if the harness could not demonstrate the attack at all, then shows
that a service node started by tsnsrv does not have it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from harness import proxyclient
from harness.tailnet import TailscaleNode


class LoopbackListener:
    """A host service on 127.0.0.1 that must stay private: counts who reaches it."""

    def __init__(self, kind: int):
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        if kind == socket.SOCK_STREAM:
            self.sock.listen()
        threading.Thread(target=self._serve, args=(kind,), daemon=True).start()

    def _serve(self, kind: int) -> None:
        while True:
            try:
                if kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    conn.sendall(b"private database\n")
                    conn.close()
                else:
                    data, peer = self.sock.recvfrom(2048)
                    self.sock.sendto(b"private " + data, peer)
                self.hits += 1
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tcp_secret():
    listener = LoopbackListener(socket.SOCK_STREAM)
    yield listener
    listener.close()


@pytest.fixture
def udp_secret():
    listener = LoopbackListener(socket.SOCK_DGRAM)
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def bare_node(bin_dir, headscale, tmp_path_factory, clients, laptop):
    """A plain userspace tailscaled on this host: what tsnsrv must not be like."""
    node = TailscaleNode("bare", bin_dir, tmp_path_factory.mktemp("bare")).start()
    node.up(headscale.url, headscale.auth_key("alice"))
    laptop.node.wait_for_peer(node.ipv4)
    yield node
    node.stop()


def tcp_reply(laptop, ip: str, port: int) -> bytes:
    return laptop.run(["curl", "-sS", "--max-time", "5", f"telnet://{ip}:{port}"], timeout=20).stdout


UDP_PROBE = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(3)
sock.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
try:
    print(sock.recvfrom(2048)[0].decode())
except socket.timeout:
    print("no answer")
"""


def udp_reply(laptop, ip: str, port: int) -> str:
    return laptop.run([sys.executable, "-c", UDP_PROBE, ip, str(port)], timeout=20).stdout.decode().strip()


def test_host_loopback_tcp_is_not_reachable_through_a_service_node(make_tsnsrv, upstream, laptop, bare_node,
                                                                      tcp_secret):
    assert tcp_reply(laptop, bare_node.ipv4, tcp_secret.port) == b"private database\n", \
        "control: a bare userspace tailscaled forwards to host loopback"
    hits_before = tcp_secret.hits
    service = make_tsnsrv("guarded", upstream.url)

    leaked = tcp_reply(laptop, service.ip, tcp_secret.port)

    assert leaked == b""
    assert tcp_secret.hits == hits_before
    assert laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}/").stdout == b"200"
    assert f"refused tailscaled's connection to host loopback 127.0.0.1:{tcp_secret.port}" in service.log()
    assert service.health()["tailscaled"]["loopbackGuard"] == "seccomp"


def test_host_loopback_udp_is_not_reachable_through_a_service_node(make_tsnsrv, upstream, laptop, bare_node,
                                                                      udp_secret):
    assert udp_reply(laptop, bare_node.ipv4, udp_secret.port) == "private ping", \
        "control: a bare userspace tailscaled forwards UDP to host loopback"
    hits_before = udp_secret.hits
    service = make_tsnsrv("udp-guarded", upstream.url)

    assert udp_reply(laptop, service.ip, udp_secret.port) == "no answer"
    assert udp_secret.hits == hits_before


def test_a_local_process_cannot_forge_a_tailnet_identity(make_tsnsrv, upstream, laptop, tailscaled_user):
    service = make_tsnsrv("forge-target", upstream.url)
    front_host, front_port = service.health()["serve"]["front"].rsplit(":", 1)
    before = len(upstream.requests)

    # A root process, and one running as tailscaled's own uid: neither is tailscaled.
    impostors = [[sys.executable]]
    if tailscaled_user:
        impostors.append(["setpriv", f"--reuid={tailscaled_user}", f"--regid={tailscaled_user}", "--clear-groups",
                          sys.executable])
    for impostor in impostors:
        result = subprocess.run(proxyclient.forger_argv(impostor, front_host, front_port, laptop.node.ipv4,
                                                        service.ip), capture_output=True, timeout=30, cwd="/")
        assert result.stdout.decode().strip() == "closed without an answer", (impostor, result)

    assert len(upstream.requests) == before
    assert service.metric("tsnsrv_refused_front_connections_total", 'reason="not_tailscaled"') == len(impostors)
    assert "refused a front connection" in service.log()
    # The real path still works, with the real identity.
    assert laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}/").stdout == b"200"
