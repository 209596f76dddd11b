"""`tsnsrv status [NAME...]`: the services on this machine, at a glance.

Asks each service's control socket for /health (probing the upstream too) and prints
one row per service. Exit status: 0 if every listed service is ready, 1 otherwise,
2 if a named service is not found.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .paths import control_sockets_on_this_machine

COLUMNS = ("SERVICE", "STATE", "TAILNET ADDRESS", "URL", "CERT EXPIRES", "UPSTREAM", "UPSTREAM OK")


# What asking a control socket can fail with (besides a JSON answer that is not JSON).
UNANSWERED = (OSError, aiohttp.ClientError, TimeoutError)


async def get(socket_path: Path, target: str) -> tuple[int, bytes]:
    """GET `target` from a service's control socket: (status, body)."""
    async with asyncio.timeout(8), \
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as session, \
            session.get(f"http://tsnsrv{target}") as response:
        return response.status, await response.read()


async def fetch_health(socket_path: Path) -> dict[str, Any]:
    try:
        return json.loads((await get(socket_path, "/health?probe=1"))[1])
    except (*UNANSWERED, ValueError) as exc:
        return {"name": socket_path.parent.name, "ready": False, "status": f"not answering: {exc}",
                "unreachable": True}


def _state(health: dict[str, Any]) -> str:
    if health.get("unreachable"):
        return "not answering"
    if health.get("ready"):
        return "serving"
    node = health.get("node", {}).get("state", "?")
    tailscaled = health.get("tailscaled", {}).get("state", "?")
    if tailscaled != "running":
        return f"{node} (tailscaled {tailscaled})"
    if health.get("tls", {}).get("error") and not health.get("tls", {}).get("notAfter"):
        return f"{node}, no certificate"  # /health's tls.error says why
    return str(node)


def _expiry(health: dict[str, Any]) -> str:
    tls = health.get("tls", {})
    if tls.get("mode") == "plaintext":
        return "plaintext"
    if not tls.get("notAfter"):
        return "-"
    return f"{dt.datetime.fromisoformat(tls['notAfter']):%Y-%m-%d} ({_time_left(tls.get('secondsLeft') or 0)})"


def _time_left(seconds: float) -> str:
    """Days, or finer for short-lived certificates (hours, minutes, seconds)."""
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _upstream_ok(health: dict[str, Any]) -> str:
    upstream = health.get("upstream", {})
    if "answers" not in upstream:
        return "-"
    if upstream["answers"]:
        return f"yes ({upstream.get('status')}, {upstream.get('latencyMs')} ms)"
    return f"NO: {upstream.get('error', '')}"[:60]


def row(health: dict[str, Any]) -> tuple[str, ...]:
    node = health.get("node", {})
    address = ", ".join(a for a in node.get("addresses", []) if ":" not in a) or "-"
    return (health.get("name", "?"), _state(health), address, node.get("url") or "-", _expiry(health),
            health.get("upstream", {}).get("url", "-"), _upstream_ok(health))


def render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(r, widths)).rstrip()
                     for r in [COLUMNS, *rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsnsrv status", description="Show the tsnsrv services on this machine.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these services")
    parser.add_argument("--socket", action="append", type=Path, default=[],
                        help="a service's control socket (repeatable); default: find them all")
    parser.add_argument("--json", action="store_true", help="print the raw health documents")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sockets = args.socket or control_sockets_on_this_machine()
    healths = asyncio.run(_gather(sockets))
    if args.names:
        missing = set(args.names) - {h.get("name") for h in healths}
        healths = [h for h in healths if h.get("name") in args.names]
        if missing:
            print(f"tsnsrv status: no running service named {', '.join(sorted(missing))}", file=sys.stderr)
            if not healths:
                return 2
    if args.json:
        print(json.dumps(healths, indent=2))
    elif not healths:
        print("no tsnsrv services found (looked for control sockets under /run/tsnsrv, /run/tsnsrv-*, "
              "/var/lib/podman-* and /var/lib/docker-* (sidecars), and your runtime directory)")
    else:
        print(render([row(h) for h in sorted(healths, key=lambda h: h.get("name", ""))]))
    return 0 if healths and all(h.get("ready") for h in healths) else 1


async def _gather(sockets: list[Path]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(fetch_health(path) for path in sockets)))
