"""A headscale control server on this machine: plain HTTP, embedded DERP and STUN, sqlite,
and a file ACL policy that tests can change (headscale reloads it on SIGHUP).

See ../shared/reference/local-tailnet.md for why each setting is what it is.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

from .processes import ManagedProcess, wait_for

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
        self.url = f"http://{listen_ip}:{port}"
        self.config_path = workdir / "config.yaml"
        self.policy_path = workdir / "policy.hujson"
        self.process = ManagedProcess("headscale", [str(binary), "-c", str(self.config_path), "serve"],
                                      workdir / "headscale.log")
        self._users: dict[str, int] = {}

    def write_config(self, policy: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        d = self.dir
        self.config_path.write_text(textwrap.dedent(f"""\
            server_url: {self.url}
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
        self.process.start()
        wait_for(self._healthy, 30, "headscale /health")
        return self

    def _healthy(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"headscale exited:\n{self.process.log_tail()}")
        with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
            return resp.status == 200

    def stop(self) -> None:
        self.process.stop()

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

    def set_policy(self, policy: dict[str, Any]) -> None:
        """Replace the ACL policy and make headscale load it now."""
        self.policy_path.write_text(json.dumps(policy, indent=2))
        self.process.send_signal(signal.SIGHUP)
