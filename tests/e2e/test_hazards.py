"""The two holes a per-service tailscaled opens on the host, closed (docs/security.md).

Each test first shows the hole on a bare userspace tailscaled (the control), so the
test would fail if the harness could not demonstrate the attack at all, then shows
that a service node started by tsnsrv does not have it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
from dnslib import DNSRecord

from harness import proxyclient
from harness.probes import udp_reply
from harness.resolver import LoopbackResolver, private_resolv_conf_prefix
from harness.tailnet import TailscaleNode

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


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
def bare_node(node_bin_dir, headscale, tmp_path_factory, clients, laptop):
    """A plain userspace tailscaled on this host (of the build the services run): what tsnsrv must not be like."""
    node = TailscaleNode("bare", node_bin_dir, tmp_path_factory.mktemp("bare")).start()
    node.up(headscale.url, headscale.auth_key("alice"))
    laptop.node.wait_for_peer(node.ipv4)
    yield node
    node.stop()


def tcp_reply(laptop, ip: str, port: int) -> bytes:
    return laptop.run(["curl", "-sS", "--max-time", "5", f"telnet://{ip}:{port}"], timeout=20).stdout


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


# --- what tailscaled itself needs on host loopback: a resolver, a control server -------

CONTROL_NAME = "control.tsnsrv.test"

PROBE = """
import socket, sys
kind, host, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
sock.settimeout(3)
try:
    if kind == "tcp":
        sock.connect((host, port))
        sock.sendall(payload)
    else:
        sock.sendto(payload, (host, port))
    print(sock.recv(65536).hex())
except OSError:
    print("")
"""


def probe(laptop, kind: str, ip: str, port: int, payload: bytes) -> bytes:
    """What a tailnet peer gets back for `payload` sent to ip:port (b"" for nothing)."""
    result = laptop.run([sys.executable, "-c", PROBE, kind, ip, str(port), payload.hex()], timeout=20)
    return bytes.fromhex(result.stdout.decode().strip())


def dns_query(name: str, kind: str) -> bytes:
    query = DNSRecord.question(name).pack()
    return len(query).to_bytes(2, "big") + query if kind == "tcp" else query


HTTP_HEALTH = b"GET /health HTTP/1.0\r\n\r\n"


@pytest.fixture(scope="module")
def loopback_resolver():
    """A resolver on 127.0.0.1:53, like dnsmasq, unbound or Pi-hole on a homelab host."""
    try:
        server = LoopbackResolver({CONTROL_NAME: "127.0.0.1"}).start()
    except OSError as exc:
        pytest.skip(f"127.0.0.1:53 is not free on this machine ({exc})")
    yield server.resolver
    server.stop()


@pytest.mark.parametrize("control_host", [CONTROL_NAME, "127.0.0.1"])
def test_a_resolver_and_a_control_server_on_host_loopback_are_not_reachable_through_a_service_node(
        make_tsnsrv, upstream, laptop, bare_node, headscale, loopback_resolver, tmp_path, control_host):
    control_port = urlsplit(headscale.url).port  # headscale's relay on 127.0.0.1
    # Control: a bare userspace tailscaled hands a peer both host services.
    bare_name = f"leak-through-bare-{'name' if control_host == CONTROL_NAME else 'ip'}.test"
    assert probe(laptop, "tcp", bare_node.ipv4, 53, dns_query(bare_name, "tcp")) != b""
    assert loopback_resolver.asked(bare_name) == ["tcp"]
    assert probe(laptop, "tcp", bare_node.ipv4, control_port, HTTP_HEALTH).startswith(b"HTTP/1.")

    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\n")
    resolv_conf.chmod(0o644)
    service = make_tsnsrv("local-dns", upstream.url, login_server=f"http://{control_host}:{control_port}",
                          command_prefix=private_resolv_conf_prefix(resolv_conf))

    if control_host == CONTROL_NAME:  # it came up through both: the name came from the loopback resolver
        assert "udp" in loopback_resolver.asked(CONTROL_NAME)
    addresses = service.health()["node"]["addresses"]
    assert len(addresses) == 2, addresses  # IPv4 and IPv6
    for ip in addresses:
        for kind in ("tcp", "udp"):
            name = f"leak-{kind}-ipv{6 if ':' in ip else 4}-{'name' if control_host == CONTROL_NAME else 'ip'}.test"
            assert probe(laptop, kind, ip, 53, dns_query(name, kind)) == b"", (kind, ip)
            assert loopback_resolver.asked(name) == [], (kind, ip)
        assert probe(laptop, "tcp", ip, control_port, HTTP_HEALTH) == b"", ip
    assert laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}/").stdout == b"200"
    log = service.log()
    assert "refused tailscaled's TCP connection to the resolver at 127.0.0.1:53" in log
    assert "shields down" in log
