"""The OCI tier's world: Debian's podman with an app container and its tsnsrv sidecar, on
the shared local tailnet. Skipped, with the reason, where podman cannot run here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import attrs
import pytest

from harness.headscale import Headscale
from harness.nixtools import NIXPKGS_LIB, NO_LIB_REASON, evaluate_module
from harness.podman import Container, base_image, podman_unavailable, sidecar_image
from harness.processes import wait_for
from harness.tailnet import OFFLINE_ENV
from harness.tsnsrv import get_unix
from harness.vm import guest_image

REPO = Path(__file__).resolve().parents[2]
SIDECAR = "books-tailnet"
# Where the app next to the sidecar fetches the identity assertions' keys (metricsAddr).
JWKS_PORT = 9099


def module_says(login_server: str) -> dict:
    """What the module declares for an app `calibre-web` and its sidecar `books-tailnet`."""
    configuration = f"""{{
      services.tsnsrv.defaults = {{ authKeyPath = "/run/secrets/tailscale-authkey";
                                    loginServerUrl = "{login_server}"; plaintext = true; }};
      virtualisation.oci-containers.containers.calibre-web.image = "calibre-web:latest";
      virtualisation.oci-sidecars.tsnsrv = {{
        enable = true;
        containers.{SIDECAR} = {{ name = "books"; forContainer = "calibre-web";
                                  service = {{ toURL = "http://127.0.0.1:8080"; assertions = true;
                                              metricsAddr = "127.0.0.1:{JWKS_PORT}"; }}; }};
      }};
    }}"""
    result = evaluate_module(configuration)
    assert result["failedAssertions"] == []
    return {"container": result["containers"][SIDECAR], "settings": result["expectedSidecars"][SIDECAR]["settings"]}


@attrs.define
class Sidecar:
    container: Container
    state_dir: Path
    node_name: str
    ip: str = ""
    # The identity assertions' keys, as the app in the same network fetches them.
    jwks_url: str = f"http://127.0.0.1:{JWKS_PORT}/jwks.json"

    def health(self) -> dict:
        return json.loads(get_unix(self.state_dir / "control.sock", "/health")[1])

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self.container.running():
                raise AssertionError(f"the sidecar exited:\n{self.container.logs()[-3000:]}")
            return self.health()["ready"]
        wait_for(ready, 120, "the sidecar to be ready")
        self.ip = next(a for a in self.health()["node"]["addresses"] if ":" not in a)


@pytest.fixture(scope="module")
def images(node_bin_dir):
    unavailable = podman_unavailable() or (None if NIXPKGS_LIB is not None else NO_LIB_REASON)
    if unavailable:
        pytest.skip(unavailable)
    base_tag = base_image(guest_image())
    return f"localhost/tsnsrv-test-base:{base_tag}", sidecar_image(base_tag, node_bin_dir)


@pytest.fixture(scope="module")
def app(images):
    base, _ = images
    name = f"tsnsrv-oci-app-{os.getpid()}"
    upstream = REPO / "nixos" / "tests" / "upstream.py"
    python = "/opt/tsnsrv-venv/bin/python"
    container = Container(name, base, "-v", f"{upstream}:/upstream.py:ro", command=(
        "sh", "-c", f"{python} /upstream.py 127.0.0.1 5432 --udp & exec {python} /upstream.py 127.0.0.1 8080"))
    yield container
    container.remove()


def offline() -> list[str]:
    """Test-only environment: DERP over plain HTTP (this tailnet's headscale has no TLS),
    nothing that could leave the machine (reference/local-tailnet.md §2.4)."""
    return [option for name, value in OFFLINE_ENV.items() for option in ("-e", f"{name}={value}")]


def declared_run(declared: dict, app_name: str, volumes: dict[str, str]) -> list[str]:
    """`podman run` options for the module's oci-containers entry, host paths mapped to ours."""
    options = ["--user", declared["user"], *offline()]
    for volume in declared["volumes"]:
        source, target, *mode = volume.split(":")
        options += ["-v", ":".join([volumes.get(source, source), target, *mode])]
    for option in declared["extraOptions"]:
        options.append(option.replace("container:calibre-web", f"container:{app_name}"))
    return options


@pytest.fixture(scope="module")
def sidecar(images, app, headscale: Headscale, laptop, tmp_path_factory):
    _, image = images
    said = module_says(headscale.server_url)
    declared, settings = said["container"], said["settings"]
    work = Path(tempfile.mkdtemp(prefix="tsnsrv-oci-", dir="/var/tmp"))
    state, keys = work / "state", work / "credentials"
    state.mkdir()
    keys.mkdir()
    (keys / "authKey").write_text(headscale.auth_key("alice") + "\n")
    # What the unit's ExecStartPre does for the image's account.
    for path in (state, keys, keys / "authKey"):
        os.chown(path, 65532, 65532)
    work.chmod(0o711)
    config = work / "tsnsrv.json"
    config.write_text(json.dumps(settings))
    config.chmod(0o644)
    config_source = next(v.split(":")[0] for v in declared["volumes"] if v.endswith(":/etc/tsnsrv.json:ro"))
    volumes = {"/var/lib/podman-books-tailnet": str(state), "/run/podman-books-tailnet": str(keys),
               config_source: str(config)}
    name = f"tsnsrv-oci-sidecar-{os.getpid()}"
    container = Container(name, image, *declared_run(declared, app.name, volumes), command=tuple(declared["cmd"]))
    running = Sidecar(container, state, settings["name"])
    running.wait_ready()
    laptop.node.wait_for_peer(running.ip)
    yield running
    container.remove()


@pytest.fixture(scope="module")
def control_node(images, app, headscale: Headscale, laptop):
    """A bare userspace tailscaled in the app's network: what the sidecar must not be like."""
    _, image = images
    name = f"tsnsrv-oci-bare-{os.getpid()}"
    container = Container(name, image, f"--network=container:{app.name}", *offline(), "--entrypoint", "tailscaled",
                          command=("--tun=userspace-networking", "--statedir=/tmp/bare", "--socket=/tmp/bare.sock",
                                   "--no-logs-no-support"))
    wait_for(lambda: container.exec("tailscale", "--socket=/tmp/bare.sock", "status", check=False).returncode
             in (0, 1), 30, "the bare tailscaled's LocalAPI")
    container.exec("tailscale", "--socket=/tmp/bare.sock", "up", f"--login-server={headscale.server_url}",
                   f"--auth-key={headscale.auth_key('alice')}", "--hostname=bare-container", "--timeout=60s")
    ip = container.exec("tailscale", "--socket=/tmp/bare.sock", "ip", "-4").stdout.strip()
    laptop.node.wait_for_peer(ip)
    yield ip
    container.remove()
