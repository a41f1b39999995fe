"""Kernel events that wake the reconcile at once (issue 16): an address added or removed
(netlink RTMGRP_*_IFADDR notifications) and a mount table change (/proc/self/mountinfo
signals POLLPRI on every mount or unmount in this mount namespace).

They only wake: the reconcile that follows reads the kernel as always (level-triggered), so
nothing depends on having seen an event, and a lost one costs at most a tick.

Both are file descriptors on the agent's event loop, no thread. The netlink socket is a
plain AF_NETLINK socket of the standard library: the messages are not parsed (any of them
means "look again"), so pyroute2's parser is not needed, and its synchronous IPRoute cannot
run inside the agent's loop. /proc/self/mountinfo is always readable (POLLIN), so it is
watched through an epoll of its own asking for EPOLLPRI only, whose descriptor the loop
watches for reading.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from collections.abc import Callable

log = logging.getLogger("reconciler.observe")

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
MOUNTINFO = "/proc/self/mountinfo"


class KernelEvents:
    def __init__(self, *, on_change: Callable[[], None]):
        self.on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._mounts: int | None = None  # /proc/self/mountinfo
        self._epoll: select.epoll | None = None
        self.events = 0  # how many woke the loop (tests, benchmarks)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            s.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._netlink)
            self._sock = s
        except OSError as exc:
            log.warning("no address notifications (netlink: %s): address changes are seen at the next tick", exc)
        try:
            self._mounts = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
            self._epoll = select.epoll()
            self._epoll.register(self._mounts, select.EPOLLPRI | select.EPOLLERR)
            self._epoll.poll(0)  # (consumes the state as it is now: only changes from here on)
            loop.add_reader(self._epoll.fileno(), self._mountinfo)
        except OSError as exc:
            log.warning("no mount notifications (%s: %s): mount changes are seen at the next tick", MOUNTINFO, exc)

    def stop(self) -> None:
        if self._loop is not None:
            if self._sock is not None:
                self._loop.remove_reader(self._sock.fileno())
            if self._epoll is not None:
                self._loop.remove_reader(self._epoll.fileno())
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._mounts is not None:
            os.close(self._mounts)
            self._mounts = None

    def _netlink(self) -> None:
        assert self._sock is not None
        got = False
        while True:
            try:
                if not self._sock.recv(65536):
                    break
                got = True
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: notifications were lost; looking again covers them
                log.debug("netlink: %s", exc)
                got = True
                break
        if got:
            self._wake()

    def _mountinfo(self) -> None:
        # The loop's own epoll, checking whether ours is readable, polls mountinfo through it,
        # and that poll is what consumes the change (the kernel's mounts_poll): by the time this
        # runs, poll(0) may well find nothing. Readable is the event; poll(0) only drains it.
        assert self._epoll is not None
        self._epoll.poll(0)
        self._wake()

    def _wake(self) -> None:
        self.events += 1
        self.on_change()
