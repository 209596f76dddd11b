"""HTTPS with the node's own certificate, and Funnel, against a FAKE LocalAPI.

Neither exists offline: headscale issues no certificates and has no Funnel. So here the
test plays tailscaled (tests/harness/fake_localapi.py) while tsnsrv is the real command,
attached to it with --tailscaled-socket. The same code paths run over the real tailnet
in the other suites (plaintext and certificate files, test_tls.py).
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from harness.fake_localapi import FakeLocalAPI, funnel_capabilities
from harness.processes import wait_for
from harness.tsnsrv import Tsnsrv

TAILNET_CLIENT = "100.90.1.2"
PUBLIC_CLIENT = "198.18.250.9"  # outside the tailnet's ranges: what Funnel ingress forwards
ALICE = {"Node": {"ID": 7, "Name": "laptop.fake-tailnet.ts.net.", "ComputedName": "laptop"},
         "UserProfile": {"ID": 3, "LoginName": "alice@example.com", "DisplayName": "Alice"}, "CapMap": {}}


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def issue(ca: trustme.CA, name: str, days: int = 90) -> tuple[bytes, bytes]:
    cert = ca.issue_cert(f"{name}.fake-tailnet.ts.net",
                         not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days))
    return cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


class Attached:
    """A fake tailscaled and a real tsnsrv attached to it."""

    def __init__(self, workdir: Path, name: str, upstream_url: str, ca: trustme.CA, flags: list[str],
                 capabilities: dict | None = None):
        self.cert_pem, key_pem = issue(ca, name)
        self.ca_file = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.fake = FakeLocalAPI(workdir / "tailscaled.sock", name, self.cert_pem, key_pem, capabilities).start()
        self.fake.identities[TAILNET_CLIENT] = ALICE
        self.service = Tsnsrv(name, upstream_url, workdir, Path("/nonexistent"), None, None,
                              ["--tailscaled-socket", str(self.fake.socket_path), *flags], plaintext=False)

    def get(self, source: str, path: str, **headers: str):
        return self.fake.request(source, path, headers, ca_file=self.ca_file)

    def stop(self) -> None:
        self.service.stop()
        self.fake.stop()


@pytest.fixture
def attach(service_dir, upstream, ca):
    started: list[Attached] = []

    def make(name: str, *flags: str, capabilities: dict | None = None, wait: bool = True) -> Attached:
        attached = Attached(service_dir, name, upstream.url, ca, list(flags), capabilities)
        started.append(attached)
        attached.service.start(wait=wait)
        return attached
    yield make
    for attached in started:
        attached.stop()


def seen_headers(upstream, path: str) -> dict[str, str]:
    entry = [r for r in upstream.requests if r["path"] == path][-1]
    return {name.lower(): value for name, value in entry["headers"]}


def test_the_node_certificate_comes_from_the_localapi(attach, upstream):
    node = attach("certified")

    status, _, _, peer_cert = node.get(TAILNET_CLIENT, "/tls-check")

    assert status == 200
    assert int(peer_cert["serialNumber"], 16) == serial(node.cert_pem)
    assert seen_headers(upstream, "/tls-check")["x-tailscale-user-loginname"] == "alice@example.com"
    [asked] = node.fake.cert_requests
    assert asked == {"domain": "certified.fake-tailnet.ts.net", "type": "pair", "min_validity": "1209600s"}
    not_after = x509.load_pem_x509_certificate(node.cert_pem).not_valid_after_utc
    assert node.service.metric("tsnsrv_certificate_expiry_timestamp_seconds") == not_after.timestamp()
    assert node.fake.serve_config["TCP"]["443"]["ProxyProtocol"] == 2
    assert "AllowFunnel" not in node.fake.serve_config
    tls = node.service.health()["tls"]
    assert tls["mode"] == "tailscale" and "tailscaled" in tls["source"]


def test_a_renewed_certificate_is_served_to_new_connections_without_dropping_open_ones(attach, ca):
    node = attach("renewing")
    slow_result: dict[str, int] = {}
    slow = threading.Thread(target=lambda: slow_result.update(status=node.get(TAILNET_CLIENT, "/slow?seconds=3")[0]))
    slow.start()

    renewed_pem, renewed_key = issue(ca, "renewing", days=120)
    node.fake.cert_pem, node.fake.key_pem = renewed_pem, renewed_key
    node.service.process.send_signal(signal.SIGHUP)

    wait_for(lambda: int(node.get(TAILNET_CLIENT, "/after")[3]["serialNumber"], 16) == serial(renewed_pem), 10,
             "new connections to get the renewed certificate")
    slow.join(30)
    assert slow_result == {"status": 200}
    assert len(node.fake.cert_requests) == 2
    assert "SIGHUP: certificate valid until" in node.service.log()


def test_funnel_refuses_a_node_without_the_funnel_attribute(attach):
    node = attach("no-funnel", "--funnel", wait=False)
    assert node.service.process.wait(30) == 2
    log = node.service.log()
    assert "this node may not use Funnel" in log and "nodeAttrs" in log
    assert node.fake.serve_config == {}, "nothing is claimed when the configuration cannot work"


def test_funnel_refuses_a_port_the_tailnet_does_not_allow(attach):
    node = attach("wrong-port", "--funnel", "--listen-port", "8443", capabilities=funnel_capabilities("443"),
                  wait=False)
    assert node.service.process.wait(30) == 2
    assert "Funnel allows ports 443 on this tailnet, not 8443" in node.service.log()


def test_funnel_requests_are_recognised_marked_and_kept_to_funnel_prefixes(attach, upstream):
    node = attach("public", "--funnel", "--identity-header", "serve", "--no-strip-prefix", "--prefix", "funnel:/public",
                  "--prefix", "tailnet:/", capabilities=funnel_capabilities())
    assert node.fake.serve_config["AllowFunnel"] == {"public.fake-tailnet.ts.net:443": True}

    assert node.get(PUBLIC_CLIENT, "/public/page")[0] == 200
    public = seen_headers(upstream, "/public/page")
    assert public["tailscale-funnel-request"] == "?1"
    assert "tailscale-user-login" not in public

    assert node.get(PUBLIC_CLIENT, "/private")[0] == 404
    assert node.get(TAILNET_CLIENT, "/private", **{"Tailscale-Funnel-Request": "?1"})[0] == 200
    private = seen_headers(upstream, "/private")
    assert private["tailscale-user-login"] == "alice@example.com"
    assert "tailscale-funnel-request" not in private, "a tailnet client cannot pose as public"
    assert node.service.metric("tsnsrv_responses_total", 'source="funnel",status_class="2xx"') == 1


def test_funnel_only_serves_nobody_on_the_tailnet(attach, upstream):
    node = attach("public-only", "--funnel", "--funnel-only", capabilities=funnel_capabilities())
    assert node.get(PUBLIC_CLIENT, "/hello")[0] == 200
    with pytest.raises((ConnectionError, OSError)):
        node.get(TAILNET_CLIENT, "/hello")
    assert node.service.metric("tsnsrv_refused_front_connections_total", 'reason="tailnet_not_served"') == 1


def test_an_attached_service_takes_its_serve_config_with_it_when_it_stops(attach):
    node = attach("leaving")
    front = node.fake.front()
    assert node.fake.serve_config["TCP"]["443"]["TCPForward"] == f"{front[0]}:{front[1]}"

    assert node.service.stop() == 0

    assert node.fake.serve_config == {}, "tailscaled would forward clients to a port anyone may now bind"
    assert "serve config removed" in node.service.log()
