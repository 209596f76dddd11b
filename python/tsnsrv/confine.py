"""Keep tailnet peers away from the host's loopback when tsnsrv spawns tailscaled.

A userspace tailscaled forwards every tailnet port that Serve does not claim to
127.0.0.1:<same port> on the host (wgengine/netstack: "case isTailscaleIP: dialIP =
ipv4Loopback"; UDP alike), so a peer allowed to reach the service could reach the
host's Postgres on 127.0.0.1:5432 through it. Under systemd the NixOS module closes
this with IPAddressDeny=localhost on the tailscaled unit. Without systemd, and
without root, the strongest mechanism is a seccomp filter with a user-space
supervisor (SECCOMP_RET_USER_NOTIF, Linux >= 5.5): every connect() and bind() of the
spawned tailscaled is shown to tsnsrv, which reads the target address from the
daemon's memory and decides (`LoopbackPolicy`). IPv4 loopback UDP binds are refused
outright, which is what the UDP forwarder needs first. Other system calls, including
the per-packet ones, never leave the kernel.

The forwarder dials only 127.0.0.1 (for the node's IPv4 and IPv6 alike), so its targets
are exactly the endpoints tailscaled may itself need on 127.0.0.1 or ::1: a resolver
(dnsmasq, unbound, Pi-hole) or a control server there. Those are told apart by kind, not
by address: DNS may use connected UDP sockets, which the forwarder never makes (its
loopback binds are refused), but no TCP; and the control server's port is open only
while no peer can reach the forwarder on it: while the node is shields-up (no inbound
connections at all) or its Serve config claims that port. tsnsrv holds tailscaled's
control connects until then. Other loopback addresses (127.0.0.2 for the front
listener, systemd-resolved's 127.0.0.53) are never forwarder targets.

If tsnsrv dies, the kernel fails the filtered calls (ENOSYS): the guard fails closed.
A check-then-continue supervisor cannot stop a process that rewrites its own memory
between the check and the call (seccomp_unotify(2)); the adversary here is a remote
peer choosing a port, not tailscaled itself, so that does not apply.

`python -m tsnsrv.confine` is the small exec wrapper that installs the filter in the
child, hands the notification fd to tsnsrv and executes tailscaled.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import platform
import pwd
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable

import attrs

log = logging.getLogger(__name__)

# <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h>
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06

NOTIF = struct.Struct("=QIIiIQ6Q")  # seccomp_notif: id, pid, flags, then seccomp_data
NOTIF_RESP = struct.Struct("=QqiI")  # seccomp_notif_resp: id, val, error, flags


def _ioc(direction: int, number: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("!") << 8 | number


IOCTL_NOTIF_RECV = _ioc(3, 0, NOTIF.size)
IOCTL_NOTIF_SEND = _ioc(3, 1, NOTIF_RESP.size)
IOCTL_NOTIF_ID_VALID = _ioc(1, 2, 8)
SYS_PIDFD_GETFD = 438  # the same on every architecture since the syscall table unification

# Per architecture: audit arch, seccomp(2), connect(2), bind(2), io_uring_setup(2).
# io_uring could issue connects that seccomp never sees, so it is refused.
ARCHES = {
    "x86_64": (0xC000003E, 317, 42, 49, 425),
    "aarch64": (0xC00000B7, 277, 203, 200, 425),
}
X32_SYSCALL_BIT = 0x40000000


class ConfinementUnavailable(Exception):
    pass


def _arch() -> tuple[int, int, int, int, int]:
    machine = platform.machine()
    if sys.platform != "linux" or machine not in ARCHES:
        raise ConfinementUnavailable(f"seccomp confinement is implemented for Linux on "
                                     f"{' and '.join(ARCHES)}, not {sys.platform}/{machine}")
    return ARCHES[machine]


def build_filter() -> bytes:
    audit_arch, _seccomp, connect, bind, io_uring_setup = _arch()
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),                      # A = seccomp_data.arch
        (BPF_JEQ_K, 1, 0, audit_arch),
        (BPF_RET_K, 0, 0, deny),                      # foreign ABI (e.g. i386 via int 0x80)
        (BPF_LD_W_ABS, 0, 0, 0),                      # A = seccomp_data.nr
        (BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (BPF_RET_K, 0, 0, deny),                      # x32 ABI
        (BPF_JEQ_K, 2, 0, connect),
        (BPF_JEQ_K, 1, 0, bind),
        (BPF_JEQ_K, 1, 2, io_uring_setup),
        (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),    # connect, bind
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),  # io_uring_setup
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def _install_filter() -> int:
    """Install the filter on this process; returns the notification fd."""
    # Imported where needed, not at the top: the service process rarely needs ctypes,
    # and it costs memory in every one.
    import ctypes

    _, seccomp_nr, *_ = _arch()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    code = build_filter()
    filters = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code) // 8, ctypes.addressof(filters))
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(seccomp_nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(prog))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)")
    return fd


def _drop_privileges(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = user


def exec_confined(argv: list[str]) -> None:
    """Entry point of `python -m tsnsrv.confine [--user USER] --notify-fd N -- PROGRAM ARGS...`."""
    user, notify_fd = None, None
    while argv and argv[0] != "--":
        flag, value, *argv = argv
        if flag == "--user":
            user = value
        elif flag == "--notify-fd":
            notify_fd = int(value)
        else:
            raise SystemExit(f"tsnsrv.confine: unknown flag {flag}")
    program = argv[1:]
    if notify_fd is None or not program:
        raise SystemExit("usage: python -m tsnsrv.confine [--user USER] --notify-fd N -- PROGRAM ARGS...")
    import ctypes  # before dropping privileges: the account may not be able to read Python's library

    if user is not None:
        _drop_privileges(user)
    # After the uid change, which clears it: die with tsnsrv even before tailscaled reads its pipe.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    with socket.socket(fileno=notify_fd) as channel:
        try:
            listener = _install_filter()
        except (OSError, ConfinementUnavailable) as exc:
            # tsnsrv decides what an unconfined daemon means (it warns); the wrapper just reports.
            channel.sendall(f"unavailable: {exc}".encode())
        else:
            socket.send_fds(channel, [b"seccomp"], [listener])
            os.close(listener)
    os.execvp(program[0], program)


def receive_listener(channel: socket.socket, timeout: float) -> int:
    """The notification fd the wrapper sends before it execs tailscaled."""
    channel.settimeout(timeout)
    try:
        message, fds, _flags, _addr = socket.recv_fds(channel, 4096, 1)
    except TimeoutError:
        raise ConfinementUnavailable("the confinement wrapper sent no seccomp listener") from None
    if not fds:
        reason = message.decode(errors="replace").removeprefix("unavailable: ") or "the wrapper exited"
        raise ConfinementUnavailable(reason)
    return fds[0]


Endpoint = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _socket_type(tid: int, fd: int) -> int | None:
    """SOCK_STREAM or SOCK_DGRAM of another process's fd, via pidfd_getfd(2) (Linux >= 5.6)."""
    try:
        with open(f"/proc/{tid}/status") as status:
            tgid = next(int(line.split()[1]) for line in status if line.startswith("Tgid:"))
        pidfd = os.pidfd_open(tgid)
    except (OSError, StopIteration, ValueError):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            return None
        with socket.socket(fileno=copy) as sock:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    except OSError:
        return None
    finally:
        os.close(pidfd)


def _parse_sockaddr(raw: bytes) -> Endpoint | None:
    """(ip, port) of an AF_INET/AF_INET6 sockaddr, None for other families."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        return ipaddress.IPv4Address(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6 and len(raw) >= 24:
        ip = ipaddress.IPv6Address(raw[8:24])
        return ip.ipv4_mapped or ip, struct.unpack_from("!H", raw, 2)[0]
    return None


def reaches_forwarder_targets(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a connection to `ip` could be one the forwarder makes for a peer: 127.0.0.1
    itself, ::1 to be safe, and the unspecified addresses that reach this host's loopback."""
    return ip in (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")) or ip.is_unspecified


@attrs.frozen
class LoopbackPolicy:
    """What a guarded tailscaled may connect to on host loopback."""

    allowed: frozenset[Endpoint] = frozenset()  # never forwarder targets: front listeners, 127.0.0.53
    resolvers: frozenset[Endpoint] = frozenset()  # DNS over connected UDP sockets only
    control: frozenset[Endpoint] = frozenset()  # forwarder targets: open only while no peer can reach them

    @classmethod
    def build(cls, front: Iterable[Endpoint], resolvers: Iterable[Endpoint], control: Iterable[Endpoint]
              ) -> LoopbackPolicy:
        resolvers, control = set(resolvers), set(control)
        safe = {endpoint for endpoint in resolvers | control if not reaches_forwarder_targets(endpoint[0])}
        return cls(frozenset(set(front) | safe), frozenset(resolvers), frozenset(control - safe))

    def with_front(self, endpoints: Iterable[Endpoint]) -> LoopbackPolicy:
        return attrs.evolve(self, allowed=self.allowed | frozenset(endpoints))

    @property
    def control_ports(self) -> set[int]:
        """Tailnet ports the node must claim before its control connections may proceed unshielded."""
        return {port for _ip, port in self.control}


HOLD = -1  # a decision: keep the caller waiting until the control gate opens


class LoopbackGuard:
    """Supervises the seccomp notifications of one tailscaled process tree."""

    CONTROL_HOLD_SECONDS = 30.0

    def __init__(self, listener_fd: int, policy: LoopbackPolicy = LoopbackPolicy()):
        _, _, self._connect_nr, self._bind_nr, _ = _arch()
        self._fd = listener_fd
        self.policy = policy
        self._control_open = False
        self._held: list[tuple[int, float, Endpoint]] = []
        self._wake_read, self._wake_write = os.pipe()
        self._stopping = False
        self._last_logged: dict[tuple[str, Endpoint], float] = {}
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name="tsnsrv-loopback-guard", daemon=True)
        self._thread.start()

    def allow(self, endpoints: Iterable[Endpoint]) -> None:
        self.policy = self.policy.with_front(endpoints)

    def open_control(self) -> None:
        """No peer can reach the forwarder on the control ports any more (shields up, or claimed)."""
        self._control_open = True
        os.write(self._wake_write, b"!")

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_write, b"!")
        self._thread.join(timeout=2)
        os.close(self._fd)
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while not self._stopping:
            timeout = 200.0
            if self._held:
                timeout = max(0.0, min(timeout, (min(d for _, d, _ in self._held) - time.monotonic()) * 1000))
            events = dict(poller.poll(timeout))
            if events.get(self._fd, 0) & (select.POLLHUP | select.POLLERR):
                return  # every confined process has exited
            if self._wake_read in events:
                os.read(self._wake_read, 64)
            if events.get(self._fd, 0) & select.POLLIN:
                self._handle_one()
            self._answer_held()

    def _handle_one(self) -> None:
        buffer = bytearray(NOTIF.size)
        try:
            fcntl.ioctl(self._fd, IOCTL_NOTIF_RECV, buffer, True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return  # the caller went away before we looked
            raise
        notif_id, pid, _flags, nr, _arch_, _ip, fd, address, length, *_ = NOTIF.unpack(buffer)
        call = "connect" if nr == self._connect_nr else "bind"
        endpoint = self._read_sockaddr(pid, address, min(length, 128))
        sock_type = None
        if endpoint and ((call == "bind" and endpoint[0].version == 4) or endpoint in self.policy.resolvers):
            sock_type = _socket_type(pid, fd)
        if not self._id_valid(notif_id):
            return
        error = self._decide(call, endpoint, sock_type)
        if error == HOLD:
            assert endpoint
            self._held.append((notif_id, time.monotonic() + self.CONTROL_HOLD_SECONDS, endpoint))
            return
        if error and endpoint:
            self._log_refusal(call, endpoint)
        self._respond(notif_id, error)

    def _answer_held(self) -> None:
        if not self._held:
            return
        now, waiting = time.monotonic(), []
        for notif_id, deadline, endpoint in self._held:
            if self._control_open:
                self._respond(notif_id, 0)
            elif now >= deadline:
                log.warning("refused tailscaled's connection to the control server at %s:%d: the node did not go "
                            "shields-up within %.0fs, and until it does a tailnet peer could reach that port",
                            *endpoint, self.CONTROL_HOLD_SECONDS)
                self._respond(notif_id, errno.ECONNREFUSED)
            else:
                waiting.append((notif_id, deadline, endpoint))
        self._held = waiting

    def _respond(self, notif_id: int, error: int) -> None:
        if error:
            self.refused += 1
        flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE if error == 0 else 0
        response = bytearray(NOTIF_RESP.pack(notif_id, 0, -error, flags))
        try:
            fcntl.ioctl(self._fd, IOCTL_NOTIF_SEND, response, True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def _decide(self, call: str, endpoint: Endpoint | None | bool, sock_type: int | None) -> int:
        """0 to let the call proceed, HOLD, or the errno to fail it with."""
        if endpoint is False:
            return errno.EPERM  # unreadable: refuse rather than guess
        if endpoint is None:
            return 0  # not an IP socket address
        ip, _port = endpoint
        if call == "connect":
            # Connecting to 0.0.0.0 or :: reaches this host's loopback too.
            if not (ip.is_loopback or ip.is_unspecified) or endpoint in self.policy.allowed:
                return 0
            if endpoint in self.policy.resolvers and sock_type == socket.SOCK_DGRAM:
                return 0
            if endpoint in self.policy.control:
                return 0 if self._control_open else HOLD
            return errno.ECONNREFUSED
        # The UDP forwarder binds 127.0.0.1 before sending to the host's port (and
        # retries with port 0), so no IPv4 loopback UDP socket may exist. Other binds
        # (netcheck's [::1]:0 IPv6 probe, TCP listeners, 0.0.0.0) reach nothing.
        if ip.version == 4 and ip.is_loopback and sock_type != socket.SOCK_STREAM:
            return errno.EPERM
        return 0

    @staticmethod
    def _read_sockaddr(pid: int, address: int, length: int) -> Endpoint | None | bool:
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError:
            return False
        try:
            return _parse_sockaddr(os.pread(fd, length, address))
        except OSError:
            return False
        finally:
            os.close(fd)

    def _id_valid(self, notif_id: int) -> bool:
        try:
            fcntl.ioctl(self._fd, IOCTL_NOTIF_ID_VALID, bytearray(struct.pack("=Q", notif_id)), True)
            return True
        except OSError:
            return False

    def _log_refusal(self, call: str, endpoint: Endpoint) -> None:
        now = time.monotonic()
        key = (call, endpoint)
        if now - self._last_logged.get(key, -60.0) >= 60.0:
            self._last_logged[key] = now
            ip, port = endpoint
            if call == "connect" and endpoint in self.policy.resolvers:
                log.warning("refused tailscaled's TCP connection to the resolver at %s:%d: a tailnet peer may be "
                            "trying that port, and tailscaled's own lookups use UDP (repeats within a minute are "
                            "not logged)", ip, port)
            elif call == "connect":
                log.warning("refused tailscaled's connection to host loopback %s:%d: a tailnet peer tried to reach "
                            "a port this service does not serve (repeats within a minute are not logged)", ip, port)
            else:
                log.info("refused tailscaled a UDP socket on host loopback %s:%d (tailnet UDP to host ports is "
                         "blocked)", ip, port)


def resolver_endpoints(resolv_conf: str = "/etc/resolv.conf") -> set[Endpoint]:
    """Loopback DNS resolvers tailscaled may need (e.g. systemd-resolved's 127.0.0.53)."""
    endpoints: set[Endpoint] = set()
    try:
        with open(resolv_conf) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        ip = ipaddress.ip_address(words[1].split("%")[0])
                    except ValueError:
                        continue
                    if ip.is_loopback:
                        endpoints.add((ip, 53))
    except OSError:
        pass
    return endpoints


if __name__ == "__main__":
    exec_confined(sys.argv[1:])
