"""Play a forger: connect to a front listener and claim to be a tailnet peer.

    python -m harness.proxyclient FRONT_HOST FRONT_PORT CLAIMED_SOURCE_IP DESTINATION_IP

Sends a PROXY v2 header claiming CLAIMED_SOURCE_IP, then an HTTP request, and prints
the response's status line, or "closed without an answer".
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from tsnsrv import proxyproto

HARNESS_PARENT = Path(__file__).resolve().parent.parent


def main(front_host: str, front_port: str, source: str, destination: str) -> None:
    with socket.create_connection((front_host, int(front_port)), timeout=10) as sock:
        try:
            sock.sendall(proxyproto.encode(source, 51234, destination, 80)
                         + b"GET /forged HTTP/1.1\r\nHost: forged\r\nConnection: close\r\n\r\n")
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    print(answer.split(b"\r\n", 1)[0].decode() if answer else "closed without an answer")


if __name__ == "__main__":
    main(*sys.argv[1:5])
