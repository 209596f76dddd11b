"""Who is on the other end of a front connection (tsnsrv.peercheck), asked of the real
kernel over NETLINK_SOCK_DIAG with real loopback sockets; this process plays tailscaled."""

from __future__ import annotations

import os
import socket

import pytest

from tsnsrv.peercheck import PEER_GONE, TailscaledPeerCheck, unfinished_connections


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


@pytest.fixture
def check():
    checker = TailscaledPeerCheck()
    checker.set_daemon(os.getpid(), os.getuid())
    return checker


def test_a_connection_from_the_daemon_itself_is_accepted(listener, check):
    with socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            assert check.refusal(accepted) is None
            assert client.fileno() >= 0


def test_a_connection_from_another_uid_is_refused(listener):
    check = TailscaledPeerCheck()
    check.set_daemon(os.getpid(), os.getuid() + 1)
    with socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert check.refusal(accepted) == f"connection from uid {os.getuid()}, not tailscaled's uid {os.getuid() + 1}"


def test_a_socket_that_is_not_one_of_the_daemons_is_refused(listener):
    check = TailscaledPeerCheck()
    check.set_daemon(os.getppid(), os.getuid())  # same uid, but these sockets are not the parent's
    if not os.access(f"/proc/{os.getppid()}/fd", os.R_OK):
        pytest.skip("cannot look into the parent's file descriptors here")
    with socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert "is not one of tailscaled's" in check.refusal(accepted)


def test_a_connection_closed_before_the_check_is_refused_as_gone(listener, check):
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"a forged request the sender will not wait for")
    accepted, _ = listener.accept()
    client.close()  # the sender's socket is orphaned: no inode, no owner to check
    with accepted:
        assert check.refusal(accepted) == PEER_GONE


def test_unfinished_connections_are_counted_until_both_ends_close(listener):
    address = listener.getsockname()
    assert unfinished_connections(address) == 0
    client = socket.create_connection(address)
    accepted, _ = listener.accept()
    assert unfinished_connections(address) == 1
    accepted.close()  # our side done, the peer's not: FIN_WAIT2
    assert unfinished_connections(address) == 1
    client.close()    # now both: TIME_WAIT, which no longer counts
    assert unfinished_connections(address) == 0
