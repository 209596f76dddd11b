"""The PROXY protocol v2 header that tailscaled's Serve TCPForward sends first.

Its source address is the real client: a tailnet peer, or the public client of a
Funnel connection. We read exactly the header's bytes from the socket, so whatever
follows (a TLS ClientHello, an HTTP request) stays in the kernel for the next layer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import attrs

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER = struct.Struct("!12sBBH")
MAX_PAYLOAD = 4096  # addresses plus TLVs; tailscaled sends none of the latter

CMD_LOCAL, CMD_PROXY = 0x0, 0x1
AF_INET, AF_INET6 = 0x1, 0x2
TRANSPORT_STREAM = 0x1


class ProxyHeaderError(Exception):
    pass


@attrs.frozen
class ProxyHeader:
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    source_port: int
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination_port: int


def parse(header: bytes, payload: bytes) -> ProxyHeader:
    if len(header) != HEADER.size:
        raise ProxyHeaderError(f"PROXY header cut short: {len(header)} of {HEADER.size} bytes")
    signature, version_command, family_transport, _length = HEADER.unpack(header)
    if signature != SIGNATURE:
        raise ProxyHeaderError("connection did not start with a PROXY v2 header")
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"unsupported PROXY protocol version {version_command >> 4}")
    if version_command & 0xF != CMD_PROXY:
        raise ProxyHeaderError("PROXY header carries no client address (LOCAL command)")
    family, transport = family_transport >> 4, family_transport & 0xF
    if transport != TRANSPORT_STREAM:
        raise ProxyHeaderError(f"PROXY header for transport {transport}, not TCP")
    if family == AF_INET and len(payload) >= 12:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", payload)
        return ProxyHeader(ipaddress.IPv4Address(src), sport, ipaddress.IPv4Address(dst), dport)
    if family == AF_INET6 and len(payload) >= 36:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", payload)
        source = ipaddress.IPv6Address(src)
        return ProxyHeader(source.ipv4_mapped or source, sport, ipaddress.IPv6Address(dst), dport)
    raise ProxyHeaderError(f"PROXY header with address family {family} and {len(payload)} address bytes")


async def read(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ProxyHeader:
    """Read one PROXY v2 header from a non-blocking socket, consuming nothing after it."""
    header = await _recv_exactly(loop, sock, HEADER.size)
    length = HEADER.unpack(header)[3]
    if header[:12] != SIGNATURE:
        raise ProxyHeaderError("connection did not start with a PROXY v2 header")
    if length > MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY header of {length} bytes is implausibly long")
    return parse(header, await _recv_exactly(loop, sock, length))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise ProxyHeaderError("connection closed inside the PROXY header")
        data += chunk
    return data


def encode(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """A PROXY v2 header, as tailscaled writes it (tests use it to play a forger)."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if src.version == 4 and dst.version == 4:
        payload = struct.pack("!4s4sHH", src.packed, dst.packed, source_port, destination_port)
        family = AF_INET
    else:
        to6 = lambda a: a if a.version == 6 else ipaddress.IPv6Address(f"::ffff:{a}")  # noqa: E731
        payload = struct.pack("!16s16sHH", to6(src).packed, to6(dst).packed, source_port, destination_port)
        family = AF_INET6
    return HEADER.pack(SIGNATURE, 0x20 | CMD_PROXY, family << 4 | TRANSPORT_STREAM, len(payload)) + payload
