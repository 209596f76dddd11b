"""The Go tsnsrv (github.com/boinkor-net/tsnsrv), run beside ours on the same tailnet so
that tests can compare what a migrating user's upstream sees from each.

It is built by bench/build-go-tsnsrv from the source beside the checkout
(../shared/vendor/go-tsnsrv) into the cache outside the repository.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .headscale import Headscale
from .processes import ManagedProcess, wait_for
from .tailnet import TailscaleNode, offline_env

REPO = Path(__file__).resolve().parents[2]
VENDORED_SOURCE = REPO.parent / "shared" / "vendor" / "go-tsnsrv"


def build_go_tsnsrv() -> Path:
    argv = [str(REPO / "bench" / "build-go-tsnsrv")]
    if VENDORED_SOURCE.is_dir():
        argv.append(str(VENDORED_SOURCE))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"could not build the Go tsnsrv:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


class GoTsnsrv:
    """One Go tsnsrv service in plaintext mode on port 80, logged in with an auth key; or,
    given `tls_files` (certificate, key), over TLS on port 443 with those files."""

    def __init__(self, binary: Path, name: str, upstream: str, workdir: Path, headscale: Headscale, auth_key: str,
                 *flags: str, tls_files: tuple[Path, Path] | None = None):
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        key_file = workdir / "authkey"
        key_file.write_text(auth_key + "\n")
        key_file.chmod(0o600)
        (workdir / "state").mkdir(exist_ok=True)
        listen = ["-plaintext", "-listenAddr", ":80"] if tls_files is None else [
            "-certificateFile", str(tls_files[0]), "-keyFile", str(tls_files[1]), "-listenAddr", ":443"]
        argv = [str(binary), "-name", name, *listen, "-stateDir", str(workdir / "state"),
                "-authkeyPath", str(key_file), "-prometheusAddr=", "-timeout", "120s", *flags, upstream]
        # tsnet reads the control URL from TS_URL; the offline knobs are tailscaled's.
        env = offline_env(TS_URL=headscale.url, TS_LOGS_DIR=str(workdir))
        self.process = ManagedProcess(f"go-tsnsrv-{name}", argv, workdir / "tsnsrv.log", env=env)
        self.ip = ""

    def start(self, clients: list[TailscaleNode]) -> GoTsnsrv:
        """Start; return once every one of `clients` reaches it."""
        self.process.start()
        return self.wait_on_tailnet(clients)

    def wait_on_tailnet(self, clients: list[TailscaleNode]) -> GoTsnsrv:
        """Until every one of `clients` reaches the (started) service."""
        first = clients[0]

        def address() -> str | None:
            if not self.process.running:
                raise AssertionError(f"the Go tsnsrv {self.name} exited:\n{self.process.log_tail()}")
            for peer in (first.status().get("Peer") or {}).values():
                if peer.get("HostName") == self.name and peer.get("Online"):
                    return next((ip for ip in peer.get("TailscaleIPs") or () if ":" not in ip), None)
            return None
        self.ip = wait_for(address, 120, f"the Go tsnsrv {self.name} on the tailnet")
        for client in clients:
            client.wait_for_peer(self.ip)
        return self

    def stop(self) -> None:
        self.process.stop()
