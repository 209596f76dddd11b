"""HTTPS with the node's own certificate, from a REAL tailscaled: its ACME client gets
the certificate from a local CA (pebble) after a patched headscale took its DNS-01
record, and tsnsrv serves it (harness/certtailnet.py says how that tailnet is built).

What these prove that the fake LocalAPI could not: the LocalAPI call tsnsrv makes gets a
real chain a client verifies; the challenge's TXT lookup stays on this machine; renewal
of short-lived certificates happens once, two thirds into their life, while requests and
a websocket go on; a restart needs no CA while the cached certificate is valid; and what
tsnsrv says when tailscaled cannot get a certificate.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess

import pytest

from harness.certtailnet import REFUSED_NAME
from harness.processes import wait_for
from harness.tlsclient import peer_certificate, watch_renewal
from harness.tsnsrv import tsnsrv_command
from harness.upstream import echo

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node

UTC = dt.timezone.utc


def status_of(service, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([tsnsrv_command(), "status", "--socket", str(service.control_socket), *flags],
                          capture_output=True, text=True, timeout=30)


def test_the_node_certificate_comes_from_the_ca_through_tailscaled(cert_tsnsrv, cert_tailnet, upstream):
    issued_before = cert_tailnet.pebble.issued_serials()  # the session's CA serves other tests too
    service = cert_tsnsrv("tls-real", upstream.url)
    host = service.health()["node"]["dnsName"]
    assert host == "tls-real.tailnet.test"

    seen = echo(cert_tailnet.https(host, service.ip, "/over-tls").stdout)
    assert seen["path"] == "/over-tls"
    assert dict(seen["headers"])["X-Tailscale-User-LoginName"].startswith("alice")
    assert dict(seen["headers"])["X-Forwarded-Proto"] == "https"

    served = peer_certificate(cert_tailnet.laptop, host, service.ip, cert_tailnet.root_file())
    assert cert_tailnet.pebble.issued_serials() == [*issued_before, served["serial"]]
    assert served["notAfter"] - served["notBefore"] == pytest.approx(90 * 86400, abs=2)
    # the challenge's TXT record was looked up here, and headscale was asked to set it
    assert cert_tailnet.dns.asked(f"_acme-challenge.{host}")
    assert f"name=_acme-challenge.{host}" in cert_tailnet.headscale.process.log_text()

    health = service.health()
    assert health["tls"]["source"] == f"tailscaled (certificate for {host})" and health["tls"]["error"] is None
    assert dt.datetime.fromisoformat(health["tls"]["notAfter"]).timestamp() == served["notAfter"]
    assert service.metric("tsnsrv_certificate_expiry_timestamp_seconds") == served["notAfter"]
    table = status_of(service)
    expiry = dt.datetime.fromtimestamp(served["notAfter"], UTC)
    assert table.returncode == 0 and f"{expiry:%Y-%m-%d} (90d)" in table.stdout, table.stdout
    assert json.loads(status_of(service, "--json").stdout)[0]["tls"]["notAfter"] == health["tls"]["notAfter"]

    plain = cert_tailnet.laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}/")
    assert plain.stdout == b"000", "with TLS on 443 nothing answers plain HTTP on port 80"


def test_a_name_the_ca_refuses_is_reported_and_not_served(cert_tsnsrv, upstream):
    name = REFUSED_NAME.split(".")[0]
    service = cert_tsnsrv(name, upstream.url, start=False)
    service.start(wait=False)

    error = wait_for(lambda: service.health()["tls"]["error"], 60, "the certificate error in /health")
    assert f"tailscaled could not get a certificate for {REFUSED_NAME}" in error
    assert "rejectedIdentifier" in error, error
    assert not service.health()["ready"]
    assert f"TLS: tailscaled could not get a certificate for {REFUSED_NAME}" in service.log()
    table = status_of(service)
    assert table.returncode == 1 and "Running, no certificate" in table.stdout, table.stdout
    assert service.process.running, "it waits for a certificate (the CA may change its mind), not exits"


def test_a_ca_that_is_down_delays_readiness_until_it_answers(cert_tsnsrv, cert_tailnet, upstream):
    pebble = cert_tailnet.new_pebble("pebble-late")  # not started yet
    service = cert_tsnsrv("ca-late", upstream.url, pebble=pebble, start=False)
    service.start(wait=False)

    error = wait_for(lambda: service.health()["tls"]["error"], 60, "the certificate error in /health")
    assert "could not get a certificate for ca-late.tailnet.test" in error and "connection refused" in error, error
    assert not service.health()["ready"]

    pebble.start()
    service.wait_ready(90)
    assert service.health()["tls"]["error"] is None
    host = "ca-late.tailnet.test"
    served = peer_certificate(cert_tailnet.laptop, host, service.ip, cert_tailnet.root_file(pebble))
    assert pebble.issued_serials() == [served["serial"]]


def test_a_control_server_without_certificates_is_refused_at_start(make_tsnsrv, upstream):
    # The stock headscale, as users run it, offers no certificates.
    service = make_tsnsrv("no-certs", upstream.url, plaintext=False, start=False)
    service.start(wait=False)
    assert service.process.wait(60) == 2
    assert "TLS: the control server offers no HTTPS certificate for no-certs." in service.log()
    assert "Use --plaintext, or --cert-file/--key-file" in service.log()


def test_a_short_lived_certificate_is_renewed_once_two_thirds_in_while_clients_carry_on(cert_tsnsrv, cert_tailnet,
                                                                                          upstream):
    lifetime = 60
    pebble = cert_tailnet.new_pebble("pebble-short", lifetime=lifetime).start()
    service = cert_tsnsrv("short-lived", upstream.url, pebble=pebble)
    host, root = "short-lived.tailnet.test", cert_tailnet.root_file(pebble)
    first = peer_certificate(cert_tailnet.laptop, host, service.ip, root)
    assert pebble.issued_serials() == [first["serial"]]

    # Asking again well before the renewal point gets the same certificate: with a fixed
    # 14 days of min_validity, every ask of a certificate this short issued a new one.
    # (Asked without min_validity, tailscaled renews by itself only once the CA's renewal
    # window has come: for a certificate this short, as Let's Encrypt's, halfway through.)
    service.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: certificate valid until" in service.log(), 20, "the SIGHUP reload")
    assert pebble.issued_serials() == [first["serial"]]

    seen = watch_renewal(cert_tailnet.laptop, host, service.ip, root, timeout=lifetime * 1.5)

    assert seen["failures"] == []
    assert len(seen["serials"]) == 2 and seen["serials"][0] == first["serial"], seen
    assert seen["echoes"]["before"] >= 1 and seen["echoes"]["after"] >= 1, "the websocket lived through it"
    renewed = peer_certificate(cert_tailnet.laptop, host, service.ip, root)
    assert renewed["serial"] == seen["serials"][1]
    assert pebble.issued_serials() == [first["serial"], renewed["serial"]], "one renewal, no more"
    renewed_after = renewed["notBefore"] - first["notBefore"]
    assert lifetime * 2 / 3 <= renewed_after < lifetime, renewed_after
    assert service.metric("tsnsrv_certificate_expiry_timestamp_seconds") == renewed["notAfter"]


def test_a_renewal_the_ca_cannot_serve_keeps_the_current_certificate_and_says_so(cert_tsnsrv, cert_tailnet,
                                                                                  upstream):
    pebble = cert_tailnet.new_pebble("pebble-gone", lifetime=30).start()
    service = cert_tsnsrv("ca-gone", upstream.url, pebble=pebble)
    host, root = "ca-gone.tailnet.test", cert_tailnet.root_file(pebble)
    first = peer_certificate(cert_tailnet.laptop, host, service.ip, root)

    pebble.stop()
    error = wait_for(lambda: service.health()["tls"]["error"], 60, "the failed renewal in /health")

    assert "could not get a certificate for ca-gone.tailnet.test" in error, error
    assert "certificate renewal failed, still serving the one valid until" in service.log()
    assert service.health()["ready"]
    assert peer_certificate(cert_tailnet.laptop, host, service.ip, root)["serial"] == first["serial"]


def test_a_restart_serves_the_cached_certificate_while_the_ca_is_down(cert_tsnsrv, cert_tailnet, upstream):
    pebble = cert_tailnet.new_pebble("pebble-restart", lifetime=120).start()
    service = cert_tsnsrv("ca-away", upstream.url, pebble=pebble)
    host, root = "ca-away.tailnet.test", cert_tailnet.root_file(pebble)
    first = peer_certificate(cert_tailnet.laptop, host, service.ip, root)
    assert service.stop() == 0
    pebble.stop()

    service.start(clients=[cert_tailnet.laptop.node])

    assert peer_certificate(cert_tailnet.laptop, host, service.ip, root)["serial"] == first["serial"]
    assert pebble.issued_serials() == [first["serial"]]
