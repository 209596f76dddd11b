"""An upstream that writes its HTTP/1.1 responses byte by byte as scripted, for what a web
framework will not send: 1xx informational responses, trailers, hundreds of response
headers. It also answers with the request head it received, exactly as it arrived.

    /early-hints        103 Early Hints (a Link header), then 200
    /trailers           200, chunked, with a trailer X-Checksum
    /many-headers?n=N&size=S   200 with N headers X-Header-1..N, the first of S bytes
    /switch             101 Switching Protocols to h2c, whatever the request asked for
    anything else       200; the body is the raw request head

It runs in a thread of the test process, on 127.0.0.1, one connection at a time each in
its own thread (keep-alive supported).
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import parse_qs, urlsplit


class ScriptedUpstream:
    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.heads: list[bytes] = []  # every request head received, in order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedUpstream:
        threading.Thread(target=self._accept, daemon=True, name="scripted-upstream").start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(1 << 20)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                head += b"\r\n\r\n"
                self.heads.append(head)
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffer) < length:
                    buffer += conn.recv(1 << 20)
                buffer = buffer[length:]
                conn.sendall(self._answer(head))

    @staticmethod
    def _answer(head: bytes) -> bytes:
        target = head.split(b" ", 2)[1].decode("latin-1")
        url = urlsplit(target)
        if url.path == "/early-hints":
            return (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints")
        if url.path == "/trailers":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                    b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n")
        if url.path == "/switch":
            return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        if url.path == "/many-headers":
            query = parse_qs(url.query)
            count, size = int(query.get("n", ["200"])[0]), int(query.get("size", ["7"])[0])
            headers = b"X-Header-1: " + b"v" * size + b"\r\n"
            headers += b"".join(b"X-Header-%d: value %d\r\n" % (i, i) for i in range(2, count + 1))
            return b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok"
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head)
