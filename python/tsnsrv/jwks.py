"""`tsnsrv jwks [NAME]`: the public keys a running service signs identity assertions with.

Asks the service's control socket for /jwks.json and prints the JWK Set, e.g. for an
upstream that takes its keys inline. Exit status 0 when printed, 2 when no running
service of that name signs assertions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from pathlib import Path

from .paths import control_sockets_on_this_machine


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path):
        super().__init__("tsnsrv", timeout=5)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.socket_path))


def _get(path: Path, target: str) -> tuple[int, bytes]:
    connection = _UnixConnection(path)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _service_name(path: Path) -> str | None:
    try:
        return json.loads(_get(path, "/health")[1]).get("name")
    except (OSError, ValueError, http.client.HTTPException):
        return None  # not running: not a candidate


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tsnsrv jwks",
                                     description="Print the public keys (JWKS) of a service's identity assertions.")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the service (default: the only one running)")
    parser.add_argument("--socket", type=Path, help="the service's control socket; default: find it by NAME")
    args = parser.parse_args(argv)
    if args.socket is not None:
        candidates = [args.socket]
    else:
        running = {path: _service_name(path) for path in control_sockets_on_this_machine()}
        candidates = [path for path, name in running.items() if name is not None and args.name in (None, name)]
    if len(candidates) != 1:
        what = f"no running service named {args.name}" if args.name else \
            f"{len(candidates)} running services; name one" if candidates else "no running service"
        print(f"tsnsrv jwks: {what}", file=sys.stderr)
        return 2
    try:
        status, body = _get(candidates[0], "/jwks.json")
    except (OSError, http.client.HTTPException) as exc:
        print(f"tsnsrv jwks: {candidates[0]} does not answer: {exc}", file=sys.stderr)
        return 2
    if status != 200:
        print(f"tsnsrv jwks: {args.name or candidates[0]} signs no identity assertions (--assertions is off)",
              file=sys.stderr)
        return 2
    sys.stdout.write(body.decode())
    return 0
