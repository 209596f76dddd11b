"""Path prefixes and access rules (tsnsrv.access, config.AccessRule): parsing and decisions.

Properties over user-written strings: prefix matching is segment-aware, deny prefixes
win over allow prefixes, no rules means everyone passes, a rule survives parse→describe,
and garbage rule text is refused with ValueError, never a crash.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsnsrv.access import (
    FUNNEL,
    TAILNET,
    AccessPolicy,
    Identity,
    PathPolicy,
    Prefix,
    path_has_prefix,
    rule_matches,
)
from tsnsrv.config import AccessRule, ConfigError, load

SAFE = string.ascii_letters + string.digits + "-._~"
segment = st.text(SAFE, min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
segments = st.lists(segment, min_size=1, max_size=4)
prefix_paths = segments.map(lambda parts: "/" + "/".join(parts))
rests = st.lists(segment, min_size=0, max_size=3).map(lambda parts: "/".join(parts))
provenances = st.sampled_from([TAILNET, FUNNEL])

ALICE = Identity(user_id="1", login_name="alice@example.com", display_name="Alice", node_id="10",
                 node_name="alice-laptop")
BOB = Identity(user_id="2", login_name="bob@other.org", display_name="Bob", node_id="20", node_name="bob-phone")
CI = Identity(node_id="30", node_name="ci-runner", node_tags=("tag:ci",))
CAPPED = Identity(user_id="3", login_name="carol@example.com", node_name="carol",
                  peer_caps={"example.com/cap/admin": [{}]})


# --- segment-aware prefixes --------------------------------------------------------


@pytest.mark.parametrize(("path", "prefix", "expected"), [
    ("/api", "/api", True),
    ("/api/", "/api", True),
    ("/api/v1/x", "/api", True),
    ("/apiary", "/api", False),
    ("/ap", "/api", False),
    ("/api", "/api/", False),
    ("/api/x", "/api/", True),
    ("/anything/at/all", "/", True),
    ("/", "/", True),
])
def test_path_has_prefix_examples(path, prefix, expected):
    assert path_has_prefix(path, prefix) is expected


@given(prefix=prefix_paths, rest=rests)
def test_prefix_matches_itself_and_everything_below(prefix, rest):
    assert path_has_prefix(prefix, prefix)
    assert path_has_prefix(prefix + "/" + rest, prefix)


@given(prefix=prefix_paths, tail=st.text(SAFE, min_size=1, max_size=8), rest=rests)
def test_prefix_never_matches_a_longer_segment(prefix, tail, rest):
    # "/api" must not cover "/apiary" or "/apiary/x".
    path = prefix + tail + ("/" + rest if rest else "")
    assert not path_has_prefix(path, prefix)
    policy = PathPolicy.from_config([prefix], [], strip=False)
    assert not policy.decide(path, TAILNET).allowed
    deny = PathPolicy.from_config([], [prefix], strip=False)
    # ...except as a format suffix: a format-suffix router serves "/api.json" from the "/api" view.
    format_suffix = not rest and tail.startswith(".") and len(tail) > 1 and "." not in tail[1:]
    assert deny.decide(path, TAILNET).allowed is not format_suffix


@given(prefix=prefix_paths, rest=rests, provenance=provenances, strip=st.booleans())
def test_deny_prefix_wins_over_allow_prefix(prefix, rest, provenance, strip):
    path = prefix + "/" + rest
    policy = PathPolicy.from_config(["/", prefix], [prefix], strip)
    decision = policy.decide(path, provenance)
    assert not decision.allowed
    assert prefix in decision.reason


@given(prefix=prefix_paths, rest=rests)
def test_allowed_prefix_is_stripped_exactly(prefix, rest):
    policy = PathPolicy.from_config([prefix], [], strip=True)
    decision = policy.decide(prefix + "/" + rest, TAILNET)
    assert decision.allowed
    assert decision.upstream_raw_path == "/" + rest


def test_no_prefixes_allow_everything_unchanged():
    decision = PathPolicy.from_config([], [], strip=True).decide("/x/%2Fy", FUNNEL)
    assert decision.allowed and decision.upstream_raw_path == "/x/%2Fy"


@pytest.mark.parametrize(("prefix", "raw", "upstream"), [
    ("/api", "/api", "/"),
    ("/api", "/api/", "/"),
    ("/api", "/api/v1?x", "/v1?x"),
    ("/api/", "/api/v1", "/v1"),
    ("/", "/x", "/x"),
])
def test_strip_prefix_examples(prefix, raw, upstream):
    assert PathPolicy.from_config([prefix], [], strip=True).decide(raw, TAILNET).upstream_raw_path == upstream


def test_without_strip_the_raw_path_is_kept():
    decision = PathPolicy.from_config(["/api"], [], strip=False).decide("/api/v1", TAILNET)
    assert decision.allowed and decision.upstream_raw_path == "/api/v1"


def test_percent_encoding_does_not_dodge_a_deny_prefix():
    policy = PathPolicy.from_config([], ["/admin"], strip=True)
    assert not policy.decide("/%61dmin", TAILNET).allowed
    assert not policy.decide("/%61dmin/users", TAILNET).allowed
    assert policy.decide("/%61dministrators", TAILNET).allowed


def test_allow_prefix_must_appear_literally_in_the_raw_path():
    # Decoded "/api/x" is under /api, but the raw form cannot be stripped exactly: refused.
    decision = PathPolicy.from_config(["/api"], [], strip=True).decide("/%61pi/x", TAILNET)
    assert not decision.allowed
    assert "no allowed prefix for tailnet clients" in decision.reason


def test_qualified_prefixes_apply_to_one_kind_of_client():
    policy = PathPolicy.from_config(["tailnet:/", "funnel:/public"], ["funnel:/public/secret"], strip=False)
    assert policy.decide("/admin", TAILNET).allowed
    assert not policy.decide("/admin", FUNNEL).allowed
    assert policy.decide("/public/a", FUNNEL).allowed
    assert not policy.decide("/public/secret", FUNNEL).allowed
    assert policy.decide("/public/secret", TAILNET).allowed


def test_prefix_parse_and_str():
    assert Prefix.parse("tailnet:/a") == Prefix("/a", TAILNET)
    assert Prefix.parse("funnel:/b") == Prefix("/b", FUNNEL)
    assert Prefix.parse("/c") == Prefix("/c", None)
    assert str(Prefix.parse("funnel:/b")) == "funnel:/b"
    assert str(Prefix.parse("/c")) == "/c"


# --- rule parsing ------------------------------------------------------------------


def test_rule_parse_every_selector_kind():
    rule = AccessRule.parse("allow tailnet:/admin user:a@b.c domain:example.com node:nas tag:ci cap:example.com/cap/x")
    assert rule == AccessRule("allow", "tailnet:/admin", users=["a@b.c"], domains=["example.com"], nodes=["nas"],
                              tags=["tag:ci"], capabilities=["example.com/cap/x"])


def test_rule_defaults_to_the_whole_site():
    assert AccessRule.parse("deny") == AccessRule("deny", "/")
    assert AccessRule.parse("  allow   user:x  ") == AccessRule("allow", "/", users=["x"])


def test_capability_values_keep_their_colons():
    assert AccessRule.parse("allow cap:https://example.com/cap/a").capabilities == ["https://example.com/cap/a"]


@pytest.mark.parametrize(("text", "message"), [
    ("", 'must start with "allow" or "deny"'),
    ("permit /", 'must start with "allow" or "deny"'),
    ("Allow /", 'must start with "allow" or "deny"'),
    ("allow /a /b", "more than one path prefix"),
    ("allow bob", '"bob" in "allow bob" is not a selector'),
    ("allow user:", "is not a selector"),
    ("allow group:admins", "is not a selector; use user:, domain:, node:, tag: or cap:"),
])
def test_bad_rules_are_refused_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        AccessRule.parse(text)


selector_values = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1,
                          max_size=10).filter(lambda s: not any(c.isspace() for c in s))
rules = st.builds(
    AccessRule,
    action=st.sampled_from(["allow", "deny"]),
    prefix=st.tuples(st.sampled_from(["", "tailnet:", "funnel:"]), prefix_paths | st.just("/")).map("".join),
    users=st.lists(selector_values, max_size=2),
    domains=st.lists(selector_values, max_size=2),
    nodes=st.lists(selector_values, max_size=2),
    tags=st.lists(selector_values.map(lambda v: "tag:" + v), max_size=2),
    capabilities=st.lists(selector_values, max_size=2),
)


@given(rules)
def test_rule_parse_describe_round_trip(rule):
    assert AccessRule.parse(rule.describe()) == rule


@given(st.text(max_size=60))
def test_garbage_rule_text_raises_value_error_or_parses(text):
    try:
        rule = AccessRule.parse(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert rule.action in ("allow", "deny")
    assert AccessRule.parse(rule.describe()) == rule


@given(st.text(max_size=40))
def test_garbage_rule_text_in_a_config_is_a_config_error(text):
    try:
        cfg = load({"name": "a", "toURL": "http://x", "accessRules": [text]})
    except ConfigError as exc:
        assert all(p.startswith('"accessRules": entry 0: ') for p in exc.problems), exc.problems
        return
    assert len(cfg.access_rules) == 1


# --- rule evaluation ---------------------------------------------------------------


def policy(*texts: str) -> AccessPolicy:
    return AccessPolicy.from_rules([AccessRule.parse(t) for t in texts])


identities = st.builds(
    Identity,
    user_id=st.text(max_size=5), login_name=st.text(max_size=20), display_name=st.text(max_size=10),
    node_id=st.text(max_size=5), node_name=st.text(max_size=10),
    node_tags=st.lists(st.text(max_size=8).map(lambda t: "tag:" + t), max_size=2).map(tuple),
    peer_caps=st.dictionaries(st.text(max_size=10), st.just([]), max_size=2),
) | st.none()


@given(identity=identities, path=st.text(max_size=30), provenance=provenances)
def test_no_rules_allow_any_identity(identity, path, provenance):
    decision = AccessPolicy.from_rules([]).decide(path, provenance, identity)
    assert decision.allowed and decision.reason == "no rule applies"


@given(identity=identities, prefix=prefix_paths, rest=rests, provenance=provenances)
def test_selectorless_deny_denies_everyone_under_its_prefix(identity, prefix, rest, provenance):
    decision = policy(f"deny {prefix}").decide(prefix + "/" + rest, provenance, identity)
    assert not decision.allowed


def test_allow_rule_makes_an_allow_list_for_its_prefix():
    p = policy("allow /admin user:alice@example.com")
    assert p.decide("/admin/x", TAILNET, ALICE).allowed
    denied = p.decide("/admin/x", TAILNET, BOB)
    assert not denied.allowed and denied.reason == "no allow rule for this path matches the client"
    assert not p.decide("/admin", FUNNEL, None).allowed
    assert p.decide("/public", TAILNET, BOB).allowed
    assert p.decide("/administrators", TAILNET, BOB).allowed


def test_first_matching_rule_wins():
    p = policy("deny /admin/danger", "allow /admin user:alice@example.com")
    assert not p.decide("/admin/danger", TAILNET, ALICE).allowed
    assert p.decide("/admin/ok", TAILNET, ALICE).allowed
    decision = policy("allow / user:alice@example.com", "deny /").decide("/", TAILNET, ALICE)
    assert decision.allowed and decision.reason == 'rule "allow / user:alice@example.com"'


@pytest.mark.parametrize(("rule", "identity", "matches"), [
    ("allow domain:example.com", ALICE, True),
    ("allow domain:example.com", BOB, False),
    ("allow node:bob-phone", BOB, True),
    ("allow node:bob-phone", ALICE, False),
    ("allow tag:ci", CI, True),
    ("allow tag:ci", ALICE, False),
    ("allow cap:example.com/cap/admin", CAPPED, True),
    ("allow cap:example.com/cap/admin", ALICE, False),
    ("allow user:alice@example.com", ALICE, True),
    ("allow user:alice@example.com", None, False),
    ("allow", None, True),
])
def test_selector_kinds(rule, identity, matches):
    assert rule_matches(AccessRule.parse(rule), identity) is matches


def test_tagged_node_matches_no_user_or_domain_rule():
    tagged = Identity.from_whois({"UserProfile": {"ID": 9, "LoginName": "tagged-devices", "DisplayName": "x"},
                                  "Node": {"ID": 5, "Name": "ci.tail.ts.net.", "Tags": ["tag:ci"]}})
    assert not rule_matches(AccessRule.parse("allow user:tagged-devices"), tagged)
    assert not rule_matches(AccessRule("allow", domains=[""]), tagged)
    assert rule_matches(AccessRule.parse("allow node:ci"), tagged)


def test_rules_with_qualified_prefixes_only_apply_to_their_clients():
    p = policy("deny funnel:/private", "allow tailnet:/private user:alice@example.com")
    assert not p.decide("/private/x", FUNNEL, None).allowed
    assert p.decide("/private/x", TAILNET, ALICE).allowed
    assert not p.decide("/private/x", TAILNET, BOB).allowed
    assert p.decide("/public", FUNNEL, None).allowed
