"""This node's lease: until when it may run its groups, which of its claims outlived a lapse,
and the keeper's lease file that says so (leasefile.py).

Written by the renewer thread (renewal.py) and read by the event loop, so lease_until, the
stale claims and the lease file change only under `lock`, and the loop takes the lease and
the stale claims as one (`snapshot`): no plan ever sees a renewed lease together with claims
that outlived a lapse.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping

from reconciler.cluster import leasefile
from reconciler.decide import view as rules
from reconciler.host import leaserecord
from reconciler.model import Claim

log = logging.getLogger("reconciler.agent")


class Lease:
    """The lease of `node`, told to the keeper through the lease file at `path` (unless
    `keeper` is False: a one-shot run never owns the lease file, another agent may)."""

    def __init__(self, node: str, path: str, *, keeper: bool = True, clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.path = path
        self.keeper = keeper
        self.until = rules.NEVER  # this node may run its claimed groups until then (monotonic)
        self.lock = threading.Lock()  # until, the stale claims and the file: two threads write them
        self.finished = False  # released at a clean shutdown: nothing may write the file again
        self.lapsed_at_start = False  # the predecessor's lease had run out when this agent started (until the first read)
        self.file: leasefile.LeaseFile | None = None  # the keeper's lease file, once written
        self._stale: set[str] = set()  # claims that outlived a lapse of the lease
        self._clock = clock

    @property
    def file_error(self) -> str:
        """The lease file's last write error ("": none, or no file yet)."""
        return self.file.error if self.file is not None else ""

    def inherit(self) -> None:
        """A restarted agent continues its predecessor's lease, or knows that it lapsed."""
        previous = leaserecord.read_deadline(self.path)
        if previous is None:
            previous = rules.NEVER
        self.until = previous
        self.lapsed_at_start = previous <= self._clock()

    def extend(self, until: float) -> None:
        """Move the lease on to `until` (never back), but only as far as the keeper is told."""
        with self.lock:
            self._extend_locked(until)

    def extend_valid(self, until: float) -> bool:
        """The failsafe's extension (cluster/failsafe.py): move the lease on to `until` only
        while it is still valid. A lease that lapsed meanwhile is not revived by promises: its
        claims may have been taken over, and only a store renewal (after_lapse) re-arbitrates
        them. True if the lease (and the keeper's file) now reach `until`."""
        with self.lock:
            if self.finished or self.until <= self._clock():
                return False
            self._extend_locked(until)
            return self.until >= until

    def after_lapse(self, started: float, *, claims: Mapping[str, Claim], duration: float) -> bool:
        """A renewal that began at `started` succeeded after the lease had run out: mark this
        node's claims stale and extend the lease, in one step. True if it did (False: the
        lease was moved on meanwhile, or released)."""
        mine = rules.my_claims(claims, self.node)
        with self.lock:
            if self.finished or self.until >= started:
                return False
            if mine:
                log.warning("lease lapsed for %.2fs: re-arbitrating %s", started - self.until, ", ".join(sorted(mine)))
            self._stale = set(rules.stale_after_lapse(self._stale, claims, node=self.node))
            self._extend_locked(started + duration)
        return True

    def note_read(self, claims: Mapping[str, Claim]) -> None:
        """A read found `claims`: those of this node's that it cannot prove its own are stale
        (decide/view.py: stale_at_read; the first read after a lapsed start clears the flag)."""
        with self.lock:
            stale = rules.stale_at_read(self._stale, claims, node=self.node, lease_until=self.until, now=self._clock(),
                                        lapsed_at_start=self.lapsed_at_start)
            if stale != self._stale:
                self._stale = set(stale)
            self.lapsed_at_start = False

    def discard_stale(self, group: str) -> None:
        """The group's claim was won (or ended) since: it is no longer stale."""
        with self.lock:
            self._stale.discard(group)

    def stale(self) -> frozenset[str]:
        """The stale claims as they stand (for a read's view; plans take `snapshot`)."""
        return frozenset(self._stale)

    def snapshot(self, claims: Mapping[str, Claim]) -> tuple[float, frozenset[str]]:
        """(lease_until, the stale claims still this node's in `claims`), as one."""
        with self.lock:
            if self._stale:
                self._stale = set(rules.stale_still_mine(self._stale, claims, node=self.node))
            return self.until, frozenset(self._stale)

    def release(self) -> None:
        """A clean shutdown's last word to the keeper: the "released" record (it then exits
        once nothing of this node is alive), the descriptor closed, and no renewal after it.
        Called with everything stopped."""
        with self.lock:
            if self.keeper:  # (a one-shot run never owned the lease file)
                if not self._write_locked(leaserecord.RELEASED):
                    log.error("the keeper was not told of the clean shutdown: it keeps watch over nothing")
                if self.file is not None:
                    self.file.close()
            self.finished = True

    def follow(self, margin: float, wake: Callable[[], None]) -> LeaseTimer:
        """A timer on the running loop that calls `wake` once until - margin has passed
        without a renewal moving it on; each renewal in the meantime only re-arms the timer."""
        loop = asyncio.get_running_loop()
        timer = LeaseTimer()

        def check() -> None:
            deadline = self.until - margin  # (loop.time() is time.monotonic(), the lease's clock)
            if loop.time() >= deadline:
                wake()
            else:
                timer.handle = loop.call_at(deadline, check)

        timer.handle = loop.call_at(self.until - margin, check)
        return timer

    def _extend_locked(self, until: float) -> None:
        # The keeper acts on the lease file, so a renewal the file does not show is no
        # renewal (the agent then demotes by the deadline the keeper enforces).
        until = max(self.until, until)
        if self.finished or until == self.until:
            return
        if not self.keeper or self._write_locked(until):
            self.until = until

    def _write_locked(self, until: float) -> bool:
        """Tell the keeper `until` (leaserecord.RELEASED: the clean-shutdown record); True
        once the file at the path says so (leasefile.py)."""
        if self.file is None:
            self.file = leasefile.LeaseFile(self.path)
        return self.file.write(until, lease_until=self.until)


class LeaseTimer:
    """The loop's current timer of Lease.follow."""

    handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
