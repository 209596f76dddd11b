"""Playing systemd for a Type=notify service: the $NOTIFY_SOCKET it sends readiness to."""

from __future__ import annotations

import socket
import threading
from pathlib import Path


class NotifySocket:
    """The datagram socket systemd hands a Type=notify service as $NOTIFY_SOCKET.

    Every message is recorded; `on_ready` runs in the receiving thread the moment
    READY=1 arrives, so a test can look at the world exactly then."""

    def __init__(self, path: Path, on_ready=None):
        self.path = path
        self.messages: list[list[str]] = []
        self.on_ready = on_ready
        self.seen_at_ready: object = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            assignments = data.decode().split("\n")
            if "READY=1" in assignments and self.on_ready is not None:
                self.seen_at_ready = self.on_ready()
            self.messages.append(assignments)

    def flat(self) -> list[str]:
        return [assignment for message in self.messages for assignment in message]

    def close(self) -> None:
        self.sock.close()
