"""virtualisation.oci-sidecars.tsnsrv, for real: an app container and its tsnsrv sidecar
under Debian's podman, as the module declares them (the container's user, volumes,
command and options come from evaluating the module with the real nixpkgs lib), with
an image laid out as nixos/oci-image.nix builds it, over the local tailnet."""

from __future__ import annotations

import json

import pytest

from harness.probes import udp_reply

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


def tcp_reply(laptop, ip: str, port: int) -> bytes:
    return laptop.run(["curl", "-sS", "--max-time", "5", f"http://{ip}:{port}/"], timeout=20).stdout


def test_the_sidecar_serves_its_app_with_identity_headers(sidecar, laptop):
    seen = json.loads(laptop.curl(f"http://{sidecar.ip}/hello").stdout)
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert seen["path"] == "/hello"
    assert headers["x-tailscale-user-loginname"] == "alice"
    assert headers["x-tailscale-node-name"] == "laptop"


def test_the_app_verifies_the_sidecars_identity_assertion_with_keys_from_its_own_loopback(sidecar, laptop, app):
    seen = json.loads(laptop.curl(f"http://{sidecar.ip}/hello").stdout)
    assertion = {name.lower(): value for name, value in seen["headers"].items()}["x-tailscale-identity-assertion"]
    verify = ("import jwt, sys\n"
              f"keys = jwt.PyJWKClient('{sidecar.jwks_url}')\n"
              "key = keys.get_signing_key_from_jwt(sys.argv[1])\n"
              "print(jwt.decode(sys.argv[1], key, algorithms=['EdDSA'], audience='books')['login'])\n")

    verified = app.exec("/opt/tsnsrv-venv/bin/python", "-c", verify, assertion).stdout

    assert verified.strip() == "alice"
    # Written by the image's account on the sidecar's volume, the signing keys its own.
    assert json.loads((sidecar.state_dir / "jwks.json").read_text())["keys"]
    keys = (sidecar.state_dir / "assertion-keys" / "keys.json").stat()
    assert (keys.st_uid, keys.st_mode & 0o777) == (65532, 0o600)


def test_the_apps_loopback_stays_private_inside_the_container(sidecar, laptop, control_node):
    # Control: a bare tailscaled in the same container network hands out the app's loopback.
    assert tcp_reply(laptop, control_node, 5432).startswith(b"{"), "control: the app's 127.0.0.1:5432 answers"
    assert udp_reply(laptop, control_node, 5432) == "private ping"

    assert sidecar.health()["tailscaled"]["loopbackGuard"] == "seccomp"
    assert tcp_reply(laptop, sidecar.ip, 5432) == b""
    assert udp_reply(laptop, sidecar.ip, 5432) == "no answer"
    assert "refused tailscaled's connection to host loopback 127.0.0.1:5432" in sidecar.container.logs()


def test_a_restart_keeps_the_node(sidecar, laptop, headscale):
    before = sidecar.ip
    sidecar.container.restart()
    sidecar.wait_ready()
    assert sidecar.ip == before
    assert sidecar.node_name in headscale.node_names() and f"{sidecar.node_name}-1" not in headscale.node_names()
    laptop.node.wait_for_peer(sidecar.ip)
    assert laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{sidecar.ip}/").stdout == b"200"


def test_the_sidecar_runs_unprivileged_on_a_read_only_root(sidecar):
    status = sidecar.container.exec("cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "65532"
    assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert sidecar.container.exec("touch", "/opt/written", check=False).returncode != 0


def test_removing_the_sidecar_takes_the_app_off_the_tailnet_and_leaves_the_app(sidecar, laptop, app):
    ip = sidecar.ip
    sidecar.container.remove()
    assert not sidecar.container.running()
    result = laptop.curl("-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", f"http://{ip}/")
    assert result.stdout in (b"000", b"")
    assert app.running()
    assert (sidecar.state_dir / "tailscaled.state").exists()  # the volume keeps the node for a next start
