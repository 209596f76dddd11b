"""Who a request comes from, and the headers that tell the upstream.

Identity comes from the LocalAPI `whois` of the PROXY header's source address. A
peer's address maps to one node for as long as it is on the tailnet, so answers are
cached per address for a short time; concurrent requests from a new address share
one lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from .access import Identity
from .metrics import Metrics

log = logging.getLogger(__name__)

TAILNET_RANGES = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))

# Inbound headers that could impersonate what tsnsrv asserts; removed from every request
# (the signed X-Tailscale-Identity-Assertion of assertion.py among them).
SPOOFABLE_PREFIXES = ("x-tailscale-", "tailscale-", "x-forwarded-")
SPOOFABLE_NAMES = frozenset({"forwarded", "x-real-ip", "x-scheme"})


def is_tailnet_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(ip in network for network in TAILNET_RANGES)


def is_spoofable(header_name: str) -> bool:
    # CGI, PHP and ASGI servers read "X_Tailscale_User" as "X-Tailscale-User".
    lower = header_name.lower().replace("_", "-")
    return lower in SPOOFABLE_NAMES or lower.startswith(SPOOFABLE_PREFIXES)


WhoisFunction = Callable[[str, float], Awaitable[dict | None]]


class IdentityUnavailable(Exception):
    """tailscaled could not say who is behind an address (error or timeout)."""


class WhoisCache:
    def __init__(self, whois: WhoisFunction, timeout: float, metrics: Metrics, ttl: float = 10.0,
                 max_entries: int = 4096):
        self._whois = whois
        self._timeout = timeout
        self._metrics = metrics
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Identity | None]] = {}
        self._last_warning = 0.0
        self._cached_hits = metrics.whois.labels("cached")

    def cached(self, address: str) -> tuple[bool, Identity | None]:
        """(True, identity) if a fresh answer for `address` is at hand, without waiting."""
        entry = self._entries.get(address)
        if entry is not None and entry[0] > time.monotonic():
            self._entries.move_to_end(address)
            self._cached_hits.inc()
            return True, entry[1]
        return False, None

    async def lookup(self, address: str) -> Identity | None:
        """The identity behind a tailnet address; None if tailscaled knows no node there.

        Raises IdentityUnavailable when tailscaled could not be asked (not cached)."""
        hit, identity = self.cached(address)
        if hit:
            return identity
        pending = self._pending.get(address)
        if pending is None:
            # A task of its own, so that the request that started it may be cancelled
            # (its client hung up) without taking the answer from the others waiting.
            pending = asyncio.ensure_future(self._ask(address))
            self._pending[address] = pending
            pending.add_done_callback(lambda _: self._pending.pop(address, None))
        return await asyncio.shield(pending)

    async def _ask(self, address: str) -> Identity | None:
        try:
            answer = await self._whois(address, self._timeout or None)
        except Exception as exc:  # noqa: BLE001 - any failure means "identity unknown", and is reported
            self._metrics.whois.labels("error").inc()
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("whois %s failed; the request proceeds without identity headers (or is refused where "
                            "an access rule depends on identity): %s", address, exc or type(exc).__name__)
            raise IdentityUnavailable(str(exc) or type(exc).__name__) from exc
        identity = Identity.from_whois(answer) if answer else None
        self._metrics.whois.labels("found" if identity else "unknown").inc()
        self._entries[address] = (time.monotonic() + self._ttl, identity)
        self._entries.move_to_end(address)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return identity


def _header_safe(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


def _q_encode(value: str) -> str:
    """RFC 2047 Q-encoding for non-ASCII values, as `tailscale serve` sends them."""
    if value.isascii():
        return value
    encoded = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        if char.isascii() and (char.isalnum() or char in "!*+-/"):
            encoded.append(char)
        elif char == " ":
            encoded.append("_")
        else:
            encoded.append(f"={byte:02X}")
    return "=?utf-8?q?" + "".join(encoded) + "?="


def tsnsrv_headers(identity: Identity) -> list[tuple[str, str]]:
    """The Go tsnsrv's X-Tailscale-* set, spelled as it spells them: IDs as "userid:N" and
    "nodeid:N", and a tagged node's user headers from its profile ("tagged-devices")."""
    login = identity.login_name
    headers = [("X-Tailscale-User", f"userid:{identity.user_id}"), ("X-Tailscale-User-LoginName", login)]
    if "@" in login:
        local, _, domain = login.partition("@")
        headers.append(("X-Tailscale-User-LoginName-Localpart", local))
        headers.append(("X-Tailscale-User-LoginName-Domain", domain))
    headers.append(("X-Tailscale-User-DisplayName", identity.display_name))
    if identity.profile_pic_url:
        headers.append(("X-Tailscale-User-ProfilePicURL", identity.profile_pic_url))
    if identity.peer_caps:
        headers.append(("X-Tailscale-Caps", ", ".join(sorted(identity.peer_caps))))
    headers.append(("X-Tailscale-Node", f"nodeid:{identity.node_id}"))
    headers.append(("X-Tailscale-Node-Name", identity.node_name))
    if identity.node_caps:
        headers.append(("X-Tailscale-Node-Caps", ", ".join(identity.node_caps)))
    if identity.node_tags:
        headers.append(("X-Tailscale-Node-Tags", ", ".join(identity.node_tags)))
    return [(name, _header_safe(value)) for name, value in headers]


def serve_headers(identity: Identity | None, funnel: bool, app_capabilities: list[str]) -> list[tuple[str, str]]:
    """The `tailscale serve` schema: Tailscale-User-* for user-owned nodes, and granted app capabilities."""
    if funnel:
        return [("Tailscale-Funnel-Request", "?1")]
    if identity is None:
        return []
    headers = []
    if not identity.tagged:
        headers += [("Tailscale-User-Login", _q_encode(identity.login_name)),
                    ("Tailscale-User-Name", _q_encode(identity.display_name)),
                    ("Tailscale-User-Profile-Pic", identity.profile_pic_url),
                    ("Tailscale-Headers-Info", "https://tailscale.com/s/serve-headers")]
    if app_capabilities:
        granted = {cap: identity.peer_caps[cap] for cap in app_capabilities if cap in identity.peer_caps}
        headers.append(("Tailscale-App-Capabilities", _q_encode(json.dumps(granted, separators=(",", ":")))))
    return [(name, _header_safe(value)) for name, value in headers]
