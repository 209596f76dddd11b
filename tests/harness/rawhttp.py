"""Send request targets exactly as written (no client normalising `\\`, `..` or case),
from wherever a command runs: the host, or a client device's network namespace.

`raw_get_argv(python, host, port, targets)` is a command that sends `GET <target>` for
each target on its own connection and prints a JSON list of [status, body line]: the
first line starting with "route=" (what the routing stacks answer), else the first line.
It imports nothing from this repository.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence

RAW_GET = r"""
import json, socket, sys
host, port, targets = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
results = []
for target in targets:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    lines = body.decode(errors="replace").splitlines() or [""]
    # The routing line, also inside a chunked body.
    results.append([status, next((line for line in lines if line.startswith("route=")), lines[0])])
print(json.dumps(results))
"""


def raw_get_argv(python: str, host: str, port: int, targets: Sequence[str]) -> list[str]:
    return [python, "-c", RAW_GET, host, str(port), json.dumps(list(targets))]


def raw_get(run: Callable[[list[str]], subprocess.CompletedProcess], python: str, host: str, port: int,
            targets: Sequence[str]) -> list[tuple[int, str]]:
    """[(status, body line)] per target; `run` executes the command where the client is."""
    result = run(raw_get_argv(python, host, port, targets))
    if result.returncode != 0:
        raise AssertionError(f"raw client failed: {result.stderr!r}")
    return [(status, line) for status, line in json.loads(result.stdout)]
