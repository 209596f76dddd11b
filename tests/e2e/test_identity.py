"""What the upstream learns about a request: identity headers from whois of the real
tailnet client, forwarding headers, and nothing a client tried to smuggle in."""

from __future__ import annotations

import email.header
import re

import pytest

from harness.upstream import echo

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def service(module_tsnsrv, upstream):
    return module_tsnsrv("whoami", upstream.url, "--upstream-header", "X-Operator: set by tsnsrv")


def test_user_identity_headers_name_the_client(service, laptop):
    seen = echo(laptop.curl(f"http://{service.ip}/").stdout)["header"]

    assert seen["x-tailscale-user-loginname"] == "alice"
    assert seen["x-tailscale-user-displayname"] == "alice"
    assert re.fullmatch(r"userid:\d+", seen["x-tailscale-user"])  # as the Go tsnsrv spells IDs
    assert seen["x-tailscale-node-name"] == "laptop"
    assert re.fullmatch(r"nodeid:\d+", seen["x-tailscale-node"])
    # headscale's login names carry no domain, so there is nothing to split.
    assert "x-tailscale-user-loginname-localpart" not in seen
    assert "x-tailscale-node-tags" not in seen


def test_spoofed_identity_and_forwarding_headers_are_replaced(service, laptop):
    spoofed = ["X-Tailscale-User-LoginName: mallory", "X-Tailscale-Node-Tags: tag:admin",
               "Tailscale-User-Login: mallory", "Forwarded: for=1.2.3.4", "X-Forwarded-For: 1.2.3.4",
               "X-Forwarded-Host: evil.example", "X-Real-Ip: 1.2.3.4", "X-Scheme: https",
               "X-Tailscale-Caps: https://tailscale.com/cap/admin"]
    args = [part for header in spoofed for part in ("-H", header)]

    seen = echo(laptop.curl(*args, f"http://{service.ip}/").stdout)["header"]

    laptop_ip = laptop.node.ipv4
    assert seen["x-tailscale-user-loginname"] == "alice"
    assert "x-tailscale-node-tags" not in seen
    assert "x-tailscale-caps" not in seen
    assert "tailscale-user-login" not in seen
    assert "forwarded" not in seen
    assert seen["x-forwarded-for"] == laptop_ip
    assert seen["x-real-ip"] == laptop_ip
    assert seen["x-forwarded-host"] == service.ip
    assert seen["x-scheme"] == "http"


def test_forwarding_headers_describe_the_original_request(service, laptop):
    seen = echo(laptop.curl("-H", "Host: whoami.tailnet.test", f"http://{service.ip}/").stdout)["header"]

    assert seen["host"] == "whoami.tailnet.test"  # preserved, like the Go tsnsrv
    assert seen["x-forwarded-host"] == "whoami.tailnet.test"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-server"] == "whoami.tailnet.test"
    assert "x-forwarded-port" not in seen
    assert seen["x-operator"] == "set by tsnsrv"


def test_a_tagged_client_is_named_by_node_and_tags_and_its_pseudo_user(service, ci_runner):
    result = ci_runner.curl(f"http://{service.ip}/")

    seen = echo(result.stdout)["header"]
    assert seen["x-tailscale-node-name"] == "ci-runner"
    assert seen["x-tailscale-node-tags"] == "tag:ci"
    # What whois says and the Go tsnsrv forwards: the node belongs to no person.
    assert seen["x-tailscale-user-loginname"] == "tagged-devices"
    assert seen["x-tailscale-user-displayname"] == "Tagged Devices"


def test_a_second_user_gets_their_own_identity(service, bob_phone):
    seen = echo(bob_phone.curl(f"http://{service.ip}/").stdout)["header"]

    assert seen["x-tailscale-user-loginname"] == "bob"
    assert seen["x-tailscale-node-name"] == "phone"


def test_serve_schema_sends_tailscale_user_headers(make_tsnsrv, upstream, laptop, ci_runner):
    service = make_tsnsrv("serve-schema", upstream.url, "--identity-header", "serve")

    seen = echo(laptop.curl("-H", "Tailscale-User-Login: mallory", f"http://{service.ip}/").stdout)["header"]
    tagged = echo(ci_runner.curl(f"http://{service.ip}/").stdout)["header"]

    assert seen["tailscale-user-login"] == "alice"
    assert seen["tailscale-user-name"] == "alice"
    assert seen["tailscale-headers-info"] == "https://tailscale.com/s/serve-headers"
    assert "x-tailscale-user-loginname" not in seen  # only the schema asked for
    assert str(email.header.make_header(email.header.decode_header(seen["tailscale-user-login"]))) == "alice"
    assert "tailscale-user-login" not in tagged  # as `tailscale serve`: no user for tagged nodes


def test_suppress_whois_sends_no_identity_but_still_strips(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("anonymous", upstream.url, "--suppress-whois")

    seen = echo(laptop.curl("-H", "X-Tailscale-User-LoginName: mallory", f"http://{service.ip}/").stdout)["header"]

    assert not [name for name in seen if name.startswith(("x-tailscale-", "tailscale-"))]
    assert seen["x-forwarded-for"] == laptop.node.ipv4
