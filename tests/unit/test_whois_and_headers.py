"""Who a request comes from (tsnsrv.identity): whois answers, the two identity header
schemas, Q-encoding, the whois cache, and which inbound headers count as spoofable.

The whois cache is driven with a fake async whois *function* and a fake clock; the real
LocalAPI whois is exercised by the end-to-end suites.
"""

from __future__ import annotations

import asyncio
import email.header
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsnsrv import identity as identity_module
from tsnsrv.access import Identity
from tsnsrv.identity import (
    IdentityUnavailable,
    WhoisCache,
    _q_encode,
    is_spoofable,
    is_tailnet_address,
    serve_headers,
    tsnsrv_headers,
)
from tsnsrv.metrics import Metrics

USER_WHOIS = {
    "Node": {"ID": 12345, "Name": "alice-laptop.tail1234.ts.net.", "ComputedName": "alice-laptop",
             "CapMap": {"https://tailscale.com/cap/is-admin": None, "funnel": None}},
    "UserProfile": {"ID": 678, "LoginName": "alice@example.com", "DisplayName": "Alice Example",
                    "ProfilePicURL": "https://pics.example/alice.png"},
    "CapMap": {"example.com/cap/books": [{"shelf": "all"}], "example.com/cap/other": [1]},
}
TAGGED_WHOIS = {
    "Node": {"ID": 999, "Name": "ci-runner.tail1234.ts.net.", "Tags": ["tag:ci", "tag:build"]},
    "UserProfile": {"ID": 1, "LoginName": "tagged-devices", "DisplayName": "Tagged Devices"},
}


# --- whois answers -------------------------------------------------------------------


def test_user_node_identity():
    ident = Identity.from_whois(USER_WHOIS)
    assert ident.user_id == "678"
    assert ident.login_name == "alice@example.com"
    assert ident.domain == "example.com"
    assert ident.display_name == "Alice Example"
    assert ident.node_id == "12345"
    assert ident.node_name == "alice-laptop"
    assert ident.node_caps == ("funnel", "https://tailscale.com/cap/is-admin")
    assert not ident.tagged
    assert ident.describe() == "alice@example.com on alice-laptop"


def test_tagged_node_belongs_to_nobody():
    ident = Identity.from_whois(TAGGED_WHOIS)
    assert ident.tagged
    assert (ident.user, ident.domain) == ("", "")
    assert (ident.user_id, ident.login_name, ident.display_name) == ("1", "tagged-devices", "Tagged Devices")
    assert ident.node_name == "ci-runner"  # from Name when there is no ComputedName
    assert ident.node_tags == ("tag:ci", "tag:build")
    assert ident.describe() == "node ci-runner (tag:ci,tag:build)"


def test_sparse_whois_answer():
    ident = Identity.from_whois({"Node": {}, "UserProfile": None})
    assert ident == Identity()
    assert ident.describe() == "unknown user on unknown node"


# --- the tsnsrv (Go tsnsrv) schema ------------------------------------------------------


def test_tsnsrv_headers_for_a_user_node():
    assert tsnsrv_headers(Identity.from_whois(USER_WHOIS)) == [
        ("X-Tailscale-User", "userid:678"),
        ("X-Tailscale-User-LoginName", "alice@example.com"),
        ("X-Tailscale-User-LoginName-Localpart", "alice"),
        ("X-Tailscale-User-LoginName-Domain", "example.com"),
        ("X-Tailscale-User-DisplayName", "Alice Example"),
        ("X-Tailscale-User-ProfilePicURL", "https://pics.example/alice.png"),
        ("X-Tailscale-Caps", "example.com/cap/books, example.com/cap/other"),
        ("X-Tailscale-Node", "nodeid:12345"),
        ("X-Tailscale-Node-Name", "alice-laptop"),
        ("X-Tailscale-Node-Caps", "funnel, https://tailscale.com/cap/is-admin"),
    ]


def test_tsnsrv_headers_for_a_tagged_node_name_its_pseudo_user_as_the_go_tsnsrv_does():
    headers = tsnsrv_headers(Identity.from_whois(TAGGED_WHOIS))
    assert headers == [
        ("X-Tailscale-User", "userid:1"),
        ("X-Tailscale-User-LoginName", "tagged-devices"),
        ("X-Tailscale-User-DisplayName", "Tagged Devices"),
        ("X-Tailscale-Node", "nodeid:999"),
        ("X-Tailscale-Node-Name", "ci-runner"),
        ("X-Tailscale-Node-Tags", "tag:ci, tag:build"),
    ]


def test_login_without_at_sign_has_no_localpart_or_domain():
    names = [name for name, _ in tsnsrv_headers(Identity(user_id="1", login_name="alice"))]
    assert "X-Tailscale-User-LoginName-Localpart" not in names
    assert "X-Tailscale-User-LoginName-Domain" not in names
    assert "X-Tailscale-User-ProfilePicURL" not in names


def test_header_values_cannot_smuggle_new_lines():
    ident = Identity(user_id="1", login_name="a@b", display_name="Eve\r\nX-Tailscale-User: admin")
    for _, value in tsnsrv_headers(ident) + serve_headers(ident, False, []):
        assert "\r" not in value and "\n" not in value
    assert ("X-Tailscale-User-DisplayName", "Eve  X-Tailscale-User: admin") in tsnsrv_headers(ident)


# --- the serve (`tailscale serve`) schema ---------------------------------------------


def test_serve_headers_for_a_user_node():
    assert serve_headers(Identity.from_whois(USER_WHOIS), funnel=False, app_capabilities=[]) == [
        ("Tailscale-User-Login", "alice@example.com"),
        ("Tailscale-User-Name", "Alice Example"),
        ("Tailscale-User-Profile-Pic", "https://pics.example/alice.png"),
        ("Tailscale-Headers-Info", "https://tailscale.com/s/serve-headers"),
    ]


def test_serve_headers_for_a_tagged_node_are_empty_without_capabilities():
    assert serve_headers(Identity.from_whois(TAGGED_WHOIS), funnel=False, app_capabilities=[]) == []


def test_serve_headers_send_only_granted_requested_capabilities():
    headers = dict(serve_headers(Identity.from_whois(USER_WHOIS), False,
                                 ["example.com/cap/books", "example.com/cap/missing"]))
    assert headers["Tailscale-App-Capabilities"] == '{"example.com/cap/books":[{"shelf":"all"}]}'


def test_serve_headers_for_tagged_node_with_capabilities():
    ident = Identity.from_whois({**TAGGED_WHOIS, "CapMap": {"example.com/cap/ci": [{}]}})
    assert serve_headers(ident, False, ["example.com/cap/ci"]) == [
        ("Tailscale-App-Capabilities", '{"example.com/cap/ci":[{}]}')]


def test_serve_headers_for_funnel_and_unknown_clients():
    assert serve_headers(Identity.from_whois(USER_WHOIS), funnel=True, app_capabilities=[]) == [
        ("Tailscale-Funnel-Request", "?1")]
    assert serve_headers(None, funnel=True, app_capabilities=["x"]) == [("Tailscale-Funnel-Request", "?1")]
    assert serve_headers(None, funnel=False, app_capabilities=["x"]) == []


def test_non_ascii_display_name_is_q_encoded():
    ident = Identity(user_id="1", login_name="zoe@example.com", display_name="Zoë Müller")
    headers = dict(serve_headers(ident, False, []))
    assert headers["Tailscale-User-Name"] == "=?utf-8?q?Zo=C3=AB_M=C3=BCller?="
    assert headers["Tailscale-User-Login"] == "zoe@example.com"


@pytest.mark.parametrize("text", ["plain ascii", "", "a=b?c_d"])
def test_ascii_is_sent_as_is(text):
    assert _q_encode(text) == text


@given(st.text(min_size=1).filter(lambda s: not s.isascii()))
def test_q_encoding_decodes_back_and_is_plain_ascii_token_text(text):
    encoded = _q_encode(text)
    assert encoded.isascii()
    assert encoded.startswith("=?utf-8?q?") and encoded.endswith("?=")
    inner = encoded[len("=?utf-8?q?"):-2]
    assert " " not in inner and "?" not in inner and "\r" not in inner and "\n" not in inner
    [(raw, charset)] = email.header.decode_header(encoded)
    assert charset == "utf-8"
    assert raw.decode("utf-8") == text


# --- spoofable inbound headers ----------------------------------------------------------


SPOOFABLE = ["X-Tailscale-User", "x-tailscale-user-login", "X-TAILSCALE-NODE", "Tailscale-User-Login",
             "tailscale-app-capabilities", "TAILSCALE-FUNNEL-REQUEST", "Forwarded", "FORWARDED",
             "X-Forwarded-For", "x-forwarded-host", "X-Forwarded-Proto", "X-FORWARDED-SERVER", "X-Real-Ip",
             "x-real-ip", "X-REAL-IP", "X-Scheme", "x-scheme", "X-Tailscale-", "Tailscale-Headers-Info"]
NOT_SPOOFABLE = ["Host", "Authorization", "Cookie", "X-Request-Id", "Tailscale", "X-Tailscale", "X-Forwarded",
                 "Forwarded-For", "X-Real", "Content-Type", "Upgrade"]


@pytest.mark.parametrize("name", SPOOFABLE)
def test_spoofable_headers(name):
    assert is_spoofable(name)


@pytest.mark.parametrize("name", NOT_SPOOFABLE)
def test_ordinary_headers_are_kept(name):
    assert not is_spoofable(name)


@given(base=st.sampled_from(["x-tailscale-", "tailscale-", "x-forwarded-"]),
       rest=st.text("abcdefghijklmnopqrstuvwxyz-", max_size=12), flips=st.lists(st.booleans(), min_size=40,
                                                                                 max_size=40))
def test_spoofable_prefixes_in_any_case(base, rest, flips):
    name = "".join(c.upper() if flip else c for c, flip in zip(base + rest, flips))
    assert is_spoofable(name)


# --- tailnet addresses (front listener's funnel classification) -----------------------------


@pytest.mark.parametrize(("address", "tailnet"), [
    ("100.64.0.1", True), ("100.127.255.254", True), ("100.100.100.100", True),
    ("100.63.255.255", False), ("100.128.0.0", False), ("203.0.113.9", False), ("127.0.0.1", False),
    ("fd7a:115c:a1e0::1", True), ("fd7a:115c:a1e0:ab12::1", True), ("fd7a:115c:a1e1::1", False), ("::1", False),
    ("2001:db8::1", False),
])
def test_tailnet_address_classification(address, tailnet):
    assert is_tailnet_address(ipaddress.ip_address(address)) is tailnet


# --- the whois cache -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeWhois:
    """An async whois function: answers from a table, records every call, can be held."""

    def __init__(self, answers: dict[str, dict | None] | None = None, fail: set[str] | None = None):
        self.answers = answers or {}
        self.fail = fail or set()
        self.calls: list[tuple[str, float | None]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, address: str, timeout: float | None) -> dict | None:
        self.calls.append((address, timeout))
        if self.gate is not None:
            await self.gate.wait()
        if address in self.fail:
            raise ConnectionError("tailscaled went away")
        return self.answers.get(address, USER_WHOIS)

    def count(self, address: str) -> int:
        return sum(1 for called, _ in self.calls if called == address)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(identity_module, "time", fake)
    return fake


def lookups(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("tsnsrv_whois_lookups_total", {"result": result}) or 0.0


@pytest.mark.asyncio
async def test_cache_answers_within_ttl_and_asks_again_after(clock):
    whois, metrics = FakeWhois(), Metrics()
    cache = WhoisCache(whois, timeout=1.5, metrics=metrics, ttl=10.0)
    first = await cache.lookup("100.64.0.1")
    assert first == Identity.from_whois(USER_WHOIS)
    clock.now += 9.9
    assert await cache.lookup("100.64.0.1") == first
    assert whois.calls == [("100.64.0.1", 1.5)]
    clock.now += 0.2
    await cache.lookup("100.64.0.1")
    assert whois.count("100.64.0.1") == 2
    assert (lookups(metrics, "found"), lookups(metrics, "cached")) == (2.0, 1.0)


@pytest.mark.asyncio
async def test_zero_timeout_means_no_timeout(clock):
    whois = FakeWhois()
    await WhoisCache(whois, timeout=0, metrics=Metrics()).lookup("100.64.0.1")
    assert whois.calls == [("100.64.0.1", None)]


@pytest.mark.asyncio
async def test_unknown_addresses_are_cached_as_no_identity(clock):
    whois, metrics = FakeWhois({"100.64.0.2": None}), Metrics()
    cache = WhoisCache(whois, timeout=1, metrics=metrics)
    assert await cache.lookup("100.64.0.2") is None
    assert await cache.lookup("100.64.0.2") is None
    assert whois.count("100.64.0.2") == 1
    assert (lookups(metrics, "unknown"), lookups(metrics, "cached")) == (1.0, 1.0)


@pytest.mark.asyncio
async def test_failures_are_reported_and_not_cached(clock):
    whois, metrics = FakeWhois(fail={"100.64.0.3"}), Metrics()
    cache = WhoisCache(whois, timeout=1, metrics=metrics)
    with pytest.raises(IdentityUnavailable):
        await cache.lookup("100.64.0.3")
    whois.fail.clear()
    assert await cache.lookup("100.64.0.3") == Identity.from_whois(USER_WHOIS)
    assert whois.count("100.64.0.3") == 2
    assert (lookups(metrics, "error"), lookups(metrics, "found")) == (1.0, 1.0)


@pytest.mark.asyncio
async def test_concurrent_lookups_of_a_new_address_share_one_whois(clock):
    whois, metrics = FakeWhois(), Metrics()
    whois.gate = asyncio.Event()
    cache = WhoisCache(whois, timeout=1, metrics=metrics)
    tasks = [asyncio.create_task(cache.lookup("100.64.0.4")) for _ in range(5)]
    other = asyncio.create_task(cache.lookup("100.64.0.5"))
    while len(whois.calls) < 2:
        await asyncio.sleep(0)
    whois.gate.set()
    results = await asyncio.gather(*tasks, other)
    assert all(result == Identity.from_whois(USER_WHOIS) for result in results)
    assert whois.count("100.64.0.4") == 1 and whois.count("100.64.0.5") == 1
    assert lookups(metrics, "found") == 2.0


@pytest.mark.asyncio
async def test_least_recently_used_entry_is_evicted(clock):
    whois = FakeWhois()
    cache = WhoisCache(whois, timeout=1, metrics=Metrics(), ttl=60, max_entries=2)
    await cache.lookup("100.64.0.1")
    await cache.lookup("100.64.0.2")
    await cache.lookup("100.64.0.1")  # hit: now the most recently used
    await cache.lookup("100.64.0.3")  # evicts 100.64.0.2
    await cache.lookup("100.64.0.1")
    assert whois.count("100.64.0.1") == 1
    await cache.lookup("100.64.0.2")
    assert whois.count("100.64.0.2") == 2


@pytest.mark.asyncio
async def test_a_refreshed_entry_counts_as_recently_used(clock):
    whois = FakeWhois()
    cache = WhoisCache(whois, timeout=1, metrics=Metrics(), ttl=10, max_entries=2)
    await cache.lookup("100.64.0.1")      # t=1000
    clock.now += 1
    await cache.lookup("100.64.0.2")      # t=1001
    clock.now += 10
    await cache.lookup("100.64.0.1")      # t=1011: expired, asked again, fresh until 1021
    clock.now += 1
    await cache.lookup("100.64.0.3")      # t=1012: must evict 100.64.0.2 (expired, least recently used)
    await cache.lookup("100.64.0.1")
    assert whois.count("100.64.0.1") == 2


@pytest.mark.asyncio
async def test_a_cancelled_first_caller_does_not_cost_the_others_their_identity(clock):
    whois = FakeWhois()
    whois.gate = asyncio.Event()
    cache = WhoisCache(whois, timeout=1, metrics=Metrics())
    first = asyncio.create_task(cache.lookup("100.64.0.6"))
    second = asyncio.create_task(cache.lookup("100.64.0.6"))
    while not whois.calls:
        await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    whois.gate.set()
    assert await second == Identity.from_whois(USER_WHOIS)
