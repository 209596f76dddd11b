"""A second local tailnet, where nodes get real HTTPS certificates and may use Funnel.

Its control server is headscale with our test patch (patches/headscale-*.patch: the
node's own name in CertDomains, /machine/set-dns answered, the `funnel` attribute and
the ingress grant allowed in the policy); its CA is pebble (pebble.py); its client
device is a second laptop of alice's, in a network namespace of its own. The stock
headscale stays what the other tests use: it is what users run, and the tests of what
happens without certificates need it.

DNS stays on this machine: tailscaled looks up the challenge's TXT record through the
system resolver before it asks the CA to validate. The services of this tailnet run in
a private mount namespace whose /etc/resolv.conf names a recording resolver on this
tailnet's harness address (not on host loopback, which other test sessions may be
using and where the loopback guard allows tailscaled UDP only).

Everything listens on that one harness address (198.19.B.9, the host side of the
laptop's namespace): headscale with its DERP and STUN, pebble, the resolver, and the
stand-in Funnel relay's public side.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from .headscale import Headscale, start_headscale
from .pebble import DEFAULT_LIFETIME, Pebble
from .resolver import LoopbackResolver, RecordingResolver, private_resolv_conf_prefix
from .tailnet import ClientDevice, NetworkNamespace, TailscaleNode

BASE_DOMAIN = "tailnet.test"
REFUSED_NAME = f"refused-by-ca.{BASE_DOMAIN}"  # the session's pebble refuses to certify this name
INGRESS_CAP = "https://tailscale.com/cap/ingress"

# Tailscale derives the `https` attribute from the tailnet's HTTPS setting and the
# funnel-ports one from `funnel`; headscale knows neither, so the policy grants them.
CERT_POLICY: dict[str, Any] = {
    "tagOwners": {"tag:public": ["alice@"], "tag:public-443": ["alice@"], "tag:relay": ["alice@"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    # The stand-in relay may hand connections to every node, as Tailscale's relays may:
    # whether a node takes them is the node's Serve config's business.
    "grants": [{"src": ["tag:relay"], "dst": ["*"], "app": {INGRESS_CAP: [{}]}}],
    "nodeAttrs": [
        {"target": ["tag:public"],
         "attr": ["funnel", "https", "https://tailscale.com/cap/funnel-ports?ports=443,8443,10000"]},
        {"target": ["tag:public-443"], "attr": ["funnel", "https", "https://tailscale.com/cap/funnel-ports?ports=443"]},
    ],
}


class CertTailnet:
    def __init__(self, bin_dir: Path, cert_bin_dir: Path, node_bin_dir: Path, workdir: Path, shared_dir: Path):
        """`node_bin_dir`: the tailscale build the services' tailscaleds run (the laptop
        runs bin_dir's); `shared_dir`: where files go that those (the unprivileged test
        account) must read or run."""
        self.bin_dir, self.cert_bin_dir, self.dir, self.shared_dir = bin_dir, cert_bin_dir, workdir, shared_dir
        self.node_bin_dir = node_bin_dir
        block = os.getpid() % 250 + 1
        # .8/30 of the block: the bench takes .0/30 of the same 198.19.x.0/24, the systemd tier .4/30.
        self.netns = NetworkNamespace(f"tsc{os.getpid()}", f"198.19.{block}.9", f"198.19.{block}.10")
        self.ip = self.netns.host_ip
        self.resolv_conf = shared_dir / "resolv.conf"
        self._resolver: LoopbackResolver | None = None
        self.headscale: Headscale | None = None
        self.pebble: Pebble | None = None
        self.laptop: ClientDevice | None = None
        self._pebbles: list[Pebble] = []

    def start(self) -> CertTailnet:
        self.netns.create()
        self._resolver = LoopbackResolver({}, address=self.ip).start()
        self.resolv_conf.write_text(f"nameserver {self.ip}\n")
        self.resolv_conf.chmod(0o644)
        self.headscale = start_headscale(self.bin_dir, self.ip, self.dir / "headscale", CERT_POLICY,
                                         binary=self.cert_bin_dir / "headscale")
        self.headscale.relay_into(self.netns)
        self.pebble = self.new_pebble("pebble", refused_names=(REFUSED_NAME,)).start()
        node = TailscaleNode("cert-laptop", self.bin_dir, self.dir / "laptop", self.netns).start()
        node.up(self.headscale.url, self.headscale.auth_key("alice"))
        self.laptop = ClientDevice(node)
        return self

    @property
    def dns(self) -> RecordingResolver:
        """The services' resolver: what their tailscaleds looked up."""
        assert self._resolver is not None
        return self._resolver.resolver

    def new_pebble(self, name: str, lifetime: int = DEFAULT_LIFETIME, refused_names: tuple[str, ...] = ()) -> Pebble:
        """Another CA (not started), e.g. with short-lived certificates; stopped with the tailnet."""
        pebble = Pebble(self.cert_bin_dir / "pebble", self.shared_dir / name, self.ip, lifetime, refused_names)
        self._pebbles.append(pebble)
        return pebble

    def tailscaled_for(self, pebble: Pebble) -> Path:
        """A tailscaled whose ACME client uses `pebble` and trusts its API's certificate; the
        environment is the tailscaled's only, not tsnsrv's (whose own TLS stays untouched)."""
        wrapper = self.shared_dir / f"tailscaled-{pebble.dir.name}"
        wrapper.write_text("#!/bin/sh\n"
                           f"export TS_DEBUG_ACME_DIRECTORY_URL={shlex.quote(pebble.directory_url)}\n"
                           f"export SSL_CERT_FILE={shlex.quote(str(pebble.api_ca_file))}\n"
                           f'exec {shlex.quote(str(self.node_bin_dir / "tailscaled"))} "$@"\n')
        wrapper.chmod(0o755)
        return wrapper

    def service_options(self, pebble: Pebble | None = None) -> dict[str, Any]:
        """How Tsnsrv runs a service on this tailnet: its resolver, its CA."""
        assert self.pebble is not None
        return {"command_prefix": private_resolv_conf_prefix(self.resolv_conf),
                "tailscaled": self.tailscaled_for(pebble or self.pebble)}

    def root_file(self, pebble: Pebble | None = None) -> Path:
        """The CA file a client verifies `pebble`'s certificates with (its current root)."""
        pebble = pebble or self.pebble
        assert pebble is not None
        return pebble.write_root(pebble.dir / "root.pem")

    def https(self, host: str, ip: str, path: str, *curl_args: str, ca_file: Path | None = None,
              port: int = 443) -> subprocess.CompletedProcess:
        """curl on the laptop: https://host:port/path at `ip`, verified against pebble's root."""
        assert self.laptop is not None
        return self.laptop.curl("--cacert", str(ca_file or self.root_file()), "--resolve", f"{host}:{port}:{ip}",
                                *curl_args, f"https://{host}:{port}{path}")

    def close(self) -> None:
        if self.laptop is not None:
            self.laptop.node.stop()
        for pebble in self._pebbles:
            pebble.stop()
        if self.headscale is not None:
            self.headscale.close()
        if self._resolver is not None:
            self._resolver.stop()
        self.netns.destroy()
