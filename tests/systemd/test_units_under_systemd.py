"""The NixOS module's units, rendered as NixOS writes them, under systemd 252 with cgroup v2
in a QEMU guest: systemd accepts them, the NixOS VM test's own scenarios pass on them
(nixos/tests/scenarios.nix, the same script `nix flake check` runs), an ACME renewal
reaches the proxy as a reload, and an HTTPS service's tailscaled gets the node's own
certificate from a CA on this machine. The tests share one boot and run in this order;
each of the last two also runs alone (`-k`), on a tailnet `joined` as the scenarios
would have left it."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import trustme

from conftest import ACME_HOST, TLS_SERVICE, scenario_namespace
from harness import tlsclient
from harness.nixos_system import REPO

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


def test_systemd_accepts_every_rendered_unit(tier):
    out = tier.guest.succeed("systemd-analyze verify --man=no /etc/systemd/system/tsnsrv-*.service "
                             "/nix/units/changed/tsnsrv-web.service 2>&1; echo status=$?")
    assert out.strip().endswith("status=0"), out
    problems = [line for line in out.splitlines()[:-1] if "tsnsrv" in line]
    assert problems == [], problems


# Every byte of the scenarios' 1 GiB goes through an emulated CPU (TCG): 4-5 minutes on an
# idle host, far longer on a busy one, where the suite's 600 s default cut it off.
@pytest.mark.timeout(1800)
def test_the_vm_test_scenarios_pass_on_the_units_under_systemd(tier):
    namespace = scenario_namespace(tier)
    exec(compile(tier.script, "nixos/tests/scenarios.nix (testScript)", "exec"), namespace)

    done = tier.subtests.done
    print(f"{len(done)} scenarios passed:")
    for name, seconds in done:
        print(f"  {seconds:6.1f}s  {name}")
    assert len(done) == tier.script.count("with subtest(")


AUTH_KEY = "/run/keys/tsnsrv-authkey"  # the services' key file (nixos/tests/scenarios.nix)


@pytest.fixture
def joined(tier):
    """The tailnet as the VM test's script sets it up before its scenarios: alice's laptop
    logged in, and the services' auth key where their units look for it. The script does
    that when it runs first; for a test run on its own it is done here."""
    server, client = tier.machines["server"], tier.machines["client"]
    if server.execute(f"test -s {AUTH_KEY}")[0] == 0:
        return
    helpers = scenario_namespace(tier)
    exec(compile((REPO / "nixos/tests/helpers.py").read_text(), "nixos/tests/helpers.py", "exec"), helpers)
    keys = {user: helpers["preauth_key"](user) for user in ("alice", "services")}
    client.succeed(f"tailscale up --login-server={tier.headscale.url} --auth-key={keys['alice']}")
    server.succeed(f"mkdir -p /run/keys && echo '{keys['services']}' > {AUTH_KEY} && chmod 0400 {AUTH_KEY}")


def wait_until_reachable(client, ip: str) -> None:
    """The node answers the client's disco ping, through the tailnet's DERP if there is no
    direct path yet. The guest sits behind QEMU's user-mode NAT, and once the direct path
    to a restarted tailscaled of the guest was not there after ten minutes (the pong came
    through DERP); what these tests prove is the certificate served, whichever the path."""
    client.wait_until_succeeds(f"tailscale ping -c 1 --until-direct=false {ip}")


def served_serial(client, ca_path, ip: str) -> str:
    out = client.succeed(f"openssl s_client -connect {ip}:443 -servername {ACME_HOST} -CAfile {ca_path} "
                         "-verify_return_error </dev/null 2>/dev/null | openssl x509 -noout -serial")
    return out.strip().removeprefix("serial=")


def test_an_acme_renewal_reaches_the_proxy_as_a_reload(tier, joined, tmp_path):
    server, client = tier.machines["server"], tier.machines["client"]
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    directory = f"/var/lib/acme/{ACME_HOST}"

    def issue() -> str:
        """New files in the certificate's directory, as the ACME module leaves them; returns the serial."""
        leaf = ca.issue_cert(ACME_HOST)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems).decode()
        key = leaf.private_key_pem.bytes().decode()
        server.succeed(f"getent group acme || groupadd --system acme; mkdir -p {directory}; cd {directory}; "
                       f"cat > fullchain.pem.new <<'EOF'\n{chain}EOF\ncat > key.pem.new <<'EOF'\n{key}EOF\n"
                       "chgrp acme *.new; chmod 0640 *.new; mv fullchain.pem.new fullchain.pem; mv key.pem.new key.pem")
        return server.succeed(f"openssl x509 -noout -serial -in {directory}/fullchain.pem").strip().removeprefix("serial=")

    first = issue()
    server.systemctl("start --no-block tsnsrv-certs.service")
    server.wait_for_unit("tsnsrv-certs.service")
    [health] = json.loads(server.succeed("tsnsrv status --json certs"))
    ip = next(address for address in health["node"]["addresses"] if ":" not in address)
    wait_until_reachable(client, ip)
    assert served_serial(client, ca_path, ip) == first
    pid = server.succeed("systemctl show -P MainPID tsnsrv-certs.service").strip()

    renewed = issue()
    # What security.acme does with reloadServices once it has renewed a certificate.
    for unit in tier.base.acme_reloads[ACME_HOST]:
        server.succeed(f"systemctl try-reload-or-restart {unit}")

    client.wait_until_succeeds(f"test \"$(openssl s_client -connect {ip}:443 -servername {ACME_HOST} "
                               f"</dev/null 2>/dev/null | openssl x509 -noout -serial)\" = serial={renewed}", 60)
    assert served_serial(client, ca_path, ip) == renewed != first
    assert server.succeed("systemctl show -P MainPID tsnsrv-certs.service").strip() == pid  # reloaded, not restarted
    assert re.search(r"SIGHUP: certificate valid until", server.succeed("journalctl -u tsnsrv-certs.service -o cat"))


def test_an_https_service_gets_the_nodes_certificate_from_the_ca(tier, joined, tmp_path):
    server, client, pebble = tier.machines["server"], tier.machines["client"], tier.pebble
    ca_file = f"/run/tsnsrv-{TLS_SERVICE}-ca.pem"
    drop_in = f"/etc/systemd/system/tsnsrv-{TLS_SERVICE}-tailscaled.service.d"
    # Test-only environment of that tailscaled (as OFFLINE_DROP_IN): the CA's ACME directory,
    # and trust in the CA's API certificate. The guest's resolver, for the challenge's TXT
    # lookup, is the tier's recording one on this machine.
    server.succeed(f"cat > {ca_file}.new <<'EOF'\n{pebble.api_ca_file.read_text()}EOF\n"
                   f"chmod 0644 {ca_file}.new; mkdir -p {drop_in}; "
                   f"printf '[Service]\\nEnvironment=TS_DEBUG_ACME_DIRECTORY_URL={pebble.directory_url}\\n"
                   f"Environment=SSL_CERT_FILE={ca_file}\\n' > {drop_in}/acme.conf; "
                   f"echo 'nameserver {pebble.listen_ip}' > /etc/resolv.conf; systemctl daemon-reload; "
                   f"systemctl restart tsnsrv-{TLS_SERVICE}-tailscaled.service; mv {ca_file}.new {ca_file}")
    server.systemctl(f"start --no-block tsnsrv-{TLS_SERVICE}.service")
    server.wait_for_unit(f"tsnsrv-{TLS_SERVICE}.service", timeout=300)

    [health] = json.loads(server.succeed(f"tsnsrv status --json {TLS_SERVICE}"))
    host = health["node"]["dnsName"]
    ip = next(address for address in health["node"]["addresses"] if ":" not in address)
    wait_until_reachable(client, ip)
    root = pebble.write_root(tmp_path / "root.pem")
    served = json.loads(client.succeed(f"python3 {Path(tlsclient.__file__)} peer {host} {ip} 443 {root}"))

    assert served["status"] == 200
    assert pebble.issued_serials() == [served["serial"]]
    assert dt.datetime.fromisoformat(health["tls"]["notAfter"]).timestamp() == served["notAfter"]
    assert health["tls"]["source"] == f"tailscaled (certificate for {host})"
    assert tier.dns.asked(f"_acme-challenge.{host}"), "the TXT lookup stayed on this machine"
