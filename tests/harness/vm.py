"""The QEMU guest of the systemd tier: Debian bookworm with its own kernel (cgroup v2, so
systemd's BPF firewall works), booted once per run under software emulation.

The base image (scripts/guest-image) never changes; writes go to a qcow2 overlay of this
run. What this run brings (units, configs, tsnsrv, tailscaled) goes on a second, read-only
disk mounted at /nix. Commands reach the guest's agent (agent.py) over a virtio serial
port; the guest's network is QEMU's user networking, where 10.0.2.2 is this host's
loopback and the guest gets no route but to 198.18.0.0/15 (this run's namespaces).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .processes import ManagedProcess, wait_for

REPO = Path(__file__).resolve().parents[2]
HOST_FROM_GUEST = "10.0.2.2"  # QEMU user networking: the host's 127.0.0.1
GUEST_ADDRESS = "10.0.2.15"
BOOT_TIMEOUT = 300.0


class GuestCommandError(AssertionError):
    pass


def qemu_unavailable() -> str | None:
    """Why this machine cannot boot the guest, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (scripts/bootstrap installs qemu-system-x86)"
    if os.geteuid() != 0:
        return "building the guest image needs root (debootstrap)"
    if os.uname().machine != "x86_64":
        return f"the guest image is built for x86_64, not {os.uname().machine}"
    return None


def guest_image() -> Path:
    result = subprocess.run([str(REPO / "scripts" / "guest-image")], capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "GUEST_IMAGE_PYTHON": sys.executable})
    if result.returncode != 0:
        raise RuntimeError(f"scripts/guest-image failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def make_disk(tree: Path, image: Path) -> None:
    """A read-only ext4 disk holding `tree`."""
    size_mib = int(sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(image), f"{size_mib * 2 + 64}M"],
                   check=True, capture_output=True)


class Guest:
    def __init__(self, image_dir: Path, workdir: Path, run_disk: Path, memory_mib: int = 3072):
        self.workdir = workdir
        self.agent_socket = workdir / "agent.sock"
        overlay = workdir / "rootfs.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image_dir / "rootfs.ext4"), "-F", "raw",
                        str(overlay)], check=True)
        argv = [
            "qemu-system-x86_64",
            # Software emulation: /dev/kvm here is nested PVM, under which a stock kernel hangs.
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(os.cpu_count() or 2), "-m", str(memory_mib),
            "-nographic", "-no-reboot",
            "-kernel", str(image_dir / "vmlinuz"), "-initrd", str(image_dir / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=false",
            "-drive", f"file={overlay},format=qcow2,if=virtio",
            "-drive", f"file={run_disk},format=raw,if=virtio,readonly=on",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=agent,path={self.agent_socket},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=agent",
            "-nic", "user,model=virtio-net-pci",
        ]
        self.process = ManagedProcess("qemu-guest", argv, workdir / "console.log")
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def boot(self) -> Guest:
        started = time.monotonic()
        self.process.start()
        wait_for(self._connect, BOOT_TIMEOUT, "the guest's agent")
        wait_for(lambda: self.execute("systemctl is-system-running --wait", 120)[0] in (0, 1), BOOT_TIMEOUT,
                 "the guest to finish booting")
        self.boot_seconds = time.monotonic() - started
        # fstab gives the run disk 5 s to show up and boots without it (nofail); under TCG on a
        # busy host udev can take longer than that.
        self.succeed("mountpoint -q /nix || mount -o ro /dev/vdb /nix")
        # No default route: the guest reaches this host (10.0.2.2) and this run's namespaces only.
        self.succeed(f"""
            dev=$(ip -o link show | awk -F': ' '$2 != "lo" {{print $2; exit}}')
            ip link set "$dev" up
            ip addr add {GUEST_ADDRESS}/24 dev "$dev"
            ip route add 198.18.0.0/15 via {HOST_FROM_GUEST}
        """)
        return self

    def _connect(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"QEMU exited:\n{self.process.log_tail(40)}")
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(self.agent_socket))
            self._sock = sock
        status, _out, _err = self.execute("true", timeout=5, wait=5)
        return status == 0

    def execute(self, command: str, timeout: float = 120, wait: float | None = None) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of `command` run by bash as root in the guest."""
        assert self._sock is not None
        self._next_id += 1
        request = {"id": self._next_id, "command": command, "timeout": timeout}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + (wait if wait is not None else timeout + 30)
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                answer = json.loads(line)
                if answer.get("id") == self._next_id:
                    return answer["status"], answer["stdout"], answer["stderr"]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._sock.close()  # the answer would arrive late and out of step
                self._sock, self._buffer = None, b""
                raise TimeoutError(f"no answer from the guest within {timeout:g}s to: {command[:200]}")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                raise GuestCommandError("the guest's agent went away")
            self._buffer += chunk

    def succeed(self, command: str, timeout: float = 120) -> str:
        status, out, err = self.execute(command, timeout)
        if status != 0:
            raise GuestCommandError(f"guest command failed ({status}): {command.strip()[:300]}\n{out[-2000:]}"
                                    f"{err[-2000:]}")
        return out

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self.process.stop(timeout=5, sig=15)
