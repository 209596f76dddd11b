"""pebble, Let's Encrypt's test ACME server: the CA that real tailscaleds get their
nodes' certificates from in the TLS and Funnel tests (scripts/cert-test-binaries builds
it with the fixes in patches/pebble-*.patch).

It listens on a harness address (198.18.0.0/15), never on 127.0.0.1: the loopback guard
keeps a service's tailscaled off host loopback. Its ACME API speaks HTTPS with a
certificate from a trustme CA of the test (`api_ca_file`), which only the tailscaleds
are told to trust. The certificates it issues chain up to a root it makes at start-up
(`root_pem()`), new on every start. DNS-01 challenges are taken as valid without a
lookup (PEBBLE_VA_ALWAYS_VALID): headscale does not publish the TXT records. Its renewal
information (ARI) suggests the window Let's Encrypt suggests, 2 % of the lifetime wide
(patched: pebble's own spans the whole life of a short certificate, and tailscaled renews
in the background once a random point of that window has passed).
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.request
from pathlib import Path

import trustme

from .processes import ManagedProcess, free_port, wait_for

DEFAULT_LIFETIME = 90 * 24 * 3600  # seconds, as Let's Encrypt's classic certificates

ENV = {
    "PEBBLE_VA_ALWAYS_VALID": "1",  # no DNS-01 lookup: nobody publishes the record
    "PEBBLE_VA_NOSLEEP": "1",       # no random 0-15 s pause before validating
    "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce answers (5 % by default)
    "PEBBLE_AUTHZREUSE": "0",       # a new authorization for every order, as tailscaled's client expects
}


class Pebble:
    def __init__(self, binary: Path, workdir: Path, listen_ip: str, lifetime: int = DEFAULT_LIFETIME,
                 refused_names: tuple[str, ...] = ()):
        """`lifetime` of the certificates it issues, in seconds; `refused_names` it will not certify."""
        self.dir = workdir
        self.listen_ip = listen_ip
        self.port, self.management_port = free_port(listen_ip), free_port(listen_ip)
        self.directory_url = f"https://{listen_ip}:{self.port}/dir"
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # tailscaleds run as the unprivileged test account and read api_ca_file
        api_ca = trustme.CA()
        self.api_ca_file = workdir / "api-ca.pem"
        api_ca.cert_pem.write_to_path(str(self.api_ca_file))
        self.api_ca_file.chmod(0o644)
        listener = api_ca.issue_cert(listen_ip)
        listener.cert_chain_pems[0].write_to_path(str(workdir / "api-cert.pem"))
        listener.private_key_pem.write_to_path(str(workdir / "api-key.pem"))
        config = {"pebble": {
            "listenAddress": f"{listen_ip}:{self.port}",
            "managementListenAddress": f"{listen_ip}:{self.management_port}",
            "certificate": str(workdir / "api-cert.pem"), "privateKey": str(workdir / "api-key.pem"),
            "httpPort": 0, "tlsPort": 0,  # only DNS-01, which tailscaled uses
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "domainBlocklist": list(refused_names),
            "keyAlgorithm": "ecdsa",
            "profiles": {"default": {"description": "the tests' certificates", "validityPeriod": lifetime}},
        }}
        (workdir / "pebble.json").write_text(json.dumps(config, indent=2))
        self.process = ManagedProcess(
            "pebble", [str(binary), "-config", str(workdir / "pebble.json"), "-dnsserver", f"{listen_ip}:53"],
            workdir / "pebble.log", env=ENV)
        self._api_context = ssl.create_default_context(cafile=str(self.api_ca_file))

    def start(self) -> Pebble:
        self.process.start()
        wait_for(self._answers, 30, "pebble's ACME directory")
        return self

    def _answers(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"pebble exited:\n{self.process.log_tail()}")
        with urllib.request.urlopen(self.directory_url, timeout=2, context=self._api_context) as response:
            return response.status == 200

    def stop(self) -> None:
        self.process.stop()

    def root_pem(self) -> bytes:
        """The root its certificates chain up to (made at start-up: a restart makes a new one)."""
        url = f"https://{self.listen_ip}:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, timeout=5, context=self._api_context) as response:
            return response.read()

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root_pem())
        path.chmod(0o644)
        return path

    def issued_serials(self) -> list[int]:
        """Serial numbers of the certificates issued so far, in order."""
        return [int(serial, 16) for serial in re.findall(r"Issued certificate serial ([0-9a-f]+)",
                                                         self.process.log_text())]
