"""Debian's podman for the OCI tier: images assembled here (no registry), containers run
rootful with the cgroupfs manager (the host runs no systemd) and runc (crun refuses the
host's hybrid cgroups), and removed by the janitor if the run is killed.

Images:
  tsnsrv-test-base      the systemd tier's Debian tree without its kernel (scripts/guest-image:
                        Python and tsnsrv's dependencies in /opt/tsnsrv-venv)
  tsnsrv-test-sidecar   that base with this checkout's tsnsrv and the pinned tailscaled, as
                        nixos/oci-image.nix lays the image out: tsnsrv as the entrypoint,
                        user 65532, /state as its volume
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import janitor

REPO = Path(__file__).resolve().parents[2]
GLOBAL = ["--cgroup-manager=cgroupfs", "--events-backend=file", "--runtime=runc"]


def run_limits() -> list[str]:
    """Modest resource limits: by default podman asks for more than this sandbox grants
    (it lacks CAP_SYS_RESOURCE), and the runtime's setrlimit then fails."""
    return ["--ulimit", "nofile=4096:8192", "--ulimit", "nproc=4096:8192"]


SIDECAR_CONTAINERFILE = """\
FROM localhost/tsnsrv-test-base:{base_tag}
COPY tsnsrv /opt/tsnsrv-src/tsnsrv
COPY tailscaled tailscale /usr/local/bin/
RUN mkdir -p /state && chown 65532:65532 /state && chmod 1777 /tmp
ENV PYTHONPATH=/opt/tsnsrv-src PATH=/usr/local/bin:/usr/bin:/bin
USER 65532:65532
VOLUME /state
ENTRYPOINT ["/opt/tsnsrv-venv/bin/python", "-m", "tsnsrv"]
"""


def podman_unavailable() -> str | None:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap installs Debian's podman and runc)"
    result = podman("info", check=False)
    if result.returncode != 0:
        return f"podman cannot run containers here: {result.stderr.strip()[-300:]}"
    return None


def podman(*args: str, check: bool = True, timeout: float = 300, input: bytes | None = None
           ) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *GLOBAL, *args], capture_output=True, timeout=timeout, input=input)
    result.stdout, result.stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def base_image(guest_image_dir: Path) -> str:
    tarball = guest_image_dir / "rootfs.tar"
    tag = guest_image_dir.name.rsplit("-", 1)[-1]
    name = f"localhost/tsnsrv-test-base:{tag}"
    if podman("image", "exists", name, check=False).returncode != 0:
        podman("import", str(tarball), name, timeout=600)
    return tag


def sidecar_image(base_tag: str, bin_dir: Path) -> str:
    """The sidecar image with this checkout's tsnsrv and the tailscale of `bin_dir`; tagged
    by the content it holds."""
    digest = hashlib.sha256(base_tag.encode())
    for path in [*sorted((REPO / "python" / "tsnsrv").glob("*.py")), bin_dir / "tailscaled", bin_dir / "tailscale"]:
        digest.update(path.name.encode() + path.read_bytes())
    name = f"localhost/tsnsrv-test-sidecar:{digest.hexdigest()[:16]}"
    if podman("image", "exists", name, check=False).returncode == 0:
        return name
    with tempfile.TemporaryDirectory() as context:
        context_dir = Path(context)
        shutil.copytree(REPO / "python" / "tsnsrv", context_dir / "tsnsrv", ignore=shutil.ignore_patterns("__pycache__"))
        for binary in ("tailscaled", "tailscale"):
            shutil.copy2(bin_dir / binary, context_dir / binary)
        (context_dir / "Containerfile").write_text(SIDECAR_CONTAINERFILE.format(base_tag=base_tag))
        podman("build", "--network=none", "-t", name, "-f", str(context_dir / "Containerfile"), str(context_dir),
               timeout=600)
    return name


class Container:
    """One container, removed when stopped (or by the janitor, if the run is killed)."""

    def __init__(self, name: str, image: str, *options: str, command: tuple[str, ...] = ()):
        self.name = name
        janitor.command(["podman", *GLOBAL, "rm", "-f", "-t", "2", name])
        podman("rm", "-f", name, check=False)
        podman("run", "-d", "--name", name, *run_limits(), *options, image, *command)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *argv, check=check)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        return podman("inspect", "-f", "{{.State.Running}}", self.name, check=False).stdout.strip() == "true"

    def restart(self) -> None:
        podman("restart", "-t", "20", self.name)

    def remove(self) -> None:
        podman("rm", "-f", "-t", "20", self.name, check=False)
