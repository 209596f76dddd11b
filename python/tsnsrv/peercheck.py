"""Accept front-listener connections only from this service's own tailscaled.

Any local process can connect to the loopback front listener and send a PROXY header
claiming to be a tailnet peer. So for every connection we ask the kernel
(NETLINK_SOCK_DIAG, the interface `ss` uses) which socket is on the other end, and
require that it belongs to tailscaled: its uid must be the daemon's uid and, where
/proc lets us look (same uid or root), the socket must be one of the daemon's
open file descriptors.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterator

import attrs

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
# TCP states (include/net/tcp_states.h) in which a connection still carries data.
TCP_UNFINISHED = {1: "ESTABLISHED", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 8: "CLOSE_WAIT", 9: "LAST_ACK", 11: "CLOSING"}
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
# (sport, dport big-endian; src, dst as 16 bytes; interface; cookie[2]).
REQUEST = struct.Struct("=BBBxI")
SOCKID = struct.Struct("!HH16s16s")
SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid, inode
MSG_UID_INODE = struct.Struct("=II")
MSG_UID_OFFSET = 4 + 48 + 12


PEER_GONE = "the connecting socket was closed before it could be identified"


class PeerLookupError(Exception):
    pass


@attrs.frozen
class SocketOwner:
    uid: int
    inode: int


def _packed(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, ip.packed.ljust(16, b"\0")


def _sock_diag(family: int, states: int, sockid: bytes, dump: bool) -> Iterator[bytes]:
    """Ask the kernel about TCP sockets; yields each answer (an inet_diag_msg).

    One socket when `sockid` names it exactly, or, with `dump`, every one in `states`."""
    request = REQUEST.pack(family, socket.IPPROTO_TCP, 0, states) + sockid
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.sendto(NLMSGHDR.pack(NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + request, (0, 0))
        while True:
            reply, offset = nl.recv(65536), 0
            while offset < len(reply):
                length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(reply, offset)
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", reply, offset + NLMSGHDR.size)[0]
                    raise PeerLookupError(os.strerror(errno))
                if kind != SOCK_DIAG_BY_FAMILY:
                    raise PeerLookupError(f"unexpected sock_diag reply type {kind}")
                yield reply[offset + NLMSGHDR.size:offset + length]
                if not dump:
                    return
                offset += (length + 3) & ~3


def _sockid(sport: int, dport: int, src: bytes, dst: bytes) -> bytes:
    return SOCKID.pack(sport, dport, src, dst) + SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)


def tcp_socket_owner(local: tuple[str, int], remote: tuple[str, int]) -> SocketOwner:
    """Owner of the TCP socket bound to `local` and connected to `remote` (in this netns)."""
    family, src = _packed(local[0])
    _, dst = _packed(remote[0])
    try:
        message = next(_sock_diag(family, 0xFFFFFFFF, _sockid(local[1], remote[1], src, dst), dump=False), b"")
    except PeerLookupError as exc:
        raise PeerLookupError(f"no socket {local} -> {remote}: {exc}") from None
    if len(message) < MSG_UID_OFFSET + MSG_UID_INODE.size:
        raise PeerLookupError(f"no usable sock_diag answer for {local} -> {remote}")
    uid, inode = MSG_UID_INODE.unpack_from(message, MSG_UID_OFFSET)
    return SocketOwner(uid, inode)


def unfinished_connections(local: tuple[str, int]) -> int:
    """How many TCP connections on the listening address `local` are not yet closed by both ends.

    After tsnsrv closes a front connection, tailscaled still has to hand the last bytes
    to the client; it closes its end once the client has them and has hung up."""
    family, want_src = _packed(local[0])
    states = sum(1 << state for state in TCP_UNFINISHED)
    count = 0
    for message in _sock_diag(family, states, _sockid(0, 0, bytes(16), bytes(16)), dump=True):
        sport, _dport, src, _dst = SOCKID.unpack_from(message, 4)
        count += sport == local[1] and src == want_src
    return count


class TailscaledPeerCheck:
    """Decides whether a connection on the front listener comes from our tailscaled."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.uid: int | None = None
        self._known_inodes: set[int] = set()

    def set_daemon(self, pid: int, uid: int) -> None:
        if (pid, uid) != (self.pid, self.uid):
            self.pid, self.uid = pid, uid
            self._known_inodes.clear()
            if self.inspects_fds:
                log.info("front listener accepts connections only from tailscaled pid %d (uid %d)", pid, uid)
            else:
                log.warning("front listener accepts connections from uid %d, but cannot see the file descriptors "
                            "of tailscaled pid %d (another user or PID namespace, or /proc hidden), so any process "
                            "of that uid could pose as tailscaled; run both as one user in one namespace", uid, pid)

    @property
    def inspects_fds(self) -> bool:
        return self.pid is not None and os.access(f"/proc/{self.pid}/fd", os.R_OK | os.X_OK)

    def refusal(self, sock: socket.socket) -> str | None:
        """Why this accepted connection must be refused, or None if it comes from tailscaled."""
        if self.pid is None:
            return "tailscaled is not known yet"
        try:
            owner = tcp_socket_owner(sock.getpeername()[:2], sock.getsockname()[:2])
        except (OSError, PeerLookupError) as exc:
            return f"could not identify the connecting process: {exc}"
        if owner.uid != self.uid:
            return f"connection from uid {owner.uid}, not tailscaled's uid {self.uid}"
        if owner.inode == 0:
            # Its process has closed it already, so nobody can say whose it was. What
            # it sent is still in our buffer: serving that would let any local process
            # connect, write a forged request, close, and have it proxied.
            return PEER_GONE
        if owner.inode in self._known_inodes or not self.inspects_fds:
            return None
        self._known_inodes = self._daemon_socket_inodes()
        if owner.inode in self._known_inodes:
            return None
        # Not among tailscaled's sockets, or closed by it (its client hung up) while we
        # looked: a socket still there with the same inode is somebody else's.
        try:
            still = tcp_socket_owner(sock.getpeername()[:2], sock.getsockname()[:2])
        except (OSError, PeerLookupError):
            return PEER_GONE
        if still.inode != owner.inode:
            return PEER_GONE
        return f"connecting socket (inode {owner.inode}) is not one of tailscaled's (pid {self.pid})"

    def _daemon_socket_inodes(self) -> set[int]:
        inodes = set()
        fd_dir = f"/proc/{self.pid}/fd"
        try:
            for entry in os.scandir(fd_dir):
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except OSError as exc:
            log.warning("cannot list tailscaled's sockets in %s: %s", fd_dir, exc)
        return inodes
