"""Which requests may pass: path prefixes and identity rules. Pure functions, no I/O.

Paths are compared after percent-decoding, segment by segment: "/api" matches "/api"
and "/api/x" but not "/apiary", and a deny prefix cannot be dodged by writing
"/%61dmin". Paths with dot segments or doubled slashes are not matched at all; the
proxy redirects them to their clean form first (as Go's ServeMux does for the Go
tsnsrv), so "/public/../admin" never reaches the upstream.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from urllib.parse import unquote

import attrs

from .config import PREFIX_QUALIFIERS, AccessRule

TAILNET, FUNNEL = "tailnet", "funnel"


@attrs.frozen
class Prefix:
    path: str
    applies_to: str | None = None  # TAILNET, FUNNEL or None for both

    @classmethod
    def parse(cls, text: str) -> Prefix:
        for qualifier in PREFIX_QUALIFIERS:
            if text.startswith(qualifier):
                return cls(text[len(qualifier):], qualifier[:-1])
        return cls(text)

    def applies(self, provenance: str) -> bool:
        return self.applies_to is None or self.applies_to == provenance

    def matches(self, path: str, provenance: str) -> bool:
        return self.applies(provenance) and path_has_prefix(path, self.path)

    def covers(self, path: str, provenance: str) -> bool:
        """`matches`, and for a prefix written with a trailing slash also the bare
        directory: denying "/admin/" must deny "/admin" too."""
        if self.matches(path, provenance):
            return True
        return self.applies(provenance) and len(self.path) > 1 and self.path.endswith("/") and path == self.path[:-1]

    def __str__(self) -> str:
        return f"{self.applies_to}:{self.path}" if self.applies_to else self.path


def path_has_prefix(path: str, prefix: str) -> bool:
    """Segment-aware: "/api" covers "/api" and "/api/...", "/api/" covers "/api/...", "/" covers all."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


def clean_path(path: str) -> str:
    """Go's path.Clean, keeping a trailing slash: what a well-formed request path looks like."""
    if not path.startswith("/"):
        path = "/" + path
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


@attrs.frozen
class PathDecision:
    allowed: bool
    upstream_raw_path: str = ""  # raw (still encoded) path to send upstream, prefix stripped if asked
    reason: str = ""


@attrs.frozen
class PathPolicy:
    allow: tuple[Prefix, ...]
    deny: tuple[Prefix, ...]
    strip: bool

    @classmethod
    def from_config(cls, allow: Sequence[str], deny: Sequence[str], strip: bool) -> PathPolicy:
        return cls(tuple(map(Prefix.parse, allow)), tuple(map(Prefix.parse, deny)), strip)

    def decide(self, raw_path: str, provenance: str) -> PathDecision:
        path = unquote(raw_path)
        for prefix in self.deny:
            if prefix.covers(path, provenance):
                return PathDecision(False, reason=f"path is under deny prefix {prefix}")
        if not self.allow:
            return PathDecision(True, raw_path)
        for prefix in self.allow:
            # The raw path must carry the prefix literally too, so that stripping it is exact.
            if prefix.matches(path, provenance) and path_has_prefix(raw_path, prefix.path):
                if not self.strip:
                    return PathDecision(True, raw_path)
                rest = raw_path[len(prefix.path):]
                return PathDecision(True, rest if rest.startswith("/") else "/" + rest)
        return PathDecision(False, reason=f"path matches no allowed prefix for {provenance} clients")


@attrs.frozen
class Identity:
    """Who a tailnet request comes from, from the LocalAPI whois answer."""

    user_id: str = ""
    login_name: str = ""
    display_name: str = ""
    profile_pic_url: str = ""
    node_id: str = ""
    node_name: str = ""
    node_tags: tuple[str, ...] = ()
    node_caps: tuple[str, ...] = ()
    peer_caps: dict[str, list] = attrs.field(factory=dict)

    @property
    def tagged(self) -> bool:
        return bool(self.node_tags)

    @property
    def domain(self) -> str:
        return self.login_name.rpartition("@")[2] if "@" in self.login_name else ""

    def describe(self) -> str:
        if self.tagged:
            return f"node {self.node_name} ({','.join(self.node_tags)})"
        return f"{self.login_name or 'unknown user'} on {self.node_name or 'unknown node'}"

    @classmethod
    def from_whois(cls, whois: dict) -> Identity:
        user = whois.get("UserProfile") or {}
        node = whois.get("Node") or {}
        tags = tuple(node.get("Tags") or ())
        return cls(
            # Tagged nodes belong to the "tagged-devices" pseudo-user, which is nobody.
            user_id="" if tags else str(user.get("ID", "")),
            login_name="" if tags else user.get("LoginName", ""),
            display_name="" if tags else user.get("DisplayName", ""),
            profile_pic_url="" if tags else user.get("ProfilePicURL", ""),
            node_id=str(node.get("ID", "")),
            node_name=node.get("ComputedName") or node.get("Name", "").split(".")[0],
            node_tags=tags,
            node_caps=tuple(sorted(node.get("CapMap") or ())),
            peer_caps=dict(whois.get("CapMap") or {}),
        )


def rule_matches(rule: AccessRule, identity: Identity | None) -> bool:
    if not rule.selects_identity:
        return True
    if identity is None:
        return False
    return ((identity.login_name != "" and identity.login_name in rule.users)
            or (identity.domain != "" and identity.domain in rule.domains)
            or identity.node_name in rule.nodes
            or any(tag in identity.node_tags for tag in rule.tags)
            or any(cap in identity.peer_caps for cap in rule.capabilities))


@attrs.frozen
class AccessDecision:
    allowed: bool
    reason: str
    unavailable: bool = False  # refused because identity could not be looked up (try again later)


@attrs.frozen
class AccessPolicy:
    rules: tuple[tuple[AccessRule, Prefix], ...]

    @classmethod
    def from_rules(cls, rules: Sequence[AccessRule]) -> AccessPolicy:
        return cls(tuple((rule, Prefix.parse(rule.prefix)) for rule in rules))

    def decide(self, path: str, provenance: str, identity: Identity | None,
               identity_unavailable: bool = False) -> AccessDecision:
        """First matching rule wins. Without a match, a path covered by an allow rule is
        denied (allow rules make an allow-list for their prefix); anything else passes.

        When the client's identity could not be looked up, the first rule that depends on
        identity refuses the request: a deny rule must not let its subject through."""
        covered_by_allow = False
        for rule, prefix in self.rules:
            if not prefix.covers(path, provenance):
                continue
            if identity_unavailable and rule.selects_identity:
                return AccessDecision(False, f'rule "{rule.describe()}" needs the client\'s identity, which tailscaled '
                                             "could not give", unavailable=True)
            if rule_matches(rule, identity):
                return AccessDecision(rule.action == "allow", f'rule "{rule.describe()}"')
            covered_by_allow |= rule.action == "allow"
        if covered_by_allow:
            return AccessDecision(False, "no allow rule for this path matches the client")
        return AccessDecision(True, "no rule applies")
