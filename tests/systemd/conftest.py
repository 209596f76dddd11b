"""The systemd tier's world: the VM test's `server` booted in a QEMU guest, and on this
host a headscale of its own and the client device (alice's laptop, in a network namespace).

Booted once per run: every test here shares it, in the order they are written (the VM
test's scenarios first, which log the client and the services in). The tier is skipped, with
the reason, where QEMU or nixpkgs' lib is missing.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from harness.headscale import Headscale, start_headscale
from harness.nixos_driver import GuestMachine, HostMachine, Subtests
from harness.nixos_system import OFFLINE_DROP_IN, REPO, STORE_PATH, Configuration, RunDisk, evaluate, test_script
from harness.nixtools import NIXPKGS_LIB, NO_LIB_REASON
from harness.pebble import Pebble
from harness.resolver import LoopbackResolver, RecordingResolver
from harness.tailnet import NetworkNamespace, TailscaleNode
from harness.vm import HOST_FROM_GUEST, Guest, guest_image, make_disk, qemu_unavailable

SWITCH_TO_CHANGED = "python3 /nix/switch.py /nix/units/changed"
ACME_HOST = "certs.test"
# The tier's own service beside the VM test's: a certificate from security.acme, which
# the VM test cannot have (no ACME server offline). Its files are the test's to write.
ACME_MODULE = f"""{{
  services.tsnsrv.services.certs = {{ acmeHost = "{ACME_HOST}"; plaintext = false; }};
  systemd.services.tsnsrv-certs.unitConfig.ConditionPathExists = "/var/lib/acme/{ACME_HOST}/fullchain.pem";
}}"""
# And one with the node's own certificate, which its tailscaled gets from the tier's CA
# (pebble): what the VM test cannot have either (no certificates from headscale). The
# test points that tailscaled at the CA when it starts the service.
TLS_SERVICE = "tls"
TLS_MODULE = f"""{{
  services.tsnsrv.services.{TLS_SERVICE}.plaintext = false;
  systemd.services.tsnsrv-{TLS_SERVICE}.unitConfig.ConditionPathExists = "/run/tsnsrv-{TLS_SERVICE}-ca.pem";
}}"""


@attrs.define
class Tier:
    guest: Guest
    headscale: Headscale
    pebble: Pebble
    dns: RecordingResolver  # the guest's resolver, once the TLS service's test points the guest at it
    machines: dict[str, object]
    subtests: Subtests
    script: str
    run_disk: RunDisk
    base: Configuration


def write_wrappers(directory: Path, bin_dir: Path, headscale: Headscale, client: TailscaleNode) -> None:
    """The CLIs as the script calls them, pointed at this run's daemons."""
    directory.mkdir(parents=True, exist_ok=True)
    wrappers = {
        "headscale": f'exec {shlex.quote(str(headscale.binary))} -c {shlex.quote(str(headscale.config_path))} "$@"',
        # The client is a kernel-TUN node in a namespace: no DNS or netfilter changes there.
        "tailscale": (f'real={shlex.quote(str(bin_dir / "tailscale"))} socket={shlex.quote(str(client.socket))}\n'
                      'if [ "$1" = up ]; then shift; exec "$real" --socket="$socket" up --hostname=client '
                      '--accept-dns=false --netfilter-mode=off --timeout=120s "$@"; fi\n'
                      'exec "$real" --socket="$socket" "$@"'),
        "python3": f'exec {shlex.quote(sys.executable)} "$@"',
    }
    for name, body in wrappers.items():
        path = directory / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


INSTALL_UNITS = """
set -e
while read -r group; do getent group "$group" >/dev/null || groupadd --system "$group"; done </nix/units/base/groups
cp /nix/units/base/tmpfiles.conf /etc/tmpfiles.d/nixos-tsnsrv.conf
systemd-tmpfiles --create /etc/tmpfiles.d/nixos-tsnsrv.conf
cp /nix/units/base/*.service /etc/systemd/system/
python3 - <<'EOF'
import json, os
for unit, targets in json.load(open("/nix/units/base/wanted-by.json")).items():
    for target in targets:
        os.makedirs(f"/etc/systemd/system/{target}.wants", exist_ok=True)
        link = f"/etc/systemd/system/{target}.wants/{unit}"
        if not os.path.lexists(link):
            os.symlink(f"../{unit}", link)
EOF
mkdir -p /etc/systemd/system/tsnsrv-.service.d
cp /nix/offline.conf /etc/systemd/system/tsnsrv-.service.d/offline.conf
ln -sf /nix/store/*-tsnsrv-[0-9]*/bin/tsnsrv /usr/local/bin/tsnsrv
systemctl daemon-reload
systemctl start multi-user.target
"""


@pytest.fixture(scope="session")
def tier(bin_dir: Path, cert_bin_dir: Path, node_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    unavailable = qemu_unavailable() or (None if NIXPKGS_LIB is not None else NO_LIB_REASON)
    if unavailable:
        pytest.skip(unavailable)
    image = guest_image()
    work = tmp_path_factory.mktemp("systemd-tier")
    block = os.getpid() % 250 + 1
    # .4/30 of the block: the bench takes .0/30 of the same 198.19.x.0/24.
    namespace = NetworkNamespace(f"tsv{os.getpid()}", f"198.19.{block}.5", f"198.19.{block}.6").create()
    stack: list = [namespace.destroy]
    try:
        # headscale with the test patch, so that the TLS service's node may ask for a
        # certificate; to every other service it is headscale as shipped (the patch adds
        # CertDomains, which only a node asking for a certificate reads, and answers
        # /machine/set-dns, which only such a node calls).
        headscale = start_headscale(bin_dir, namespace.host_ip, work / "headscale",
                                    binary=cert_bin_dir / "headscale")
        stack.append(headscale.close)
        pebble = Pebble(cert_bin_dir / "pebble", work / "pebble", namespace.host_ip).start()
        stack.append(pebble.stop)
        resolver = LoopbackResolver({}, address=namespace.host_ip).start()
        stack.append(resolver.stop)
        headscale.relay_into(namespace)
        client = TailscaleNode("client", bin_dir, work / "client", namespace).start()
        stack.append(client.stop)
        wrappers = work / "bin"
        write_wrappers(wrappers, bin_dir, headscale, client)

        scenario_args = {"serverLoginServer": f"http://{HOST_FROM_GUEST}:{headscale.relay_port}",
                         "clientLoginServer": headscale.url, "controlPort": headscale.relay_port,
                         "switchToChanged": SWITCH_TO_CHANGED}
        disk = RunDisk(work / "run-disk", node_bin_dir)  # the guest's pkgs.tailscale
        base = evaluate(scenario_args, [ACME_MODULE, TLS_MODULE], changed=False)
        disk.add_configuration("base", base)
        disk.add_configuration("changed", evaluate(scenario_args, [ACME_MODULE, TLS_MODULE], changed=True))
        script = test_script(scenario_args)
        for path in set(STORE_PATH.findall(script)):
            disk.provide(path)
        (disk.root / "switch.py").write_text((REPO / "tests" / "systemd" / "switch.py").read_text())
        (disk.root / "offline.conf").write_text(OFFLINE_DROP_IN)
        make_disk(disk.root, work / "run-disk.ext4")

        guest = Guest(image, work, work / "run-disk.ext4")
        stack.append(guest.stop)
        guest.boot()
        print(f"guest booted in {guest.boot_seconds:.0f}s")
        guest.succeed(INSTALL_UNITS, timeout=600)

        subtests = Subtests()
        machines = {
            "server": GuestMachine("server", guest),
            "headscale": HostMachine("headscale", str(wrappers),
                                     unit_checks={"headscale.service": lambda: headscale.process.running}),
            "client": HostMachine("client", str(wrappers), netns_prefix=namespace.command([]),
                                  unit_checks={"tailscaled.service": lambda: client.process.running}),
        }
        yield Tier(guest, headscale, pebble, resolver.resolver, machines, subtests, script, disk, base)
    finally:
        for undo in reversed(stack):
            undo()


def scenario_namespace(tier: Tier) -> dict[str, object]:
    """What the test driver hands a testScript."""
    return {**tier.machines, "subtest": tier.subtests, "start_all": lambda: None, "json": json}
