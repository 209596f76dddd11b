"""The system under test: the real `tsnsrv` command, started as a user starts it."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .headscale import Headscale
from .processes import ManagedProcess, wait_for
from .tailnet import TailscaleNode, offline_env

TAILSCALED_TEST_USER = "tsnsrv-test"


def ensure_tailscaled_test_user() -> str:
    """The account tailscaleds spawned by root run as (tsnsrv insists on one); created once."""
    try:
        pwd.getpwnam(TAILSCALED_TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        TAILSCALED_TEST_USER], check=True)
    return TAILSCALED_TEST_USER


def tsnsrv_command() -> str:
    """The console script installed next to the interpreter running the tests."""
    candidate = Path(sys.executable).parent / "tsnsrv"
    return str(candidate) if candidate.exists() else shutil.which("tsnsrv") or "tsnsrv"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 5):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.socket_path))


def get_unix(path: Path, url: str) -> tuple[int, bytes]:
    connection = UnixHTTPConnection(path)
    try:
        connection.request("GET", url)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Tsnsrv:
    """One `tsnsrv` service process with its own state and control socket."""

    def __init__(self, name: str, upstream: str, workdir: Path, bin_dir: Path, headscale: Headscale | None,
                 auth_key: str | None, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 plaintext: bool = True, login_server: str | None = None, command_prefix: Sequence[str] = (),
                 tailscaled: Path | None = None):
        """`login_server` replaces headscale's URL; `command_prefix` runs tsnsrv through a
        wrapper (e.g. a private mount namespace); `tailscaled` replaces bin_dir's."""
        self.name = name
        self.dir = workdir
        self.control_socket = workdir / "control.sock"
        workdir.mkdir(parents=True, exist_ok=True)
        args = [tsnsrv_command(), "--name", name, "--state-dir", str(workdir / "state"),
                "--control-socket", str(self.control_socket), "--tailscaled", str(tailscaled or bin_dir / "tailscaled")]
        if headscale is not None:
            args += ["--login-server", login_server or headscale.url]
        if auth_key is not None:
            key_file = workdir / "authkey"
            key_file.write_text(auth_key + "\n")
            key_file.chmod(0o600)
            args += ["--auth-key-file", str(key_file)]
        if os.geteuid() == 0:
            args += ["--tailscaled-user", TAILSCALED_TEST_USER]
        if plaintext:
            args.append("--plaintext")
        self.argv = [*command_prefix, *args, *(extra_args or []), upstream]
        self.process = ManagedProcess(f"tsnsrv-{name}", self.argv, workdir / "tsnsrv.log",
                                      env=offline_env(**(env or {})))

    def start(self, wait: bool = True, timeout: float = 60, clients: Sequence[TailscaleNode] = ()) -> Tsnsrv:
        """Start; with `wait`, return once it is ready and every one of `clients` can reach it."""
        self.process.start()
        if wait:
            self.wait_ready(timeout)
            for client in clients:
                client.wait_for_peer(self.ip)
        return self

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if not self.process.running:
                raise AssertionError(f"tsnsrv {self.name} exited ({self.process.process.returncode}):\n"
                                     f"{self.process.log_tail()}")
            health = self.health()
            return health if health["ready"] else None
        return wait_for(ready, timeout, f"tsnsrv {self.name} to be ready")

    def health(self, probe: bool = False) -> dict[str, Any]:
        _status, body = get_unix(self.control_socket, "/health?probe=1" if probe else "/health")
        return json.loads(body)

    def metrics(self) -> str:
        return get_unix(self.control_socket, "/metrics")[1].decode()

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample, e.g. metric("tsnsrv_responses_total", 'status_class="2xx"')."""
        for line in self.metrics().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                sample, _, value = line.rpartition(" ")
                if sample.startswith(name + ("{" if labels else "")) and all(
                        part in sample for part in labels.split(",") if part):
                    if labels or sample == name:
                        return float(value)
        return 0.0

    @property
    def ip(self) -> str:
        return next(a for a in self.health()["node"]["addresses"] if ":" not in a)

    @property
    def tailscaled_pid(self) -> int:
        return self.health()["tailscaled"]["pid"]

    def stop(self, timeout: float = 30) -> int | None:
        return self.process.stop(timeout)

    def log(self) -> str:
        return self.process.log_text()
