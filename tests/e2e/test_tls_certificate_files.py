"""HTTPS over the real tailnet with the operator's own certificate files (what NixOS
users point at ACME), swapped on SIGHUP without a restart."""

from __future__ import annotations

import signal

import pytest
import trustme
from cryptography import x509

from harness.processes import wait_for
from harness.tlsclient import peer_certificate
from harness.upstream import echo

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


def write_pair(ca: trustme.CA, host: str, directory) -> int:
    cert = ca.issue_cert(host)
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def test_own_certificate_files_serve_https_and_are_swapped_on_sighup(make_tsnsrv, upstream, laptop, service_dir):
    ca = trustme.CA()
    host = "tls-files.tailnet.test"
    first_serial = write_pair(ca, host, service_dir)
    ca_file = service_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    service = make_tsnsrv("tls-files", upstream.url, "--cert-file", str(service_dir / "cert.pem"),
                          "--key-file", str(service_dir / "key.pem"), plaintext=False)
    resolve = f"{host}:443:{service.ip}"

    seen = echo(laptop.curl("--cacert", str(ca_file), "--resolve", resolve, f"https://{host}/over-tls").stdout)
    assert seen["path"] == "/over-tls"
    assert dict(seen["headers"])["X-Tailscale-User-LoginName"].startswith("alice")
    assert dict(seen["headers"])["X-Forwarded-Proto"] == "https"
    assert service.health()["tls"]["source"] == str(service_dir / "cert.pem")

    def served_serial() -> int:
        return peer_certificate(laptop, host, service.ip, ca_file)["serial"]

    assert served_serial() == first_serial
    plain = laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{service.ip}/")
    assert plain.stdout == b"000", "with TLS on 443 nothing answers plain HTTP on port 80"

    second_serial = write_pair(ca, host, service_dir)
    service.process.send_signal(signal.SIGHUP)
    wait_for(lambda: served_serial() == second_serial, 20, "the renewed certificate to be served")
    assert service.process.running
