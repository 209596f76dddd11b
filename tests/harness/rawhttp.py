"""Send HTTP requests exactly as written (no client normalising `\\`, `..`, case or the
request line), from wherever a command runs: the host, or a client device's network
namespace.

`raw_exchanges(run, python, host, port, requests)` sends each request's bytes on its own
connection with a command that `run` executes where the client is (it imports nothing
from this repository), and returns what came back for each.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence

import attrs

RAW_CLIENT = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
requests = json.loads(sys.stdin.read())  # not argv: a request may be larger than one argument can be
answers = []
for request in requests:
    data = b""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(bytes.fromhex(request))
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    answers.append(data.hex())
print(json.dumps(answers))
"""

Runner = Callable[..., subprocess.CompletedProcess]  # (argv, input=bytes)


@attrs.frozen
class RawAnswer:
    status: int  # 0 when no status line came back
    head: str  # the status line and headers, as sent
    body: str

    def body_line(self, prefix: str) -> str:
        """The first body line starting with `prefix` (also inside a chunked body), else the first."""
        lines = self.body.splitlines() or [""]
        return next((line for line in lines if line.startswith(prefix)), lines[0])


def raw_exchanges(run: Runner, python: str, host: str, port: int, requests: Sequence[bytes]) -> list[RawAnswer]:
    result = run([python, "-c", RAW_CLIENT, host, str(port)], input=json.dumps([r.hex() for r in requests]).encode())
    if result.returncode != 0:
        raise AssertionError(f"raw client failed: {result.stderr!r}")
    answers = []
    for answer in json.loads(result.stdout):
        head, _, body = bytes.fromhex(answer).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        answers.append(RawAnswer(status, head.decode("latin-1"), body.decode(errors="replace")))
    return answers


def get_request(target: str, host: str, method: str = "GET", headers: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode("latin-1")


def raw_get(run: Runner, python: str, host: str, port: int, targets: Sequence[str]) -> list[tuple[int, str]]:
    """[(status, the "route=" body line)] per GET target, as the routing stacks answer."""
    answers = raw_exchanges(run, python, host, port, [get_request(target, host) for target in targets])
    return [(answer.status, answer.body_line("route=")) for answer in answers]
