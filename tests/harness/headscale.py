"""A headscale control server on this machine: plain HTTP, embedded DERP and STUN, sqlite,
and a file ACL policy that tests can change (headscale reloads it on SIGHUP).

Nodes log in through a relay on 127.0.0.1 (one on the host, one inside each client
namespace), not at headscale's 198.18.x.y address: tailscale treats a plain-HTTP
control URL on a non-private IP as possibly public, and after one failed dial it insists
on port 443 for as long as it keeps retrying, so it would never find a restarted
headscale again. A loopback URL is "private" and keeps using plain HTTP on its port.

See ../shared/reference/local-tailnet.md for why each setting is what it is.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import textwrap
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .processes import ManagedProcess, free_port, wait_for

if TYPE_CHECKING:
    from .tailnet import NetworkNamespace

# Everyone reaches everything; alice may hand out the tags the tests use.
ALLOW_ALL_POLICY: dict[str, Any] = {
    "tagOwners": {"tag:ci": ["alice@"], "tag:server": ["alice@"], "tag:family": ["alice@"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}


class Headscale:
    def __init__(self, binary: Path, workdir: Path, listen_ip: str, port: int, stun_port: int):
        self.binary = binary
        self.dir = workdir
        self.listen_ip = listen_ip
        self.port = port
        self.stun_port = stun_port
        self.server_url = f"http://{listen_ip}:{port}"  # what headscale calls itself (login URLs, DERP)
        self.relay_port = free_port()
        self.url = f"http://127.0.0.1:{self.relay_port}"  # what nodes log in to
        self.config_path = workdir / "config.yaml"
        self.policy_path = workdir / "policy.hujson"
        self.process = ManagedProcess("headscale", [str(binary), "-c", str(self.config_path), "serve"],
                                      workdir / "headscale.log")
        self._relays = [self._relay(None)]
        self._users: dict[str, int] = {}

    def _relay(self, netns: NetworkNamespace | None) -> ManagedProcess:
        argv = ["socat", f"TCP-LISTEN:{self.relay_port},bind=127.0.0.1,fork,reuseaddr",
                f"TCP:{self.listen_ip}:{self.port}"]
        name = f"headscale-relay-{netns.name if netns else 'host'}"
        return ManagedProcess(name, netns.command(argv) if netns else argv, self.dir / f"{name}.log")

    def relay_into(self, netns: NetworkNamespace) -> None:
        """Make `url` work inside `netns` too."""
        relay = self._relay(netns)
        relay.start()
        self._relays.append(relay)
        wait_for(lambda: subprocess.run(netns.command(["curl", "-sf", f"{self.url}/health"]),
                                        capture_output=True).returncode == 0, 30, f"the headscale relay in {netns.name}")

    def write_config(self, policy: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        d = self.dir
        self.config_path.write_text(textwrap.dedent(f"""\
            server_url: {self.server_url}
            listen_addr: {self.listen_ip}:{self.port}
            noise:
              private_key_path: {d}/noise_private.key
            prefixes:
              v4: 100.64.0.0/10
              v6: fd7a:115c:a1e0::/48
              allocation: random  # as Tailscale does: tests must not depend on addresses
            derp:
              server:
                enabled: true
                region_id: 999
                region_code: test
                region_name: Test embedded DERP
                verify_clients: true
                stun_listen_addr: {self.listen_ip}:{self.stun_port}
                private_key_path: {d}/derp_server_private.key
                automatically_add_embedded_derp_region: true
                ipv4: {self.listen_ip}
                # "none", not "": with an empty address netcheck still plans IPv6 STUN
                # probes on hosts with IPv6 and waits 3 s for them before going Running.
                ipv6: none
              urls: []
              paths: []
              auto_update_enabled: false
            disable_check_updates: true
            node:
              expiry: 0
              ephemeral:
                inactivity_timeout: 120s
            database:
              type: sqlite
              sqlite:
                path: {d}/db.sqlite
                write_ahead_log: true
            log:
              level: info
            policy:
              mode: file
              path: {self.policy_path}
            dns:
              magic_dns: true
              base_domain: tailnet.test
              override_local_dns: false
              nameservers:
                global: []
            unix_socket: {d}/headscale.sock
            unix_socket_permission: "0770"
            logtail:
              enabled: false
            """))
        self.policy_path.write_text(json.dumps(policy, indent=2))

    def start(self) -> Headscale:
        if not self._relays[0].running:
            self._relays[0].start()
        self.process.start()
        wait_for(self._healthy, 30, "headscale /health")
        return self

    def _healthy(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"headscale exited:\n{self.process.log_tail()}")
        with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
            return resp.status == 200

    def stop(self) -> None:
        """Stop headscale itself; the relays stay, as a load balancer in front of it would."""
        self.process.stop()

    def close(self) -> None:
        self.stop()
        for relay in self._relays:
            relay.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str) -> Any:
        result = subprocess.run([str(self.binary), "-c", str(self.config_path), *args, "-o", "json"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise AssertionError(f"headscale {' '.join(args)} failed: {result.stderr or result.stdout}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def user(self, name: str) -> int:
        """The id of user `name`, created on first use."""
        if name not in self._users:
            self._users[name] = int(self.cli("users", "create", name)["id"])
        return self._users[name]

    def auth_key(self, user: str | None = None, tags: list[str] | None = None, ephemeral: bool = False,
                 reusable: bool = True) -> str:
        args = ["preauthkeys", "create", "-e", "2h"]
        if user is not None:
            args += ["-u", str(self.user(user))]
        if tags:
            args += ["--tags", ",".join(tags)]
        if reusable:
            args.append("--reusable")
        if ephemeral:
            args.append("--ephemeral")
        return self.cli(*args)["key"]

    def nodes(self) -> list[dict[str, Any]]:
        return self.cli("nodes", "list") or []

    def node_names(self) -> list[str]:
        return sorted(node.get("given_name") or node.get("name") for node in self.nodes())

    def delete_nodes(self, names: set[str]) -> None:
        """Remove these nodes from the tailnet (they leave every other node's network map)."""
        for node in self.nodes():
            if (node.get("given_name") or node.get("name")) in names:
                self.cli("nodes", "delete", "--identifier", str(node["id"]), "--force")

    def set_policy(self, policy: dict[str, Any]) -> None:
        """Replace the ACL policy and make headscale load it now."""
        self.policy_path.write_text(json.dumps(policy, indent=2))
        self.process.send_signal(signal.SIGHUP)


def start_headscale(bin_dir: Path, host_ip: str, workdir: Path, policy: dict[str, Any] = ALLOW_ALL_POLICY,
                    binary: Path | None = None) -> Headscale:
    """A headscale on `host_ip` (free ports), started and healthy; `binary` replaces bin_dir's."""
    server = Headscale(binary or bin_dir / "headscale", workdir, host_ip, free_port(host_ip),
                       free_port(host_ip, socket.SOCK_DGRAM))
    server.write_config(policy)
    return server.start()
