"""Signed identity assertions (tsnsrv.assertion): the claims, verified with PyJWT as an
upstream would; reuse and binding; the key schedule over simulated time; the key
directory's refusals."""

from __future__ import annotations

import json
import os
import stat

import jwt
import pytest

from harness.inprocess import upstream_headers_of

from tsnsrv.access import FUNNEL, TAILNET, Identity
from tsnsrv.assertion import (
    CLOCK_SKEW_MARGIN,
    HEADER,
    Asserter,
    AssertionSetupError,
    KeyDirectory,
    current_key,
    jwks,
    next_change,
    schedule,
    write_jwks_file,
)
from tsnsrv.config import load
from tsnsrv.front import Peer
from tsnsrv.metrics import Metrics
from tsnsrv.proxy import Proxy

ALICE = Identity(user_id="1", login_name="alice@example.com", display_name="Alice", node_id="7", node_name="laptop")
CI = Identity(user_id="3", login_name="tagged-devices", display_name="Tagged Devices", node_id="9",
              node_name="ci-runner", node_tags=("tag:ci",))
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_asserter(tmp_path, clock: Clock, **options) -> Asserter:
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083", "assertions": True, **options})
    asserter = Asserter(cfg, KeyDirectory(tmp_path / "keys", follow_symlinks=False), clock)
    asserter.set_issuer("https://books.tail1234.ts.net/")
    return asserter


def verify(token: str, key_set: bytes, now: float, audience: str = "books") -> dict:
    """What a PyJWT upstream does (pick the key by kid from the JWKS; check alg, aud, iss,
    required claims and expiry), at the simulated time `now`."""
    keys = jwt.PyJWKSet.from_json(key_set.decode())
    key = next(k for k in keys.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
    claims = jwt.decode(token, key, algorithms=["EdDSA"], audience=audience, issuer="https://books.tail1234.ts.net",
                        options={"require": ["exp", "iat", "sub"], "verify_exp": False, "verify_iat": False})
    if not claims["iat"] <= now < claims["exp"]:
        raise jwt.ExpiredSignatureError(f"not valid at {now}")
    return claims


def token_of(headers: list[tuple[str, str]]) -> str:
    [(name, value)] = headers
    assert name == HEADER
    return value


# --- the claims --------------------------------------------------------------------


def test_an_assertion_names_the_client_as_the_identity_headers_do(tmp_path):
    clock = Clock()
    asserter = make_asserter(tmp_path, clock)

    token = token_of(asserter.headers(ALICE, "GET", "/books?page=2"))

    claims = verify(token, asserter.jwks_bytes, clock.now)
    assert {key: claims[key] for key in ("iss", "aud", "sub", "login", "name", "node", "node_id", "tags")} == {
        "iss": "https://books.tail1234.ts.net", "aud": "books", "sub": "userid:1", "login": "alice@example.com",
        "name": "Alice", "node": "laptop", "node_id": "nodeid:7", "tags": []}
    assert claims["exp"] - claims["iat"] == 60
    assert len(claims["jti"]) >= 16
    assert "htm" not in claims and "htu" not in claims
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == json.loads(asserter.jwks_bytes)["keys"][0]["kid"]


def test_a_tagged_node_is_named_by_its_tags_and_the_tagged_devices_profile(tmp_path):
    clock = Clock()
    asserter = make_asserter(tmp_path, clock, assertionAudience="ci-dashboard")

    claims = verify(token_of(asserter.headers(CI, "GET", "/")), asserter.jwks_bytes, clock.now,
                    audience="ci-dashboard")

    assert (claims["sub"], claims["login"], claims["node"], claims["tags"]) == \
           ("userid:3", "tagged-devices", "ci-runner", ["tag:ci"])


def test_no_identity_no_assertion(tmp_path):
    asserter = make_asserter(tmp_path, Clock())
    assert asserter.headers(None, "GET", "/") == []


def test_another_audience_or_a_foreign_key_is_refused(tmp_path):
    clock = Clock()
    books = make_asserter(tmp_path / "books", clock)
    other = make_asserter(tmp_path / "other", clock, assertionAudience="other")
    token = token_of(other.headers(ALICE, "GET", "/"))

    with pytest.raises(jwt.InvalidAudienceError):
        verify(token, other.jwks_bytes, clock.now, audience="books")
    with pytest.raises(StopIteration):  # its kid is not among books' keys
        verify(token, books.jwks_bytes, clock.now, audience="other")


def test_the_request_path_sends_one_assertion_for_what_goes_upstream_and_none_of_the_clients(tmp_path):
    clock = Clock()
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083", "assertions": True,
                "assertionBindRequest": True})
    proxy = Proxy(cfg, None, Metrics())
    proxy.asserter = make_asserter(tmp_path, clock, assertionBindRequest=True)
    tailnet, funnel = Peer("100.64.0.5", 40000, TAILNET, tls=True), Peer("203.0.113.7", 50000, FUNNEL, tls=True)
    forged = {"Host": "books", HEADER: "forged", HEADER.replace("-", "_"): "forged"}

    sent = upstream_headers_of(proxy, forged, tailnet, ALICE, target="/api/x?y=1")
    public = upstream_headers_of(proxy, forged, funnel, None, target="/kobo/")

    [assertion] = sent.getall(HEADER)
    claims = verify(assertion, proxy.asserter.jwks_bytes, clock.now)
    assert (claims["login"], claims["htm"], claims["htu"]) == ("alice@example.com", "GET", "/api/x?y=1")
    assert HEADER not in public and HEADER.replace("-", "_") not in public


# --- reuse and binding -------------------------------------------------------------


def test_an_unbound_assertion_is_reused_until_shortly_before_it_expires(tmp_path):
    clock = Clock()
    asserter = make_asserter(tmp_path, clock)
    first = token_of(asserter.headers(ALICE, "GET", "/a"))

    clock.now += 49
    assert token_of(asserter.headers(ALICE, "POST", "/b")) == first
    assert token_of(asserter.headers(CI, "GET", "/a")) != first
    clock.now += 1.5  # less than 10 s (the margin) of its 60 s left
    renewed = token_of(asserter.headers(ALICE, "GET", "/a"))

    assert renewed != first
    assert verify(renewed, asserter.jwks_bytes, clock.now)["iat"] == int(clock.now)


def test_a_bound_assertion_names_its_request_and_is_made_for_each(tmp_path):
    clock = Clock()
    asserter = make_asserter(tmp_path, clock, assertionBindRequest=True)

    first = verify(token_of(asserter.headers(ALICE, "POST", "/api/x?y=1")), asserter.jwks_bytes, clock.now)
    second = verify(token_of(asserter.headers(ALICE, "POST", "/api/x?y=1")), asserter.jwks_bytes, clock.now)

    assert (first["htm"], first["htu"]) == ("POST", "/api/x?y=1")
    assert first["jti"] != second["jti"]


def test_a_new_issuer_drops_reused_assertions(tmp_path):
    clock = Clock()
    asserter = make_asserter(tmp_path, clock)
    old = token_of(asserter.headers(ALICE, "GET", "/"))

    asserter.set_issuer("https://books-1.tail1234.ts.net/")

    renewed = token_of(asserter.headers(ALICE, "GET", "/"))
    assert renewed != old
    assert jwt.decode(renewed, options={"verify_signature": False})["iss"] == "https://books-1.tail1234.ts.net"


# --- the key schedule ----------------------------------------------------------------


def test_first_start_signs_with_one_key_and_publishes_its_successor(tmp_path):
    keys = schedule([], T0, rotation=3600, lifetime=60)

    current = current_key(keys, T0)
    assert (current.signs_from, current.signs_until) == (T0, T0 + 3600)
    successor = next(key for key in keys if key is not current)
    assert (successor.signs_from, successor.signs_until) == (T0 + 3600, T0 + 7200)
    assert [key["kid"] for key in jwks(keys, T0)["keys"]] == [current.kid, successor.kid]
    assert next_change(keys, T0) == T0 + 3600


def test_keys_hand_over_and_a_retired_key_leaves_once_its_last_assertion_expired():
    rotation, lifetime = 100.0, 30.0
    keys = schedule([], T0, rotation, lifetime)
    first = current_key(keys, T0)

    keys = schedule(keys, T0 + rotation, rotation, lifetime)
    assert current_key(keys, T0 + rotation).signs_from == T0 + rotation
    assert first.kid in [key["kid"] for key in jwks(keys, T0 + rotation)["keys"]]
    gone_at = T0 + rotation + lifetime + CLOCK_SKEW_MARGIN
    assert next_change(keys, T0 + rotation) == gone_at

    keys = schedule(keys, gone_at, rotation, lifetime)
    assert first.kid not in [key["kid"] for key in jwks(keys, gone_at)["keys"]]
    assert len(keys) == 2


def test_through_many_rotations_every_assertion_verifies_with_any_jwks_file_read_since_one_rotation_before(tmp_path):
    """A verifier that reloads the JWKS file once per rotation period, or on an unknown
    kid, never meets a key it cannot find, before or after the key it signed with retires."""
    clock = Clock()
    jwks_file = tmp_path / "jwks.json"
    asserter = make_asserter(tmp_path, clock, assertionLifetime=30, assertionKeyRotation=100,
                             assertionJwksFile=str(jwks_file))
    snapshots: list[tuple[float, bytes]] = [(clock.now, jwks_file.read_bytes())]
    signed: list[tuple[float, str]] = []
    end = T0 + 1000
    while clock.now < end:
        # What keep_keys_current does at each of its wake-ups, here without waiting.
        wake = next_change(asserter.keys, clock.now)
        while clock.now < wake and clock.now < end:
            signed.append((clock.now, token_of(asserter.headers(ALICE, "GET", "/"))))
            clock.now += 7
        clock.now = max(clock.now, wake)
        asserter.renew(clock.now)
        snapshots.append((clock.now, jwks_file.read_bytes()))
        assert snapshots[-1][1] == asserter.jwks_bytes

    kids_used = {jwt.get_unverified_header(token)["kid"] for _, token in signed}
    assert len(kids_used) >= 9
    for issued, token in signed:
        expires = jwt.decode(token, options={"verify_signature": False})["exp"]
        usable = [key_set for taken, key_set in snapshots if issued - 100 < taken <= expires]
        # the snapshot in force when it was signed counts too
        usable.append(max((s for s in snapshots if s[0] <= issued), key=lambda s: s[0])[1])
        for key_set in usable:
            verify(token, key_set, issued)


def test_keys_survive_a_restart_and_a_longer_lifetime_extends_how_long_old_keys_stay(tmp_path):
    clock = Clock()
    before = make_asserter(tmp_path, clock, assertionKeyRotation=3600)
    token = token_of(before.headers(ALICE, "GET", "/"))

    clock.now += 10
    after = make_asserter(tmp_path, clock, assertionKeyRotation=3600, assertionLifetime=600)

    verify(token, after.jwks_bytes, clock.now)
    signing = current_key(after.keys, clock.now)
    assert signing.kid == current_key(before.keys, T0).kid
    assert signing.published_until == signing.signs_until + 600 + CLOCK_SKEW_MARGIN


# --- where the keys live ---------------------------------------------------------------


def test_the_private_keys_are_the_owners_alone_and_the_jwks_is_public(tmp_path):
    old_umask = os.umask(0o077)  # as NixOS units run
    try:
        asserter = make_asserter(tmp_path, Clock())
        write_jwks_file(tmp_path / "jwks.json", asserter.jwks_bytes)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "keys" / "keys.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "jwks.json").stat().st_mode) == 0o644
    published = json.loads((tmp_path / "jwks.json").read_text())["keys"]
    assert published and all(set(key) == {"kty", "crv", "x", "kid", "alg", "use"} for key in published)
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_a_key_directory_others_may_enter_is_refused(tmp_path):
    (tmp_path / "keys").mkdir(mode=0o755)
    (tmp_path / "keys").chmod(0o755)
    with pytest.raises(AssertionSetupError, match="must be uid .* private \\(0700\\)") as refused:
        KeyDirectory(tmp_path / "keys", follow_symlinks=False)
    assert refused.value.key == "assertionKeyDir"


def test_a_planted_link_is_never_followed(tmp_path):
    """In spawn mode the default key directory sits in a state directory that tailscaled's
    account owns: a link it planted there must not lead tsnsrv's keys elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "keys").symlink_to(elsewhere)
    with pytest.raises(AssertionSetupError, match="cannot create or open"):
        KeyDirectory(tmp_path / "keys", follow_symlinks=False)

    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "real" / "keys.json").symlink_to(tmp_path / "elsewhere" / "planted.json")
    (tmp_path / "elsewhere" / "planted.json").write_text('{"keys": []}')
    with pytest.raises(AssertionSetupError, match="cannot open"):
        KeyDirectory(tmp_path / "real", follow_symlinks=False).load()


def test_a_key_directory_of_another_account_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another account needs root")
    (tmp_path / "keys").mkdir(mode=0o700)
    os.chown(tmp_path / "keys", 65534, 65534)
    with pytest.raises(AssertionSetupError, match="belongs to uid 65534"):
        KeyDirectory(tmp_path / "keys", follow_symlinks=False)


def test_a_key_file_tsnsrv_did_not_write_is_refused(tmp_path):
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "keys.json").write_text('{"keys": [{"jwk": {"kty": "RSA"}}]}')
    with pytest.raises(AssertionSetupError, match="not a key file tsnsrv wrote"):
        KeyDirectory(tmp_path / "keys", follow_symlinks=False).load()
