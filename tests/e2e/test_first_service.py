"""The vertical slice: one service on the tailnet, reached from a client device."""

from __future__ import annotations

import pytest

from harness.upstream import echo

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


def test_client_reaches_upstream_through_the_tailnet_with_its_identity(make_tsnsrv, laptop, upstream, headscale):
    service = make_tsnsrv("hello", upstream.url)

    result = laptop.curl(f"http://{service.ip}/path?q=1")

    assert result.returncode == 0, result.stderr
    seen = echo(result.stdout)
    assert seen["path"] == "/path"
    assert seen["query"] == "q=1"
    assert seen["header"]["x-tailscale-user-loginname"] == "alice"
    assert seen["header"]["x-tailscale-node-name"] == "laptop"
    assert "hello" in headscale.node_names()


def test_restart_with_the_same_state_keeps_the_same_node(make_tsnsrv, laptop, upstream, headscale, service_dir):
    first = make_tsnsrv("again", upstream.url, workdir=service_dir)
    address = first.ip
    assert first.stop() == 0

    second = make_tsnsrv("again", upstream.url, workdir=service_dir)

    assert second.ip == address
    names = headscale.node_names()
    assert names.count("again") == 1 and "again-1" not in names, names
    assert laptop.curl(f"http://{address}/after-restart").returncode == 0
