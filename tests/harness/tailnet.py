"""Tailnet members for the tests: plain tailscaled nodes, and a client device in its own
network namespace that tests use the way a laptop would (curl, websocket clients, load
tools), over a kernel TUN interface.

Every tailscaled gets the offline knobs of ../shared/reference/local-tailnet.md §2.4:
no log upload, no portmapper, DERP over plain HTTP, no interface addresses advertised,
and a guard against ever dialling Tailscale's own control plane.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import janitor
from .processes import ManagedProcess, wait_for

OFFLINE_ENV = {
    "TS_NO_LOGS_NO_SUPPORT": "true",
    "TS_DISABLE_PORTMAPPER": "1",
    "TS_DEBUG_USE_DERP_HTTP": "1",
    "TS_DEBUG_OMIT_LOCAL_ADDRS": "1",
    "TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
}


def offline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV, **extra}


class NetworkNamespace:
    """A network namespace joined to the host by a veth pair with 198.18.0.0/15 addresses."""

    def __init__(self, name: str, host_ip: str, ns_ip: str, prefix: int = 30):
        self.name = name
        self.host_ip = host_ip
        self.ns_ip = ns_ip
        self.prefix = prefix
        self.host_if = f"{name[:11]}-h"
        self.etc_dir = Path("/etc/netns") / name

    def create(self) -> NetworkNamespace:
        for network in (ipaddress.ip_network(f"{self.host_ip}/{self.prefix}", strict=False),):
            assert network.subnet_of(ipaddress.ip_network("198.18.0.0/15")), "test addresses stay in 198.18.0.0/15"
        self.destroy()
        run = _ip
        janitor.namespace(self.name, self.host_if)
        run("netns", "add", self.name)
        run("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        run("addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.host_if)
        run("link", "set", self.host_if, "up")
        run("-n", self.name, "addr", "add", f"{self.ns_ip}/{self.prefix}", "dev", "eth0")
        run("-n", self.name, "link", "set", "eth0", "up")
        run("-n", self.name, "link", "set", "lo", "up")
        # `ip netns exec` bind-mounts these over /etc: the client's tailscaled cannot touch
        # the host's resolv.conf, and resolves nothing outside.
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        (self.etc_dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        return self

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(self.etc_dir, ignore_errors=True)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class TailscaleNode:
    """One tailscaled plus the `tailscale` CLI pointed at it.

    In a network namespace it uses a kernel TUN device; on the host it runs in userspace
    mode, and `socks5_port` makes it a SOCKS5 proxy into the tailnet for clients there.
    """

    def __init__(self, name: str, bin_dir: Path, workdir: Path, netns: NetworkNamespace | None = None,
                 socks5_port: int | None = None, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None):
        self.name = name
        self.bin_dir = bin_dir
        self.dir = workdir
        self.netns = netns
        self.socks5_port = socks5_port
        self.socket = workdir / "tailscaled.sock"
        tun = "tailscale0" if netns else "userspace-networking"
        argv = [str(bin_dir / "tailscaled"), f"--tun={tun}", f"--statedir={workdir}", f"--socket={self.socket}",
                "--port=0", "--no-logs-no-support"]
        if socks5_port is not None:
            argv.append(f"--socks5-server=127.0.0.1:{socks5_port}")
        argv += extra_args
        if netns is not None:
            argv = netns.command(argv)
        self.process = ManagedProcess(f"tailscaled-{name}", argv, workdir / "tailscaled.log",
                                      env=offline_env(TS_LOGS_DIR=str(workdir), **(env or {})))

    def start(self) -> TailscaleNode:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        wait_for(lambda: self._cli_ok("status", "--json"), 30, f"{self.name}'s LocalAPI")
        return self

    def _cli_ok(self, *args: str) -> bool:
        if not self.process.running:
            raise AssertionError(f"tailscaled {self.name} exited:\n{self.process.log_tail()}")
        return subprocess.run(self.cli_argv(*args), capture_output=True, timeout=10).returncode == 0

    def cli_argv(self, *args: str) -> list[str]:
        argv = [str(self.bin_dir / "tailscale"), f"--socket={self.socket}", *args]
        return self.netns.command(argv) if self.netns else argv

    def cli(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(self.cli_argv(*args), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"tailscale {' '.join(args)} failed: {result.stderr}{result.stdout}")
        return result.stdout

    def up(self, login_server: str, auth_key: str, *extra: str) -> TailscaleNode:
        self.cli("up", f"--login-server={login_server}", f"--auth-key={auth_key}", f"--hostname={self.name}",
                 "--accept-dns=false", "--timeout=60s", *(["--netfilter-mode=off"] if self.netns else []), *extra)
        wait_for(lambda: self.status()["BackendState"] == "Running", 30, f"{self.name} Running")
        return self

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json"))

    def sees_online(self, address: str) -> bool:
        peers = (self.status().get("Peer") or {}).values()
        return any(address in (peer.get("TailscaleIPs") or ()) and peer.get("Online") for peer in peers)

    def reaches(self, address: str) -> bool:
        """A TSMP ping travels inside WireGuard: it answers only once both ends have
        each other in their netmaps and a handshake has completed."""
        return subprocess.run(self.cli_argv("ping", "--tsmp", "--c=1", "--timeout=2s", address),
                              capture_output=True, timeout=10).returncode == 0

    def wait_for_peer(self, address: str, timeout: float = 30) -> None:
        """Until this node sees the peer online and a packet gets through to it.

        "Online" alone comes from the control server; the peer may not have learned
        about this node yet and would drop its first packets."""
        wait_for(lambda: self.sees_online(address), timeout, f"{self.name} to see {address} online")
        wait_for(lambda: self.reaches(address), timeout, f"{self.name} to reach {address} through WireGuard")

    @property
    def ipv4(self) -> str:
        return next(ip for ip in self.status()["Self"]["TailscaleIPs"] if ":" not in ip)

    def stop(self) -> None:
        self.process.stop()


class ClientDevice:
    """A laptop on the tailnet: a kernel-TUN tailscaled in a network namespace.

    `run` executes any command on it (curl, python, wrk), so clients talk to the
    services over the tailnet exactly as they would from another machine.
    """

    def __init__(self, node: TailscaleNode):
        assert node.netns is not None
        self.node = node
        self.netns = node.netns

    def run(self, argv: Sequence[str], timeout: float = 120, check: bool = False,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.netns.command(argv), capture_output=True, timeout=timeout, check=check,
                              input=input)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        process = subprocess.Popen(self.netns.command(argv), start_new_session=True, **kwargs)
        janitor.process_group(process.pid)
        return process

    def curl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["curl", "--silent", "--show-error", "--max-time", str(timeout), *args],
                        timeout=timeout + 10)


class SocksClient:
    """A client on the tailnet through a userspace tailscaled's SOCKS5 proxy.

    Cheaper than a network namespace, and what the harness offers where root is not
    available; `curl` has the same interface as ClientDevice.curl.
    """

    def __init__(self, node: TailscaleNode):
        assert node.socks5_port is not None
        self.node = node

    def curl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "--silent", "--show-error", "--max-time", str(timeout),
                               "--socks5-hostname", f"127.0.0.1:{self.node.socks5_port}", *args],
                              capture_output=True, timeout=timeout + 10)
