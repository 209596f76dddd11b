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
    HOLD,
    LoopbackGuard,
    LoopbackPolicy,
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


def guard(allowed=(), resolvers=(), control=()) -> LoopbackGuard:
    g = object.__new__(LoopbackGuard)  # no notification fd, no thread: only the decision
    g.policy = LoopbackPolicy.build(allowed, resolvers, control)
    g._control_open = False
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
    other_front = (ipaddress.IPv4Address("127.0.0.2"), 40999)
    assert g._decide("connect", other_front, None) == errno.ECONNREFUSED
    g.allow([other_front])
    assert g._decide("connect", other_front, None) == 0


LOCAL_RESOLVER = (ipaddress.IPv4Address("127.0.0.1"), 53)
RESOLVED_STUB = (ipaddress.IPv4Address("127.0.0.53"), 53)
LOCAL_CONTROL = (ipaddress.IPv4Address("127.0.0.1"), 8080)


def test_a_resolver_on_127_0_0_1_is_reachable_over_udp_only():
    # The forwarder dials a peer's TCP to 127.0.0.1:53; tailscaled's own lookups use UDP.
    g = guard(resolvers=[LOCAL_RESOLVER])
    assert g._decide("connect", LOCAL_RESOLVER, socket.SOCK_DGRAM) == 0
    assert g._decide("connect", LOCAL_RESOLVER, socket.SOCK_STREAM) == errno.ECONNREFUSED
    assert g._decide("connect", LOCAL_RESOLVER, None) == errno.ECONNREFUSED


def test_a_resolver_elsewhere_on_loopback_is_reachable_both_ways():
    g = guard(resolvers=[RESOLVED_STUB])
    assert g._decide("connect", RESOLVED_STUB, socket.SOCK_STREAM) == 0
    assert g._decide("connect", RESOLVED_STUB, socket.SOCK_DGRAM) == 0


def test_a_control_server_on_127_0_0_1_waits_for_the_gate():
    g = guard(control=[LOCAL_CONTROL])
    assert g._decide("connect", LOCAL_CONTROL, socket.SOCK_STREAM) == HOLD
    assert g._decide("connect", (LOCAL_CONTROL[0], 8081), socket.SOCK_STREAM) == errno.ECONNREFUSED
    g._control_open = True
    assert g._decide("connect", LOCAL_CONTROL, socket.SOCK_STREAM) == 0


def test_policy_sorts_endpoints_by_whether_the_forwarder_dials_them():
    control_elsewhere = (ipaddress.IPv4Address("127.0.0.9"), 8080)
    local_v6 = (ipaddress.IPv6Address("::1"), 443)
    policy = LoopbackPolicy.build([FRONT], [LOCAL_RESOLVER, RESOLVED_STUB], [LOCAL_CONTROL, local_v6,
                                                                             control_elsewhere])
    assert policy.allowed == {FRONT, RESOLVED_STUB, control_elsewhere}
    assert policy.control == {LOCAL_CONTROL, local_v6}
    assert policy.control_ports == {8080, 443}
    assert policy.resolvers == {LOCAL_RESOLVER, RESOLVED_STUB}


# --- resolvers ------------------------------------------------------------------------


def test_resolver_endpoints_keeps_loopback_nameservers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver 1.1.1.1\nnameserver ::1\n"
                    "nameserver fe80::1%eth0\nnameserver bogus\nsearch example.com\nnameserver\n")
    assert resolver_endpoints(str(conf)) == {(ipaddress.IPv4Address("127.0.0.53"), 53),
                                            (ipaddress.IPv6Address("::1"), 53)}


def test_resolver_endpoints_without_a_file(tmp_path):
    assert resolver_endpoints(str(tmp_path / "missing")) == set()
