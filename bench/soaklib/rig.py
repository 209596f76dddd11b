"""Handles on the soak's moving parts from the host: the upstream process and its control
socket, the clients' process on the client device, and the certificates."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509

from harness.processes import ManagedProcess, free_port, wait_for
from harness.tailnet import ClientDevice

BENCH = Path(__file__).resolve().parents[1]


def module_argv(module: str, *args: str) -> list[str]:
    """Run a soaklib module with this interpreter, wherever the working directory is."""
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import runpy; runpy.run_module({module!r}, run_name='__main__')"
    return [sys.executable, "-c", code, *args]


class SoakUpstream:
    """The soak's upstream (soaklib.upstream) on a fixed port, stopped and started at will."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.control_path = workdir / "control.sock"
        self.events = workdir / "upstream-events.jsonl"
        self.process = ManagedProcess("soak-upstream", module_argv(
            "soaklib.upstream", "--port", str(self.port), "--control", str(self.control_path),
            "--events", str(self.events)), workdir / "upstream.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process.start()
        wait_for(self._answers, 20, "the soak upstream")

    def _answers(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"the soak upstream exited:\n{self.process.log_tail()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            pass
        return bool(self.control("status")["ok"])

    def stop(self) -> None:
        self.process.stop(timeout=5)

    def control(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.control_path))
            sock.sendall(command.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        return json.loads(reply)


class ClientsProcess:
    """soaklib.clients on the client device, driven over its stdin and stdout."""

    def __init__(self, client: ClientDevice, workdir: Path, args: list[str]):
        self.events = workdir / "client-events.jsonl"
        self.log_path = workdir / "clients.log"
        self.argv = module_argv("soaklib.clients", "--events", str(self.events), *args)
        self.client = client
        self.process: subprocess.Popen | None = None
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = self.client.popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        log.close()
        threading.Thread(target=self._read, daemon=True, name="clients-replies").start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.replies.put(json.loads(line))

    def _command(self, command: str, reply_key: str, timeout: float) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the clients exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                reply = self.replies.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the clients did not answer {command!r} within {timeout:g}s") from None
                continue
            if reply_key in reply:
                return reply

    def pause(self, timeout: float) -> dict[str, Any]:
        return self._command("pause", "paused", timeout)

    def resume(self) -> None:
        self._command("resume", "resumed", 10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(b"stop\n")
            self.process.stdin.close()
            self.process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
        except OSError:
            return ""


class Certificates:
    """A test CA and the service's certificate files, which a reload replaces."""

    def __init__(self, workdir: Path, host: str):
        self.ca = trustme.CA()
        self.host = host
        self.ca_file = workdir / "ca.pem"
        self.cert_file = workdir / "cert.pem"
        self.key_file = workdir / "key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.serial = ""
        self.issue()

    def issue(self) -> str:
        """A new certificate for the same name into the same files; its serial (hex, as TLS
        clients print it)."""
        pair = self.ca.issue_cert(self.host)
        key_tmp, cert_tmp = self.key_file.with_suffix(".new"), self.cert_file.with_suffix(".new")
        pair.private_key_pem.write_to_path(str(key_tmp))
        pair.cert_chain_pems[0].write_to_path(str(cert_tmp))
        key_tmp.replace(self.key_file)
        cert_tmp.replace(self.cert_file)
        self.serial = f"{x509.load_pem_x509_certificate(pair.cert_chain_pems[0].bytes()).serial_number:X}"
        return self.serial
