"""PROXY protocol v2 (tsnsrv.proxyproto): what tailscaled's Serve TCPForward sends first.

Headers are built by hand (not only with the module's own `encode`) so the parser is
checked against the spec, not against itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnsrv import proxyproto
from tsnsrv.proxyproto import SIGNATURE, ProxyHeader, ProxyHeaderError, encode, parse


def v2(command: int, family: int, transport: int, payload: bytes, version: int = 2, length: int | None = None) -> bytes:
    return (SIGNATURE + bytes([version << 4 | command, family << 4 | transport])
            + struct.pack("!H", len(payload) if length is None else length) + payload)


def ipv4_payload(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)


def ipv6_payload(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)


def split(data: bytes) -> tuple[bytes, bytes]:
    return data[:16], data[16:]


def test_signature_is_the_spec_constant():
    assert SIGNATURE == bytes.fromhex("0D0A0D0A000D0A515549540A")


def test_ipv4():
    header = v2(0x1, 0x1, 0x1, ipv4_payload("100.64.0.7", "127.0.0.2", 51234, 443))
    assert parse(*split(header)) == ProxyHeader(ipaddress.IPv4Address("100.64.0.7"), 51234,
                                                 ipaddress.IPv4Address("127.0.0.2"), 443)


def test_ipv6():
    header = v2(0x1, 0x2, 0x1, ipv6_payload("fd7a:115c:a1e0::1", "::1", 40000, 8443))
    assert parse(*split(header)) == ProxyHeader(ipaddress.IPv6Address("fd7a:115c:a1e0::1"), 40000,
                                                 ipaddress.IPv6Address("::1"), 8443)


def test_ipv4_mapped_ipv6_source_becomes_ipv4():
    header = v2(0x1, 0x2, 0x1, ipv6_payload("::ffff:100.64.0.9", "::1", 1, 2))
    parsed = parse(*split(header))
    assert parsed.source == ipaddress.IPv4Address("100.64.0.9")
    assert parsed.source.version == 4


def test_tlvs_after_the_addresses_are_ignored():
    tlvs = bytes([0x01, 0x00, 0x02]) + b"h2" + bytes([0x04, 0x00, 0x00])  # ALPN "h2", NOOP
    header = v2(0x1, 0x1, 0x1, ipv4_payload("203.0.113.5", "127.0.0.2", 9, 10) + tlvs)
    parsed = parse(*split(header))
    assert parsed.source == ipaddress.IPv4Address("203.0.113.5") and parsed.destination_port == 10


def test_local_command_is_refused_as_carrying_no_client():
    header = v2(0x0, 0x0, 0x0, b"")
    with pytest.raises(ProxyHeaderError, match="LOCAL"):
        parse(*split(header))


@pytest.mark.parametrize(("header", "message"), [
    (b"GET / HTTP/1.1\r\nHost:", "did not start with a PROXY v2 header"),
    (v2(0x1, 0x1, 0x1, ipv4_payload("1.2.3.4", "5.6.7.8", 1, 2), version=1), "unsupported PROXY protocol version 1"),
    (v2(0x1, 0x1, 0x2, ipv4_payload("1.2.3.4", "5.6.7.8", 1, 2)), "transport 2, not TCP"),
    (v2(0x1, 0x3, 0x1, b"\0" * 216), "address family 3"),
    (v2(0x1, 0x0, 0x1, b""), "address family 0"),
    (v2(0x1, 0x1, 0x1, b"\x01\x02\x03\x04\x05"), "family 1 and 5 address bytes"),
    (v2(0x1, 0x2, 0x1, b"\0" * 35), "family 2 and 35 address bytes"),
])
def test_malformed_headers(header, message):
    with pytest.raises(ProxyHeaderError, match=message):
        parse(*split(header))


def test_encode_matches_the_spec_layout():
    assert encode("100.64.0.7", 51234, "127.0.0.2", 443) == v2(0x1, 0x1, 0x1,
                                                               ipv4_payload("100.64.0.7", "127.0.0.2", 51234, 443))
    assert encode("fd7a:115c:a1e0::1", 1, "::1", 2) == v2(0x1, 0x2, 0x1, ipv6_payload("fd7a:115c:a1e0::1", "::1", 1, 2))


ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
ports = st.integers(0, 65535)


@given(src=ipv4s | ipv6s, dst=ipv4s | ipv6s, sport=ports, dport=ports)
def test_any_encoded_header_round_trips_its_addresses(src, dst, sport, dport):
    parsed = parse(*split(encode(str(src), sport, str(dst), dport)))
    assert parsed.source == src
    assert (parsed.source_port, parsed.destination_port) == (sport, dport)
    if src.version == dst.version:
        assert parsed.destination == dst
    else:
        # A mixed pair travels as IPv6; the destination stays in its mapped form.
        assert (parsed.destination.ipv4_mapped or parsed.destination) == dst


@given(st.binary(min_size=16, max_size=80))
def test_arbitrary_bytes_raise_only_the_modules_error(data):
    try:
        parsed = parse(*split(data))
    except ProxyHeaderError:
        return
    assert data.startswith(SIGNATURE)
    assert isinstance(parsed, ProxyHeader)


@given(st.binary(min_size=2, max_size=40))
def test_arbitrary_bytes_after_a_valid_prefix_raise_only_the_modules_error(tail):
    data = SIGNATURE + bytes([0x21, 0x11]) + tail
    try:
        parsed = parse(data[:16], data[16:])
    except ProxyHeaderError as exc:
        assert "address bytes" in str(exc)
        return
    assert len(data) - 16 >= 12 and parsed.source.version == 4


def test_truncated_fixed_header_raises_the_modules_error():
    with pytest.raises(ProxyHeaderError):
        parse(SIGNATURE[:7], b"")


# --- reading from a socket -----------------------------------------------------------


async def read_from(data: bytes, close: bool = True) -> tuple[ProxyHeader | Exception, bytes]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(data)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        try:
            result: ProxyHeader | Exception = await proxyproto.read(loop, ours)
        except ProxyHeaderError as exc:
            result = exc
        ours.setblocking(True)
        ours.settimeout(1)
        rest = b""
        if close:
            while chunk := ours.recv(65536):
                rest += chunk
        return result, rest
    finally:
        ours.close()
        theirs.close()


@pytest.mark.asyncio
async def test_read_consumes_exactly_the_header():
    header = encode("100.64.0.7", 5, "127.0.0.2", 443)
    result, rest = await read_from(header + b"\x16\x03\x01 ClientHello follows")
    assert result == ProxyHeader(ipaddress.ip_address("100.64.0.7"), 5, ipaddress.ip_address("127.0.0.2"), 443)
    assert rest == b"\x16\x03\x01 ClientHello follows"


@pytest.mark.asyncio
async def test_read_consumes_tlvs_too():
    header = v2(0x1, 0x1, 0x1, ipv4_payload("100.64.0.8", "127.0.0.2", 7, 443) + b"\x04\x00\x03abc")
    result, rest = await read_from(header + b"GET / HTTP/1.1\r\n")
    assert isinstance(result, ProxyHeader) and result.source_port == 7
    assert rest == b"GET / HTTP/1.1\r\n"


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", [0, 5, 15, 16, 20, 27])
async def test_read_of_a_truncated_header_fails_cleanly(cut):
    header = encode("100.64.0.7", 5, "127.0.0.2", 443)
    result, _ = await read_from(header[:cut])
    assert isinstance(result, ProxyHeaderError)
    assert "connection closed inside the PROXY header" in str(result)


@pytest.mark.asyncio
async def test_read_refuses_a_bad_signature_before_reading_a_payload():
    result, rest = await read_from(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(result, ProxyHeaderError) and "did not start with a PROXY v2 header" in str(result)
    assert rest == b"Host: x\r\n\r\n"  # only the 16-byte fixed header was consumed


@pytest.mark.asyncio
async def test_read_refuses_an_implausibly_long_payload():
    header = SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", proxyproto.MAX_PAYLOAD + 1)
    result, _ = await read_from(header)
    assert isinstance(result, ProxyHeaderError) and "implausibly long" in str(result)


@settings(max_examples=25)
@given(st.binary(max_size=64))
def test_read_of_arbitrary_bytes_raises_only_the_modules_error(data):
    async def scenario() -> None:
        result, _ = await read_from(data)
        assert isinstance(result, (ProxyHeader, ProxyHeaderError))
    asyncio.run(scenario())
