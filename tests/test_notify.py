"""sd_notify client: messages really reach an AF_UNIX datagram socket, as systemd's would."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

from reconciler.host import notify


@pytest.fixture
def listener(monkeypatch):
    """A bound datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    with tempfile.TemporaryDirectory(prefix="notify") as d:  # short: sun_path holds 108 bytes
        path = os.path.join(d, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield sock
        finally:
            sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready(listener):
    assert notify.ready() is True
    assert receive(listener) == "READY=1"


def test_ready_with_status(listener):
    assert notify.ready("3 groups, 2 owned")
    assert receive(listener) == "READY=1\nSTATUS=3 groups, 2 owned"


def test_watchdog_stopping_status(listener):
    assert notify.watchdog()
    assert receive(listener) == "WATCHDOG=1"
    assert notify.stopping()
    assert receive(listener) == "STOPPING=1"
    assert notify.status("reconciling")
    assert receive(listener) == "STATUS=reconciling"


def test_status_stays_one_field(listener):
    notify.status("line one\nWATCHDOG=1")
    assert receive(listener) == "STATUS=line one WATCHDOG=1"


def test_abstract_namespace(monkeypatch):
    name = f"reconciler-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_quiet_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify.status("x") is False


def test_unreachable_socket_returns_false(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.watchdog() is False


def test_address():
    assert notify.address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify.address({"NOTIFY_SOCKET": "@abc"}) == "\0abc"
    assert notify.address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert notify.address({}) is None


def test_watchdog_interval():
    me = str(os.getpid())
    assert notify.watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 10.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": me}) == 2.5
    assert notify.watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}) is None


def test_watchdog_interval_reads_the_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 4.0


def test_child_environ_drops_the_agents_variables():
    env = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}
    assert notify.child_environ(env) == {"PATH": "/bin"}


def test_a_full_socket_costs_the_notification_not_a_stall(listener):
    """systemd not reading its socket for a while: each send fails at once (non-blocking),
    never blocking the agent's event loop (which would cost it its lease)."""
    import time

    results = []
    started = time.monotonic()
    for _ in range(10_000):  # far more than a datagram socket's queue holds unread
        results.append(notify.watchdog())
        if not results[-1]:
            break
    assert results[0] is True and results[-1] is False, "the queue never filled"
    assert time.monotonic() - started < 2.0
    assert receive(listener) == "WATCHDOG=1"  # what did go out is there
