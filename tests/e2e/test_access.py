"""Who may reach what: path prefixes (allow and deny) and access rules by identity."""

from __future__ import annotations

import pytest

from harness.upstream import echo

# On the stock and the trimmed tailscale alike (scripts/test runs `-m node` on each).
pytestmark = pytest.mark.node


def status(client, url: str) -> int:
    result = client.curl("-o", "/dev/null", "-w", "%{http_code}", url)
    return int(result.stdout or 0)


@pytest.fixture(scope="module")
def api_only(module_tsnsrv, upstream):
    return module_tsnsrv("api-only", upstream.url + "/base", "--prefix", "/api", "--prefix", "tailnet:/admin/",
                         "--prefix", "funnel:/public", "--deny-prefix", "/api/internal")


def test_prefixes_are_matched_by_path_segment(api_only, laptop):
    base = f"http://{api_only.ip}"
    assert status(laptop, f"{base}/api") == 200
    assert status(laptop, f"{base}/api/users") == 200
    assert status(laptop, f"{base}/apiary") == 404
    assert status(laptop, f"{base}/") == 404
    page = laptop.curl(f"{base}/apiary").stdout
    assert f"path=/apiary status=404 bytes_in=0 bytes_out={len(page)} " in api_only.log()  # the page counts


def test_matched_prefix_is_stripped_and_joined_to_the_upstream_base_path(api_only, laptop, upstream):
    seen = echo(laptop.curl(f"http://{api_only.ip}/api/users?page=2").stdout)
    assert seen["path"] == "/base/users"
    assert seen["query"] == "page=2"

    seen = echo(laptop.curl(f"http://{api_only.ip}/admin/panel").stdout)
    assert seen["path"] == "/base/panel"


def test_deny_prefixes_win_and_cannot_be_dodged_by_encoding(api_only, laptop):
    base = f"http://{api_only.ip}"
    assert status(laptop, f"{base}/api/internal") == 404
    assert status(laptop, f"{base}/api/internal/secrets") == 404
    assert status(laptop, f"{base}/api/%69nternal/secrets") == 404
    assert status(laptop, f"{base}/api/internals") == 200  # a different segment


def test_dot_segments_are_redirected_not_proxied(api_only, laptop, upstream):
    before = len(upstream.requests)
    result = laptop.curl("--path-as-is", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                         f"http://{api_only.ip}/api/../api/internal/x")
    code, location = result.stdout.decode().split(" ", 1)
    assert code == "308"
    assert location.endswith("/api/internal/x")
    assert len(upstream.requests) == before


def test_funnel_only_prefixes_do_not_apply_to_tailnet_clients(api_only, laptop):
    assert status(laptop, f"http://{api_only.ip}/public") == 404


def test_without_strip_prefix_the_path_is_kept(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("keep-prefix", upstream.url, "--prefix", "/api", "--no-strip-prefix")
    assert echo(laptop.curl(f"http://{service.ip}/api/x").stdout)["path"] == "/api/x"


def test_access_rules_tell_users_and_tagged_nodes_apart(make_tsnsrv, upstream, laptop, bob_phone, ci_runner):
    service = make_tsnsrv("family", upstream.url,
                          "--access", "allow /admin user:alice",
                          "--access", "deny tag:ci",
                          "--access", "allow /books user:bob user:alice")
    base = f"http://{service.ip}"

    assert status(laptop, f"{base}/admin/") == 200
    assert status(bob_phone, f"{base}/admin/") == 403
    assert status(bob_phone, f"{base}/books/1") == 200
    assert status(ci_runner, f"{base}/books/1") == 403
    assert status(ci_runner, f"{base}/other") == 403
    assert status(bob_phone, f"{base}/other") == 200  # no allow rule covers it

    denied = bob_phone.curl(f"{base}/admin/")
    assert b"family" in denied.stdout and b"bob" in denied.stdout
    assert service.metric("tsnsrv_denied_requests_total", 'reason="access_rule"') == 4  # with the one just above
    assert "denied GET /admin/ from bob on phone" in service.log()
