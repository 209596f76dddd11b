"""What tsnsrv does with certificates a real tailscaled never hands out, against a FAKE
LocalAPI: a key that does not fit the certificate, at start and at renewal.

Here the test plays tailscaled (tests/harness/fake_localapi.py) while tsnsrv is the real
command, attached to it with --tailscaled-socket. Everything a real tailscaled does runs
over the real tailnet instead: node certificates from a local CA, renewal, the CA's
errors (test_tls_real_tailscaled.py) and Funnel (test_funnel_real_tailscaled.py).
"""

from __future__ import annotations

import datetime as dt
import signal
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from harness.fake_localapi import FakeLocalAPI
from harness.processes import wait_for
from harness.tsnsrv import Tsnsrv

TAILNET_CLIENT = "100.90.1.2"
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
    """A fake tailscaled and a real tsnsrv attached to it; `misfit` hands out another certificate's key."""

    def __init__(self, workdir: Path, name: str, upstream_url: str, ca: trustme.CA, misfit: bool):
        self.cert_pem, key_pem = issue(ca, name)
        if misfit:
            key_pem = issue(ca, name)[1]
        self.ca_file = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.fake = FakeLocalAPI(workdir / "tailscaled.sock", name, self.cert_pem, key_pem).start()
        self.fake.identities[TAILNET_CLIENT] = ALICE
        self.service = Tsnsrv(name, upstream_url, workdir, Path("/nonexistent"), None, None,
                              ["--tailscaled-socket", str(self.fake.socket_path)], plaintext=False)

    def served_serial(self) -> int:
        return int(self.fake.request(TAILNET_CLIENT, "/", ca_file=self.ca_file)[3]["serialNumber"], 16)

    def stop(self) -> None:
        self.service.stop()
        self.fake.stop()


@pytest.fixture
def attach(service_dir, upstream, ca):
    started: list[Attached] = []

    def make(name: str, misfit: bool = False) -> Attached:
        attached = Attached(service_dir, name, upstream.url, ca, misfit)
        started.append(attached)
        attached.service.start(wait=not misfit)
        return attached
    yield make
    for attached in started:
        attached.stop()


def test_a_pair_whose_key_does_not_fit_is_refused_at_start(attach):
    node = attach("misfit", misfit=True)
    assert node.service.process.wait(30) == 2
    assert "certificate and key do not load" in node.service.log()
    assert node.fake.serve_config == {}, "nothing is claimed without a certificate"


def test_a_renewal_with_a_pair_that_does_not_fit_keeps_the_current_certificate(attach, ca):
    node = attach("misfit-renewal")
    renewed_pem, _ = issue(ca, "misfit-renewal", days=120)
    node.fake.cert_pem, node.fake.key_pem = renewed_pem, issue(ca, "misfit-renewal")[1]

    node.service.process.send_signal(signal.SIGHUP)

    wait_for(lambda: "SIGHUP: certificate reload failed, keeping the current one" in node.service.log(), 20,
             "the failed reload to be logged")
    assert "certificate and key do not load" in node.service.health()["tls"]["error"]
    assert node.served_serial() == serial(node.cert_pem)
