"""Play a forger: connect to a front listener and claim to be a tailnet peer.

`forger_argv(python, host, port, source, destination)` is a command line that sends a
PROXY v2 header claiming `source`, then an HTTP request, and prints the response's status
line, or "closed without an answer". It imports nothing from this repository, so it runs
as any account, wherever the checkout lives.
"""

from __future__ import annotations

from tsnsrv import proxyproto

FORGER = """
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
with socket.create_connection((host, port), timeout=10) as sock:
    try:
        sock.sendall(payload)
        answer = sock.recv(4096)
    except OSError:
        answer = b""
print(answer.split(b"\\r\\n", 1)[0].decode() if answer else "closed without an answer")
"""


def forger_argv(python: list[str], host: str, port: str, source: str, destination: str) -> list[str]:
    payload = (proxyproto.encode(source, 51234, destination, 80)
               + b"GET /forged HTTP/1.1\r\nHost: forged\r\nConnection: close\r\n\r\n")
    return [*python, "-c", FORGER, host, port, payload.hex()]
