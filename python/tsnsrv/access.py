"""Which requests may pass: path prefixes and identity rules. Pure functions, no I/O.

Paths are compared after percent-decoding, segment by segment: "/api" matches "/api"
and "/api/x" but not "/apiary", and a deny prefix cannot be dodged by writing
"/%61dmin". Paths with dot segments or doubled slashes are not matched at all; the
proxy redirects them to their clean form first (as Go's ServeMux does for the Go
tsnsrv), so "/public/../admin" never reaches the upstream.

An upstream does not always route the path it is sent the way Go would: Node's URL
parser and browsers read "\" as "/", servlet containers drop ";params" from every
segment (so "/x/..;/admin" is "/admin" to Tomcat), Express matches routes regardless of
case, some stacks decode twice, and routers with format suffixes (Django REST framework,
Rails) send "/api/admin.json" to the admin view. A request passes only if every one of
those readings (`routing_views`) passes: a deny prefix or rule that covers any reading
refuses it, and an allow-list must hold for all of them. Requests that pass are forwarded
unchanged.
"""

from __future__ import annotations

import functools
import posixpath
import re
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
        """Whether a refusal by this prefix reaches `path`: `matches` regardless of case
        (routers such as Express ignore it), and for a prefix written with a trailing
        slash also the bare directory: denying "/admin/" must deny "/admin" too."""
        if not self.applies(provenance):
            return False
        path, own = path.casefold(), self.path.casefold()
        return path_has_prefix(path, own) or (len(own) > 1 and own.endswith("/") and path == own[:-1])

    def __str__(self) -> str:
        return f"{self.applies_to}:{self.path}" if self.applies_to else self.path


def path_has_prefix(path: str, prefix: str) -> bool:
    """Segment-aware: "/api" covers "/api" and "/api/...", "/api/" covers "/api/...", "/" covers all."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


def clean_path(path: str) -> str:
    """Go's path.Clean, keeping a trailing slash: what a well-formed request path looks like."""
    if path.startswith("/") and "//" not in path and "/." not in path:
        return path  # no empty, "." or ".." segment: clean already (most requests)
    if not path.startswith("/"):
        path = "/" + path
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


@functools.lru_cache(maxsize=4096)
def routing_views(raw_path: str, format_suffixes: bool = True) -> frozenset[str]:
    """Every clean path that a common upstream stack may route the raw request path to.

    Without `format_suffixes`, the readings of format-suffix routers are left out: what a
    refusal must cover, but not what an allow-list needs, since a suffix never leaves the
    directory it is in (and "/v1.0/" must stay inside an allowed "/v1.0")."""
    decoded = unquote(raw_path)
    # Stacks that decode twice (or pass "%2e%2e" on to code that decodes again).
    readings = {decoded, unquote(decoded)} if "%" in decoded else {decoded}
    if any("\\" in reading for reading in readings):  # Node, browsers; also a decoded %5C
        readings |= {reading.replace("\\", "/") for reading in readings}
    if any(";" in reading for reading in readings):  # servlet containers' path parameters
        readings |= {_without_path_parameters(reading) for reading in readings}
    if format_suffixes:
        readings |= {_without_format_suffix(reading) for reading in readings}
    return frozenset(clean_path(reading) for reading in readings)


def _without_path_parameters(path: str) -> str:
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def _without_format_suffix(path: str) -> str:
    """The path a format-suffix router dispatches on: "/api/admin.json" (also with a
    trailing slash) is "/api/admin"."""
    trimmed = path[:-1] if path.endswith("/") else path
    head, slash, last = trimmed.rpartition("/")
    base, dot, suffix = last.rpartition(".")
    return head + slash + base if base and suffix else path


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def has_control_characters(path: str) -> bool:
    """NUL, CR, LF and friends: no web path has them, and some stacks cut the path there."""
    return _CONTROL.search(path) is not None


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
        if not self.deny and not self.allow:
            return PathDecision(True, raw_path)
        for prefix in self.deny:
            if any(prefix.covers(view, provenance) for view in routing_views(raw_path)):
                return PathDecision(False, reason=f"path is under deny prefix {prefix}")
        if not self.allow:
            return PathDecision(True, raw_path)
        views = routing_views(raw_path, format_suffixes=False)
        for prefix in self.allow:
            # Every reading must be under the prefix, and the raw path must carry it
            # literally too, so that stripping it is exact.
            if all(prefix.matches(view, provenance) for view in views) and path_has_prefix(raw_path, prefix.path):
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
    def user(self) -> str:
        """The person's login; "" for a tagged node, which belongs to the "tagged-devices"
        pseudo-user, which is nobody (the profile fields still say so, as whois does)."""
        return "" if self.tagged else self.login_name

    @property
    def domain(self) -> str:
        return self.user.rpartition("@")[2] if "@" in self.user else ""

    def describe(self) -> str:
        if self.tagged:
            return f"node {self.node_name} ({','.join(self.node_tags)})"
        return f"{self.user or 'unknown user'} on {self.node_name or 'unknown node'}"

    @classmethod
    def from_whois(cls, whois: dict) -> Identity:
        user = whois.get("UserProfile") or {}
        node = whois.get("Node") or {}
        return cls(
            user_id=str(user.get("ID", "")),
            login_name=user.get("LoginName", ""),
            display_name=user.get("DisplayName", ""),
            profile_pic_url=user.get("ProfilePicURL", ""),
            node_id=str(node.get("ID", "")),
            node_name=node.get("ComputedName") or node.get("Name", "").split(".")[0],
            node_tags=tuple(node.get("Tags") or ()),
            node_caps=tuple(sorted(node.get("CapMap") or ())),
            peer_caps=dict(whois.get("CapMap") or {}),
        )


def rule_matches(rule: AccessRule, identity: Identity | None) -> bool:
    if not rule.selects_identity:
        return True
    if identity is None:
        return False
    return ((identity.user != "" and identity.user in rule.users)
            or (identity.domain != "" and identity.domain in rule.domains)
            or identity.node_name in rule.nodes
            or any(tag in identity.node_tags for tag in rule.tags)
            or any(cap in identity.peer_caps for cap in rule.capabilities))


@attrs.frozen
class AccessDecision:
    allowed: bool
    reason: str
    unavailable: bool = False  # refused because identity could not be looked up (try again later)


NO_RULE_APPLIES = AccessDecision(True, "no rule applies")


@attrs.frozen
class AccessPolicy:
    rules: tuple[tuple[AccessRule, Prefix], ...]

    @classmethod
    def from_rules(cls, rules: Sequence[AccessRule]) -> AccessPolicy:
        return cls(tuple((rule, Prefix.parse(rule.prefix)) for rule in rules))

    def decide(self, raw_path: str, provenance: str, identity: Identity | None,
               identity_unavailable: bool = False) -> AccessDecision:
        """Refused if any reading of the path (`routing_views`) is refused."""
        if not self.rules:
            return NO_RULE_APPLIES
        decision = NO_RULE_APPLIES
        for view in sorted(routing_views(raw_path)):
            decision = self._decide_view(view, provenance, identity, identity_unavailable)
            if not decision.allowed:
                return decision
        return decision

    def _decide_view(self, path: str, provenance: str, identity: Identity | None,
                     identity_unavailable: bool) -> AccessDecision:
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
