"""The loopback guard's pure parts (tsnsrv.confine): the seccomp BPF program, sockaddr
parsing, the allow/refuse decision, and loopback resolvers from resolv.conf.

The BPF program is run by a small interpreter here, so its jumps are checked for every
kind of system call without installing it.
"""

from __future__ import annotations

import errno
import ipaddress
import platform
import socket
import struct

import pytest

from tsnsrv import confine
from tsnsrv.confine import (
    ARCHES,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_USER_NOTIF,
    X32_SYSCALL_BIT,
    LoopbackGuard,
    _parse_sockaddr,
    resolver_endpoints,
)

pytestmark = pytest.mark.skipif(platform.machine() not in ARCHES,
                                reason="seccomp guard is implemented for x86_64 and aarch64 only")


def run_bpf(program: bytes, arch: int, nr: int) -> int:
    """Evaluate a classic-BPF seccomp program on seccomp_data {nr, arch}."""
    data = struct.pack("=iI", nr, arch) + b"\0" * 56
    instructions = [struct.unpack_from("=HBBI", program, offset) for offset in range(0, len(program), 8)]
    pc, acc = 0, 0
    for _ in range(len(instructions) + 1):
        code, jt, jf, k = instructions[pc]
        if code == confine.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == confine.BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == confine.BPF_JGE_K:
            pc += 1 + (jt if acc >= k else jf)
        elif code == confine.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")
    raise AssertionError("BPF program did not return")


@pytest.fixture(scope="module")
def arch():
    return confine._arch()


def test_filter_is_whole_instructions(arch):
    program = confine.build_filter()
    assert len(program) % 8 == 0 and len(program) // 8 == 12


def test_filter_sends_connect_and_bind_to_the_supervisor(arch):
    audit_arch, _seccomp, connect, bind, _uring = arch
    program = confine.build_filter()
    assert run_bpf(program, audit_arch, connect) == SECCOMP_RET_USER_NOTIF
    assert run_bpf(program, audit_arch, bind) == SECCOMP_RET_USER_NOTIF


def test_filter_refuses_io_uring_and_foreign_abis(arch):
    audit_arch, _seccomp, _connect, _bind, io_uring_setup = arch
    program = confine.build_filter()
    assert run_bpf(program, audit_arch, io_uring_setup) == SECCOMP_RET_ERRNO | errno.ENOSYS
    assert run_bpf(program, 0x40000003, 102) == SECCOMP_RET_ERRNO | errno.EPERM  # i386
    assert run_bpf(program, audit_arch, X32_SYSCALL_BIT | 42) == SECCOMP_RET_ERRNO | errno.EPERM


@pytest.mark.parametrize("nr", [0, 1, 3, 44, 46, 232, 281, 288])
def test_filter_allows_everything_else(arch, nr):
    audit_arch, _seccomp, connect, bind, io_uring_setup = arch
    if nr in (connect, bind, io_uring_setup):
        pytest.skip("a filtered call on this architecture")
    assert run_bpf(confine.build_filter(), audit_arch, nr) == SECCOMP_RET_ALLOW


def test_known_architectures():
    assert ARCHES["x86_64"][2:4] == (42, 49)
    assert ARCHES["aarch64"][2:4] == (203, 200)


# --- sockaddr ---------------------------------------------------------------------------


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + b"\0" * 4
            + socket.inet_pton(socket.AF_INET6, ip) + b"\0" * 4)


@pytest.mark.parametrize(("raw", "endpoint"), [
    (sockaddr_in("127.0.0.1", 5432), (ipaddress.IPv4Address("127.0.0.1"), 5432)),
    (sockaddr_in("10.1.2.3", 80), (ipaddress.IPv4Address("10.1.2.3"), 80)),
    (sockaddr_in6("::1", 443), (ipaddress.IPv6Address("::1"), 443)),
    (sockaddr_in6("::ffff:127.0.0.1", 22), (ipaddress.IPv4Address("127.0.0.1"), 22)),
    (struct.pack("=H", socket.AF_UNIX) + b"/run/x.sock\0", None),
    (b"\x02", None),
    (sockaddr_in("127.0.0.1", 1)[:6], None),
    (sockaddr_in6("::1", 1)[:20], None),
])
def test_parse_sockaddr(raw, endpoint):
    assert _parse_sockaddr(raw) == endpoint


# --- the decision ---------------------------------------------------------------------


def guard(allowed=()) -> LoopbackGuard:
    g = object.__new__(LoopbackGuard)  # no notification fd, no thread: only the decision
    g._allowed = frozenset(allowed)
    return g


FRONT = (ipaddress.IPv4Address("127.0.0.2"), 40123)


@pytest.mark.parametrize(("call", "endpoint", "sock_type", "result"), [
    ("connect", (ipaddress.IPv4Address("127.0.0.1"), 5432), None, errno.ECONNREFUSED),
    ("connect", (ipaddress.IPv4Address("127.0.0.2"), 5432), None, errno.ECONNREFUSED),
    ("connect", (ipaddress.IPv4Address("127.255.255.254"), 22), None, errno.ECONNREFUSED),
    ("connect", (ipaddress.IPv4Address("0.0.0.0"), 5432), None, errno.ECONNREFUSED),
    ("connect", (ipaddress.IPv6Address("::1"), 5432), None, errno.ECONNREFUSED),
    ("connect", (ipaddress.IPv6Address("::"), 5432), None, errno.ECONNREFUSED),
    ("connect", FRONT, None, 0),
    ("connect", (ipaddress.IPv4Address("127.0.0.2"), 40124), None, errno.ECONNREFUSED),
    ("connect", (ipaddress.IPv4Address("198.18.0.1"), 8080), None, 0),
    ("connect", (ipaddress.IPv6Address("fd7a:115c:a1e0::1"), 443), None, 0),
    ("connect", None, None, 0),
    ("connect", False, None, errno.EPERM),
    ("bind", (ipaddress.IPv4Address("127.0.0.1"), 0), socket.SOCK_DGRAM, errno.EPERM),
    ("bind", (ipaddress.IPv4Address("127.0.0.1"), 5353), None, errno.EPERM),
    ("bind", (ipaddress.IPv4Address("127.0.0.1"), 0), socket.SOCK_STREAM, 0),
    ("bind", (ipaddress.IPv4Address("0.0.0.0"), 0), socket.SOCK_DGRAM, 0),
    ("bind", (ipaddress.IPv6Address("::1"), 0), socket.SOCK_DGRAM, 0),
    ("bind", False, None, errno.EPERM),
])
def test_decide(call, endpoint, sock_type, result):
    assert guard([FRONT])._decide(call, endpoint, sock_type) == result


def test_allow_adds_endpoints():
    g = guard()
    resolver = (ipaddress.IPv4Address("127.0.0.53"), 53)
    assert g._decide("connect", resolver, None) == errno.ECONNREFUSED
    g.allow([resolver])
    assert g._decide("connect", resolver, None) == 0


# --- resolvers ------------------------------------------------------------------------


def test_resolver_endpoints_keeps_loopback_nameservers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver 1.1.1.1\nnameserver ::1\n"
                    "nameserver fe80::1%eth0\nnameserver bogus\nsearch example.com\nnameserver\n")
    assert resolver_endpoints(str(conf)) == {(ipaddress.IPv4Address("127.0.0.53"), 53),
                                            (ipaddress.IPv6Address("::1"), 53)}


def test_resolver_endpoints_without_a_file(tmp_path):
    assert resolver_endpoints(str(tmp_path / "missing")) == set()
