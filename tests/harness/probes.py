"""A UDP probe a tailnet client sends at a node's address, to see what answers behind it."""

from __future__ import annotations

import sys

UDP_PROBE = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(3)
sock.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
try:
    print(sock.recvfrom(2048)[0].decode())
except OSError:
    print("no answer")
"""


def udp_reply(client, ip: str, port: int) -> str:
    """The answer to a datagram sent from `client` (a ClientDevice), or "no answer"."""
    return client.run([sys.executable, "-c", UDP_PROBE, ip, str(port)], timeout=20).stdout.decode().strip()
