"""What a user migrating from the Go tsnsrv keeps: the same upstream, behind the Go tsnsrv
and behind ours on the same tailnet, sees the same thing for the same request.

The Go tsnsrv is built from the source beside the checkout (harness/go_tsnsrv.py).
"""

from __future__ import annotations

import sys

import pytest

from harness.go_tsnsrv import GoTsnsrv, build_go_tsnsrv
from harness.rawhttp import RawAnswer, get_request, raw_exchanges
from harness.scripted_upstream import ScriptedUpstream
from harness.upstream import echo


@pytest.fixture(scope="module")
def go_binary():
    return build_go_tsnsrv()


@pytest.fixture(scope="module")
def both(go_binary, module_tsnsrv, upstream, headscale, clients, tmp_path_factory):
    """(ours, the Go tsnsrv) in front of the same upstream."""
    ours = module_tsnsrv("compat-ours", upstream.url)
    go = GoTsnsrv(go_binary, "compat-go", upstream.url, tmp_path_factory.mktemp("go-tsnsrv"), headscale,
                  headscale.auth_key("alice")).start(clients)
    yield ours, go
    go.stop()


def identity_headers(seen: dict[str, str]) -> dict[str, object]:
    """X-Tailscale-* as the upstream saw them; lists built from Go maps compared as sets."""
    headers: dict[str, object] = {}
    for name, value in seen.items():
        if name.startswith("x-tailscale-"):
            headers[name] = set(value.split(", ")) if name.endswith("-caps") else value
    return headers


@pytest.mark.parametrize("client_fixture", ["laptop", "ci_runner", "bob_phone"])
def test_identity_headers_match_the_go_tsnsrv(both, client_fixture, request):
    ours, go = both
    client = request.getfixturevalue(client_fixture)

    from_ours = identity_headers(echo(client.curl(f"http://{ours.ip}/who").stdout)["header"])
    from_go = identity_headers(echo(client.curl(f"http://{go.ip}/who").stdout)["header"])

    assert from_ours == from_go
    assert from_ours["x-tailscale-user"].startswith("userid:")
    assert from_ours["x-tailscale-node"].startswith("nodeid:")


def through_both(both, laptop, request_bytes: bytes) -> tuple[RawAnswer, RawAnswer]:
    ours, go = both
    return tuple(raw_exchanges(laptop.run, sys.executable, service.ip, 80, [request_bytes])[0]
                 for service in (ours, go))  # type: ignore[return-value]


def test_options_asterisk_is_answered_like_the_go_tsnsrv(both, laptop):
    ours, go = through_both(both, laptop, b"OPTIONS * HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n")
    assert ours.status == go.status == 200


def test_an_absolute_form_target_names_the_host_like_the_go_tsnsrv(both, laptop):
    request = get_request("http://elsewhere.example/absolute?x=1", "books")
    ours, go = through_both(both, laptop, request)

    seen_ours, seen_go = echo(ours.body.encode()), echo(go.body.encode())
    assert seen_ours["header"]["host"] == seen_go["header"]["host"] == "elsewhere.example"
    assert seen_ours["header"]["x-forwarded-host"] == "elsewhere.example"
    assert seen_ours["path"] == seen_go["path"] == "/absolute"


def test_the_clean_path_redirect_keeps_the_method_like_the_go_tsnsrv(both, laptop):
    request = b"POST /a/../b HTTP/1.1\r\nHost: books\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    ours, go = through_both(both, laptop, request)
    assert ours.status == 308  # Go says 307; both tell the client to repeat the POST
    assert go.status == 307
    assert "location: /b" in ours.head.lower() and "location: /b" in go.head.lower()


# --- HTTP details, against an upstream that scripts its bytes --------------------------


@pytest.fixture(scope="module")
def scripted():
    server = ScriptedUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def both_scripted(go_binary, module_tsnsrv, scripted, headscale, clients, tmp_path_factory):
    ours = module_tsnsrv("wire-ours", scripted.url)
    go = GoTsnsrv(go_binary, "wire-go", scripted.url, tmp_path_factory.mktemp("go-wire"), headscale,
                  headscale.auth_key("alice")).start(clients)
    yield ours, go
    go.stop()


def test_103_early_hints_are_dropped_and_the_final_response_arrives_whole(both_scripted, laptop):
    # A difference from the Go tsnsrv (docs/coming-from-go.md): aiohttp's client
    # reads past 1xx responses, so the hints are lost; the page itself is not.
    ours, go = through_both(both_scripted, laptop, get_request("/early-hints", "books"))
    assert ours.head.startswith("HTTP/1.1 200 OK\r\n") and "103" not in ours.head, ours.head
    assert ours.body == "hints"
    assert go.head.startswith("HTTP/1.1 103 Early Hints\r\n"), go.head


def test_response_trailers_are_dropped_and_the_upstream_is_not_offered_them(both_scripted, laptop, scripted):
    # A difference from the Go tsnsrv (docs/coming-from-go.md): aiohttp's client
    # reads past trailers, so tsnsrv does not tell the upstream that its client takes them.
    before = len(scripted.heads)
    ours, go = through_both(both_scripted, laptop, get_request("/trailers", "books", headers="TE: trailers\r\n"))
    assert ours.status == go.status == 200
    assert ours.body == "5\r\nhello\r\n0\r\n\r\n", ours.body  # the whole body, properly ended
    assert go.body.endswith("0\r\nX-Checksum: 42\r\n\r\n"), go.body
    ours_head, go_head = scripted.heads[before:]
    assert b"\r\nte:" not in ours_head.lower(), ours_head
    assert b"\r\nte: trailers\r\n" in go_head.lower(), go_head


@pytest.mark.parametrize("size", [900 << 10, 1100 << 10])
def test_request_head_limits_match_the_go_tsnsrv(both_scripted, laptop, size):
    request = get_request("/echo", "books", headers="X-Big: " + "b" * size + "\r\n")
    ours, go = through_both(both_scripted, laptop, request)
    expected = 200 if size < 1 << 20 else 431
    assert ours.status == go.status == expected, (ours.head, go.head)


def test_many_request_and_response_headers_pass_like_the_go_tsnsrv(both_scripted, laptop):
    many = "".join(f"X-Client-{i}: {i}\r\n" for i in range(300))
    for answer in through_both(both_scripted, laptop, get_request("/echo", "books", headers=many)):
        assert answer.status == 200 and "X-Client-299: 299" in answer.body
    for answer in through_both(both_scripted, laptop, get_request(f"/many-headers?n=300&size={100 << 10}", "books")):
        assert answer.status == 200, answer.head[:200]
        assert "x-header-300: value 300" in answer.head.lower() and len(answer.head) > 100 << 10


def test_a_switch_of_protocols_nobody_asked_for_is_a_502_like_the_go_tsnsrv(both_scripted, laptop):
    # Relaying raw bytes after a 101 the client never asked for would hand the connection to
    # whatever protocol the upstream picked.
    for answer in through_both(both_scripted, laptop, get_request("/switch", "books")):
        assert answer.status == 502, answer.head
