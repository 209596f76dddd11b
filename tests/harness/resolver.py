"""A DNS resolver on host loopback, as dnsmasq, unbound or Pi-hole would be, that
records every question it is asked (name and transport) and answers A records from
a table, NXDOMAIN otherwise.

A process sees it when it runs in a private mount namespace whose /etc/resolv.conf
says `nameserver 127.0.0.1` (`private_resolv_conf_prefix`): the host's file is never
touched.
"""

from __future__ import annotations

import threading
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer


class RecordingResolver(BaseResolver):
    def __init__(self, answers: dict[str, str]):
        self.answers = {name.rstrip(".") + ".": ip for name, ip in answers.items()}
        self.questions: list[tuple[str, str]] = []  # (transport, name)
        self._lock = threading.Lock()

    def resolve(self, request, handler):  # dnslib's interface
        name = str(request.q.qname)
        with self._lock:
            self.questions.append((handler.protocol, name))
        reply = request.reply()
        if name in self.answers:
            if request.q.qtype == QTYPE.A:
                reply.add_answer(RR(name, QTYPE.A, rdata=A(self.answers[name]), ttl=5))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply

    def asked(self, name: str) -> list[str]:
        """The transports `name` was asked over."""
        with self._lock:
            return [transport for transport, asked in self.questions if asked.rstrip(".") == name.rstrip(".")]


class LoopbackResolver:
    """UDP and TCP on 127.0.0.1:53 (needs root), or on port 53 of another local `address`."""

    def __init__(self, answers: dict[str, str], address: str = "127.0.0.1"):
        self.resolver = RecordingResolver(answers)
        self._servers = [DNSServer(self.resolver, address=address, port=53, tcp=tcp) for tcp in (False, True)]

    def start(self) -> LoopbackResolver:
        for server in self._servers:
            server.start_thread()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()


def private_resolv_conf_prefix(resolv_conf: Path) -> list[str]:
    """A command prefix that runs the rest with `resolv_conf` as its /etc/resolv.conf."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf)]
