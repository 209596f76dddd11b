"""Bringing the service's node onto the tailnet and keeping its Serve config in place.

This is `tailscale up` over the LocalAPI: watch the IPN bus first (so no state change
is missed), set the prefs this service needs, log in with an auth key or print the
interactive login URL, and wait for Running. Then claim the service's tailnet ports
with a Serve config that forwards them, with a PROXY v2 header, to the front listener.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs

from .auth import auth_key_for_login
from .config import ServiceConfig
from .localapi import NOTIFY_INITIAL_HEALTH, NOTIFY_INITIAL_STATE, LocalAPI, LocalAPIError, TailscaledUnreachable

log = logging.getLogger(__name__)

DEFAULT_CONTROL_URL = "https://controlplane.tailscale.com"
FUNNEL_PORTS_CAP = "https://tailscale.com/cap/funnel-ports"
PROXY_PROTOCOL_V2 = 2
CONTROL_POLL_SECONDS = 5.0
CONTROL_LOST = "control-unreachable"


class NodeError(Exception):
    """The node cannot come up as configured; the message says what to change."""


@attrs.frozen
class NodeInfo:
    dns_name: str  # without the trailing dot
    addresses: tuple[str, ...]
    cert_domains: tuple[str, ...]
    capabilities: frozenset[str]
    node_id: str

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> NodeInfo:
        me = status.get("Self") or {}
        return cls(
            dns_name=(me.get("DNSName") or "").rstrip("."),
            addresses=tuple(status.get("TailscaleIPs") or me.get("TailscaleIPs") or ()),
            cert_domains=tuple(status.get("CertDomains") or ()),
            capabilities=frozenset(me.get("CapMap") or ()) | frozenset(me.get("Capabilities") or ()),
            node_id=str(me.get("ID", "")),
        )

    def funnel_ports(self) -> set[int] | None:
        """Ports Funnel allows this node, or None if the node may not use Funnel at all."""
        if "funnel" not in self.capabilities or "https" not in self.capabilities:
            return None
        for capability in self.capabilities:
            if capability.startswith(FUNNEL_PORTS_CAP + "?"):
                ports = parse_qs(urlsplit(capability).query).get("ports", [""])[0]
                return {int(p) for p in ports.split(",") if p.strip().isdigit()}
        return set()


def desired_prefs(cfg: ServiceConfig, with_auth_key: bool, shields_up: bool = False) -> dict[str, Any]:
    """Everything a service node wants; `start` replaces the stored prefs with exactly these.

    Tags are requested only by an interactive login: a node that logs in with an auth key
    gets the key's tags (headscale refuses requested tags then, and a key minted from an
    OAuth secret carries the configured tags already), like the Go tsnsrv.

    `shields_up` keeps every inbound connection out until the Serve config is in place
    (see Node.shield_until_claimed).
    """
    return {
        "ControlURL": cfg.login_server_url or DEFAULT_CONTROL_URL,
        "Hostname": cfg.name,
        "AdvertiseTags": None if with_auth_key else (list(cfg.tags) or None),
        "WantRunning": True,
        "LoggedOut": False,
        "CorpDNS": False,   # the proxy resolves nothing through the tailnet
        "RouteAll": False,  # and routes nothing through it
        "ShieldsUp": shields_up,  # shields-up refuses Serve connections too, so only until it is set
        "RunSSH": False,
        "RunWebClient": False,
    }


def prefs_drift(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """A MaskedPrefs edit for whatever differs (hostname, tags, wanting to run, ...)."""
    edit: dict[str, Any] = {}
    for key, value in wanted.items():
        if key in ("ControlURL", "LoggedOut", "AdvertiseTags"):
            continue  # changing these takes a new login, not an edit
        if (current.get(key) or None) != (value or None):
            edit[key] = value
            edit[f"{key}Set"] = True
    return edit


def _banner(url: str, name: str) -> None:
    # Printed, not only logged: this is the one thing the operator must act on (Go tsnsrv #93).
    text = (f"\n{'=' * 72}\n  tsnsrv service '{name}' needs to be authorized on your tailnet.\n"
            f"  Open this URL to log in:\n\n      {url}\n\n"
            f"  (or give it an auth key: --auth-key-file, $TS_AUTHKEY)\n{'=' * 72}\n")
    print(text, file=sys.stderr, flush=True)
    log.warning("waiting for interactive login at %s", url)


class Node:
    def __init__(self, cfg: ServiceConfig, api: LocalAPI, on_state: Callable[[str], None],
                 on_warnings: Callable[[dict[str, str]], None], on_shielded: Callable[[], None] | None = None):
        """`on_shielded`, if given, makes the node come up shields-up and is called once it
        is: the loopback guard then lets tailscaled reach a control server on host loopback
        (no peer can, as no inbound connection is accepted). Shields go down once the Serve
        config claims the control server's port."""
        self.cfg = cfg
        self.api = api
        self._on_shielded = on_shielded
        self.shields_up = False
        self._on_state = on_state
        self._on_warnings = on_warnings
        self.backend_state = "Unknown"
        self.info: NodeInfo | None = None
        self.health_warnings: dict[str, str] = {}  # what is unhealthy, by code: tailscaled's, and ours
        self._tailscaled_warnings: dict[str, str] = {}
        self._control_lost = False
        self._printed_url = ""

    def _state_changed(self, state: str) -> None:
        if state != self.backend_state:
            log.info("node state %s -> %s", self.backend_state, state)
            self.backend_state = state
            self._on_state(state)

    async def bring_up(self) -> NodeInfo:
        """Log in if needed and wait until the node is Running; returns what it is on the tailnet."""
        if self._on_shielded is not None:
            await self.api.edit_prefs({"ShieldsUp": True, "ShieldsUpSet": True})
            self.shields_up = True
            self._on_shielded()
        bus = self.api.watch_ipn_bus(NOTIFY_INITIAL_STATE)
        try:
            first = await anext(bus)
            self._state_changed(_state_name(first.get("State")))
            login_tried = await self._request_running()
            notes = _running_or_error(bus) if login_tried or self.backend_state != "Running" else _nothing()
            async for note in notes:
                if (url := note.get("BrowseToURL")) and url != self._printed_url:
                    self._printed_url = url
                    _banner(url, self.cfg.name)
                if (state := note.get("State")) is not None:
                    self._state_changed(_state_name(state))
                    if self.backend_state == "NeedsLogin" and not login_tried:
                        login_tried = True
                        await self._login(have_node_key=True)
                    elif self.backend_state == "NeedsMachineAuth":
                        log.warning("node %s waits for approval in the tailnet's admin console", self.cfg.name)
                    elif self.backend_state == "Running":
                        break
        finally:
            await bus.aclose()
        status = await self.api.status()
        self.info = NodeInfo.from_status(status)
        log.info("node %s is on the tailnet as %s (%s)", self.cfg.name, self.info.dns_name or "?",
                 ", ".join(self.info.addresses))
        return self.info

    async def _request_running(self) -> bool:
        """Log in, or edit prefs so the node runs as configured; True if a login was started."""
        status = await self.api.status()
        prefs = await self.api.prefs()
        wanted = desired_prefs(self.cfg, with_auth_key=False, shields_up=self.shields_up)
        control_changed = (prefs.get("ControlURL") or DEFAULT_CONTROL_URL) != wanted["ControlURL"]
        have_node_key = bool(status.get("HaveNodeKey")) and not control_changed
        # A node that has a key logs itself back in; restarting it with `start` now would
        # only cut that short (and a quick re-dial makes tailscaled insist on TLS to control).
        if not have_node_key or self.backend_state == "NeedsLogin":
            await self._login(have_node_key)
            return True
        edit = prefs_drift(prefs, wanted)
        if edit:
            log.info("updating node prefs: %s", ", ".join(sorted(k for k in edit if not k.endswith("Set"))))
            await self.api.edit_prefs(edit)
        return False

    async def _login(self, have_node_key: bool) -> None:
        key = await auth_key_for_login(self.cfg)
        log.info("logging in to %s %s", self.cfg.login_server_url or DEFAULT_CONTROL_URL,
                 "with an auth key" if key else "interactively")
        await self.api.start(desired_prefs(self.cfg, with_auth_key=key is not None, shields_up=self.shields_up), key)
        # As `tailscale up`: a node without a node key logs in only when asked to,
        # with the auth key given to start or else in the browser.
        if key is None or not have_node_key:
            await self.api.login_interactive()

    async def apply_serve_config(self, forwards: dict[int, str], funnel_port: int | None) -> None:
        """Claim `forwards` (tailnet port -> front address) and allow Funnel on `funnel_port`."""
        assert self.info is not None
        config: dict[str, Any] = {"TCP": {str(port): {"TCPForward": target, "ProxyProtocol": PROXY_PROTOCOL_V2}
                                          for port, target in sorted(forwards.items())}}
        if funnel_port is not None:
            allowed = self.info.funnel_ports()
            if allowed is None:
                raise NodeError("funnel: this node may not use Funnel. Grant it the 'funnel' node attribute in the "
                                "tailnet policy (nodeAttrs) and enable HTTPS certificates for the tailnet.")
            if allowed and funnel_port not in allowed:
                raise NodeError(f"listenPort: Funnel allows ports {', '.join(map(str, sorted(allowed)))} on this "
                                f"tailnet, not {funnel_port}")
            config["AllowFunnel"] = {f"{self.info.dns_name}:{funnel_port}": True}
        current, _etag = await self.api.serve_config()
        if self.shields_up:
            # Funnel cannot be allowed while shields are up: claim the ports first.
            current = await self._set_serve_config(current, {"TCP": config["TCP"]})
            await self.api.edit_prefs({"ShieldsUp": False, "ShieldsUpSet": True})
            self.shields_up = False
            log.info("shields down: the Serve config claims every port tailscaled itself reaches on host loopback")
        await self._set_serve_config(current, config)

    async def _set_serve_config(self, current: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        if current != config:
            await self.api.set_serve_config(config)
        log.info("serve config set: %s", json.dumps(config, sort_keys=True))
        return config

    async def watch(self) -> None:
        """Follow the node's state and health until tailscaled goes away (then raises)."""
        control = asyncio.create_task(self._watch_control())
        try:
            async for note in self.api.watch_ipn_bus(NOTIFY_INITIAL_STATE | NOTIFY_INITIAL_HEALTH):
                if (state := note.get("State")) is not None:
                    self._state_changed(_state_name(state))
                if (url := note.get("BrowseToURL")) and url != self._printed_url:
                    self._printed_url = url
                    _banner(url, self.cfg.name)
                if (health := note.get("Health")) is not None:
                    self._health_changed(health.get("Warnings") or {})
            raise ConnectionError("tailscaled closed the IPN bus")
        finally:
            control.cancel()

    async def _watch_control(self) -> None:
        """Say when the node loses and regains its control server.

        tailscaled raises no health warning for that (it keeps forwarding with the last
        network map); only `Self.Online` in its status tells."""
        lost_at: float | None = None
        while True:
            await asyncio.sleep(CONTROL_POLL_SECONDS)
            try:
                status = await self.api.status(peers=False)
            except (TailscaledUnreachable, LocalAPIError):
                continue  # the IPN bus watch notices a dead tailscaled
            online = bool((status.get("Self") or {}).get("Online"))
            if not online and lost_at is None:
                lost_at = time.monotonic()
                log.warning("lost contact with the control server (%s): still serving with the last network map, "
                            "but new peers and policy changes will not arrive until it is back",
                            self.cfg.login_server_url or DEFAULT_CONTROL_URL)
            elif online and lost_at is not None:
                log.info("back in contact with the control server after %.0fs", time.monotonic() - lost_at)
                lost_at = None
            self._control_lost = lost_at is not None
            self._publish_warnings()

    def _health_changed(self, warnings: dict[str, Any]) -> None:
        """Log what became unhealthy (control server unreachable, no DERP, ...) and what recovered."""
        current = {code: (w.get("Text") or w.get("Title") or code).strip() for code, w in warnings.items()
                   if w.get("Severity") != "low"}
        for code, text in current.items():
            if code not in self._tailscaled_warnings:
                log.warning("tailnet health: %s (%s)", text, code)
        for code in self._tailscaled_warnings.keys() - current.keys():
            log.info("tailnet health: %s recovered", code)
        self._tailscaled_warnings = current
        self._publish_warnings()

    def _publish_warnings(self) -> None:
        current = dict(self._tailscaled_warnings)
        if self._control_lost:
            current[CONTROL_LOST] = "control server unreachable"
        if current != self.health_warnings:
            self.health_warnings = current
            self._on_warnings(current)

    async def logout(self) -> None:
        await self.api.logout()


STATE_NAMES = ("NoState", "InUseOtherUser", "NeedsLogin", "NeedsMachineAuth", "Stopped", "Starting", "Running")


def _state_name(state: Any) -> str:
    if isinstance(state, int) and 0 <= state < len(STATE_NAMES):
        return STATE_NAMES[state]
    return str(state)


async def _nothing() -> AsyncIterator[dict[str, Any]]:
    return
    yield


async def _running_or_error(bus: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async for note in bus:
        if note.get("ErrMessage"):
            raise NodeError(f"tailscaled: {note['ErrMessage']}")
        yield note
    raise ConnectionError("tailscaled closed the IPN bus during login")
