"""The services' tailscaled is the build the run asked for (--tailscale-build), built with
exactly the omissions that build is defined by: so a run on the trimmed build really
proves the trimmed build (docs/trimmed-tailscaled.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.binaries import BUILDS, build_tags, omit_tags, tailscale_bin_dir

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


def test_the_services_run_the_tailscaled_of_the_chosen_build(make_tsnsrv, upstream, node_bin_dir, request):
    service = make_tsnsrv("which-build", upstream.url)

    running = Path(f"/proc/{service.tailscaled_pid}/exe").resolve()
    assert running == (node_bin_dir / "tailscaled").resolve()
    expected = omit_tags(request.config.getoption("--tailscale-build"))
    assert build_tags(running) == expected
    assert build_tags(node_bin_dir / "tailscale") == expected


def test_a_service_keeps_its_node_when_it_switches_builds(make_tsnsrv, upstream, laptop, headscale, node_bin_dir,
                                                          service_dir, request):
    """What switching `tailscalePackage` does to a service: the same state on the other
    build is the same node; and back."""
    other = next(build for build in BUILDS if build != request.config.getoption("--tailscale-build"))
    first = make_tsnsrv("switching", upstream.url, workdir=service_dir)
    address = first.ip
    assert first.stop() == 0

    for bin_dir in (tailscale_bin_dir(other), node_bin_dir):
        service = make_tsnsrv("switching", upstream.url, workdir=service_dir, node_bin_dir=bin_dir)
        assert Path(f"/proc/{service.tailscaled_pid}/exe").resolve() == (bin_dir / "tailscaled").resolve()
        assert service.ip == address
        assert laptop.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{address}/").stdout == b"200"
        assert service.stop() == 0
    names = headscale.node_names()
    assert names.count("switching") == 1 and not any(name.startswith("switching-") for name in names), names


def test_the_certificate_tailnets_services_run_the_chosen_build(cert_tsnsrv, upstream, node_bin_dir):
    """Its services start tailscaled through a wrapper (their CA's environment), not from
    the factory's directory: the same build all the same."""
    service = cert_tsnsrv("which-build-tls", upstream.url)

    assert Path(f"/proc/{service.tailscaled_pid}/exe").resolve() == (node_bin_dir / "tailscaled").resolve()
