"""sd_notify without libsystemd (tsnsrv.systemd), against a real datagram socket."""

from __future__ import annotations

import os
import socket

import pytest

from tsnsrv.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    for var in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    yield sock
    sock.close()


def test_ready_status_watchdog_stopping(notify_socket):
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready("serving https://books/")
    notifier.status("renewing")
    notifier.watchdog()
    notifier.extend_start_timeout(90)
    notifier.stopping("bye")
    received = [notify_socket.recv(4096).decode() for _ in range(5)]
    assert received == ["READY=1\nSTATUS=serving https://books/", "STATUS=renewing", "WATCHDOG=1",
                        "EXTEND_TIMEOUT_USEC=90000000", "STOPPING=1\nSTATUS=bye"]


def test_without_notify_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("x")  # must not raise


def test_abstract_socket_address(monkeypatch):
    name = f"tsnsrv-unit-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier().status("abstract")
        assert sock.recv(100) == b"STATUS=abstract"
    finally:
        sock.close()


def test_a_vanished_socket_is_only_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    Notifier().ready("x")
    assert "sd_notify to" in caplog.text


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("2000000", None, 1.0),
    ("2000000", "self", 1.0),
    ("2000000", "1", None),
    ("", None, None),
    ("abc", None, None),
])
def test_watchdog_interval_is_half_the_timeout(monkeypatch, usec, pid, interval):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert Notifier().watchdog_interval == interval
