"""Just enough of the websocket framing (RFC 6455) to relay sessions as raw bytes and
still close them politely: where frames begin and end, and a close frame to send.

Frames pass through unread (extensions such as permessage-deflate too); the relay only
follows their headers, so that at shutdown it can put a `1001 Going Away` close between
two frames instead of inside one.
"""

from __future__ import annotations

import os
import struct

GOING_AWAY = 1001


class FrameBoundaries:
    """Follows one direction of a session; `at_boundary` when no frame is half through."""

    def __init__(self) -> None:
        self._header = b""  # a frame header still arriving
        self._payload_left = 0
        self.closed = False  # a close frame went by

    @property
    def at_boundary(self) -> bool:
        return not self._header and self._payload_left == 0

    def feed(self, data: bytes) -> None:
        position, end = 0, len(data)
        while position < end:
            if self._payload_left:
                step = min(self._payload_left, end - position)
                self._payload_left -= step
                position += step
                continue
            take = min(14 - len(self._header), end - position)
            candidate = self._header + data[position:position + take]
            length = _frame_header_length(candidate)
            if length is None:  # the header goes on in the next bytes
                self._header = candidate
                position += take
                continue
            position += length - len(self._header)
            header, self._header = candidate[:length], b""
            if header[0] & 0x0F == 0x8:
                self.closed = True
            self._payload_left = _payload_length(header)


def _frame_header_length(header: bytes) -> int | None:
    if len(header) < 2:
        return None
    size = header[1] & 0x7F
    length = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if header[1] & 0x80 else 0)
    return length if len(header) >= length else None


def _payload_length(header: bytes) -> int:
    size = header[1] & 0x7F
    if size == 126:
        return struct.unpack_from("!H", header, 2)[0]
    if size == 127:
        return struct.unpack_from("!Q", header, 2)[0]
    return size


def close_frame(code: int, reason: bytes, masked: bool) -> bytes:
    """A close frame; frames a client sends must be masked (RFC 6455 5.3)."""
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes([0x88, len(payload)]) + payload
    key = os.urandom(4)
    return bytes([0x88, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
