"""`tsnsrv jwks [NAME]`: the public keys a running service signs identity assertions with.

Asks the service's control socket for /jwks.json and prints the JWK Set, e.g. for an
upstream that takes its keys inline. Exit status 0 when printed, 2 when no running
service of that name signs assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .paths import control_sockets_on_this_machine
from .status import UNANSWERED, get


async def _service_name(path: Path) -> str | None:
    try:
        return json.loads((await get(path, "/health"))[1]).get("name")
    except (*UNANSWERED, ValueError):
        return None  # not running: not a candidate


async def _main(args: argparse.Namespace) -> int:
    if args.socket is not None:
        candidates = [args.socket]
    else:
        sockets = control_sockets_on_this_machine()
        names = await asyncio.gather(*(_service_name(path) for path in sockets))
        candidates = [path for path, name in zip(sockets, names) if name is not None and args.name in (None, name)]
    if len(candidates) != 1:
        what = f"no running service named {args.name}" if args.name else \
            f"{len(candidates)} running services; name one" if candidates else "no running service"
        print(f"tsnsrv jwks: {what}", file=sys.stderr)
        return 2
    try:
        status, body = await get(candidates[0], "/jwks.json")
    except UNANSWERED as exc:
        print(f"tsnsrv jwks: {candidates[0]} does not answer: {exc}", file=sys.stderr)
        return 2
    if status != 200:
        print(f"tsnsrv jwks: {args.name or candidates[0]} signs no identity assertions (--assertions is off)",
              file=sys.stderr)
        return 2
    sys.stdout.write(body.decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsnsrv jwks",
                                     description="Print the public keys (JWKS) of a service's identity assertions.")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the service (default: the only one running)")
    parser.add_argument("--socket", type=Path, help="the service's control socket; default: find it by NAME")
    return parser


def main(argv: list[str]) -> int:
    return asyncio.run(_main(build_parser().parse_args(argv)))
