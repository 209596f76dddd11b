"""Funnel on a REAL tailscaled, with a STAND-IN for Tailscale's relays (which cannot exist
offline; harness/funnel_relay.py): the relay node, granted the ingress capability, hands
a public client's connection to the service node's peer API exactly as Tailscale's relays
do, and the node's own Serve config decides whether it takes it. The node is granted the
`funnel` attribute by the patched headscale's policy (harness/certtailnet.py) and serves
its real certificate from the local CA, end to end to the public client.

What docs/tls-and-funnel.md promises for Funnel clients: no tailnet identity (whatever
they send), `Tailscale-Funnel-Request: ?1` in the 'serve' header schema, `funnel:` prefixes,
and `--funnel-only` refusing the tailnet; a node without Funnel takes no public traffic.
"""

from __future__ import annotations

import pytest

from harness.funnel_relay import StandInFunnelRelay
from harness.upstream import echo

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node

SPOOFED = ("X-Tailscale-User-LoginName: mallory@example.com", "Tailscale-User-Login: mallory@example.com",
           "Tailscale-Funnel-Request: ?0")


@pytest.fixture(scope="module")
def funnel_relay(bin_dir, cert_tailnet, tmp_path_factory):
    relay = StandInFunnelRelay(bin_dir, tmp_path_factory.mktemp("funnel-relay"), cert_tailnet.ip)
    yield relay.start(cert_tailnet.headscale)
    relay.close()


def public_key(cert_tailnet, tag: str = "tag:public") -> str:
    return cert_tailnet.headscale.auth_key(tags=[tag])


def public_get(cert_tailnet, relay: StandInFunnelRelay, service, path: str, *curl_args: str):
    """A request from the public internet: the laptop's own address (not its tailnet one)
    to the relay's public side, TLS to the service's certificate."""
    host = service.health()["node"]["dnsName"]
    port = relay.expose(host, service.ip)
    return cert_tailnet.https(host, cert_tailnet.ip, path, *curl_args, port=port)


def tailnet_get(cert_tailnet, service, path: str, *curl_args: str):
    return cert_tailnet.https(service.health()["node"]["dnsName"], service.ip, path, *curl_args)


def test_a_public_request_carries_no_tailnet_identity_and_keeps_to_funnel_prefixes(cert_tsnsrv, cert_tailnet,
                                                                                   funnel_relay, upstream):
    service = cert_tsnsrv("public", upstream.url, "--funnel", "--identity-header", "tsnsrv", "--identity-header",
                          "serve", "--no-strip-prefix", "--prefix", "funnel:/public", "--prefix", "tailnet:/",
                          auth_key=public_key(cert_tailnet))
    assert service.health()["serve"]["funnel"] is True

    spoofs = [arg for header in SPOOFED for arg in ("-H", header)]
    public = echo(public_get(cert_tailnet, funnel_relay, service, "/public/page", *spoofs).stdout)

    public_client = cert_tailnet.netns.ns_ip  # the laptop's address outside the tailnet, as the relay saw it
    assert funnel_relay.forwarded[-1][0].startswith(f"{public_client}:")
    assert public["path"] == "/public/page"
    assert public["header"]["tailscale-funnel-request"] == "?1"
    assert public["header"]["x-forwarded-for"] == public_client
    assert not [name for name in public["header"] if name.startswith(("x-tailscale-", "tailscale-user"))], public
    assert service.metric("tsnsrv_responses_total", 'source="funnel",status_class="2xx"') == 1

    refused = public_get(cert_tailnet, funnel_relay, service, "/private", "-o", "/dev/null", "-w", "%{http_code}")
    assert refused.stdout == b"404", "a tailnet-only path"
    tailnet = echo(tailnet_get(cert_tailnet, service, "/private", "-H", "Tailscale-Funnel-Request: ?1").stdout)
    assert tailnet["header"]["tailscale-user-login"].startswith("alice")
    assert "tailscale-funnel-request" not in tailnet["header"], "a tailnet client cannot pose as public"


def test_funnel_only_serves_the_public_and_nobody_on_the_tailnet(cert_tsnsrv, cert_tailnet, funnel_relay, upstream):
    service = cert_tsnsrv("public-only", upstream.url, "--funnel", "--funnel-only", auth_key=public_key(cert_tailnet))

    assert public_get(cert_tailnet, funnel_relay, service, "/hello", "-o", "/dev/null", "-w",
                      "%{http_code}").stdout == b"200"
    assert tailnet_get(cert_tailnet, service, "/hello", "-o", "/dev/null", "-w", "%{http_code}").stdout == b"000"
    assert service.metric("tsnsrv_refused_front_connections_total", 'reason="tailnet_not_served"') == 1


def test_a_service_without_funnel_takes_no_public_traffic(cert_tsnsrv, cert_tailnet, funnel_relay, upstream):
    # Its node may use Funnel (tag:public), but the service does not ask for it.
    service = cert_tsnsrv("private", upstream.url, auth_key=public_key(cert_tailnet))
    before = len(upstream.requests)

    answer = public_get(cert_tailnet, funnel_relay, service, "/hello", "-o", "/dev/null", "-w", "%{http_code}")

    assert answer.stdout == b"000"
    assert [refusal.status_line for refusal in funnel_relay.refusals
            if refusal.target.startswith("private.")] == ["HTTP/1.1 403 Forbidden"]
    assert len(upstream.requests) == before
    assert tailnet_get(cert_tailnet, service, "/hello", "-o", "/dev/null", "-w", "%{http_code}").stdout == b"200"


def test_funnel_is_refused_at_start_on_a_node_without_the_funnel_attribute(cert_tsnsrv, upstream):
    service = cert_tsnsrv("no-funnel", upstream.url, "--funnel", start=False)  # alice's key: no attribute
    service.start(wait=False)
    assert service.process.wait(60) == 2
    log = service.log()
    assert "this node may not use Funnel" in log and "nodeAttrs" in log
    assert "serve config set" not in log, "nothing is claimed when the configuration cannot work"


def test_funnel_is_refused_at_start_on_a_port_the_tailnet_does_not_allow(cert_tsnsrv, cert_tailnet, upstream):
    service = cert_tsnsrv("wrong-port", upstream.url, "--funnel", "--listen-port", "8443", start=False,
                          auth_key=public_key(cert_tailnet, "tag:public-443"))
    service.start(wait=False)
    assert service.process.wait(60) == 2
    assert "Funnel allows ports 443 on this tailnet, not 8443" in service.log()
