"""Lease renewal on a thread of its own, so that a busy event loop does not cost the lease.

The event loop plans, observes and spawns; with hundreds of groups a single pass, or a burst
of spawns, can keep it from running anything else for longer than the lease (400 ms by
default), and a renewal queued behind that work would let the lease lapse: the node demotes
itself, releases its groups, claims them again, and the burst repeats. The renewer publishes
the heartbeat and moves the lease on from a plain thread instead (backends whose `publish`
can run off the loop: `Store.blocking_publish`; the etcd store does it through a twin on an
event loop of the thread's own); the GIL hands it the interpreter within a
switch interval (5 ms) however busy the loop is.

It renews only while the loop itself is alive: the loop stamps `Agent.loop_alive_at` every
heartbeat, and after `loop_stall` seconds without a stamp the renewer stops renewing, so a
wedged agent loses its lease (and the keeper stops its processes) as a dead one would.

A lease that has already lapsed is not extended here: the loop first marks the node's claims
stale (peers may have taken them over meanwhile) and then extends it (Agent.after_lapse),
so no plan ever sees a renewed lease together with claims that outlived a lapse.

The same thread then reads the store into the agent's view (read_once); the loop is woken
only when something it plans on changed. If a read hangs, the loop notices on its own
(Agent._with_lease marks the store unreachable in the view it plans with).
"""

from __future__ import annotations

import logging
import threading
import time

from reconciler.store import Heartbeat, StoreError

log = logging.getLogger("reconciler.agent")
POST_EVERY = 0.5  # seconds: the longest the loop goes without hearing from the renewer


class Renewer:
    def __init__(self, agent, loop):
        self.agent = agent
        self.loop = loop
        self.stop_event = threading.Event()
        self.nudge = threading.Event()  # read now (set from the loop when the store changed)
        self.thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)
        t = agent.spec.cluster.timing
        self.loop_stall = max(2.0, 2 * t.lease)
        self._stalled_logged = False
        self._posted_at = 0.0
        self._read_started = 0.0  # monotonic time the last read began

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.nudge.set()
        self.thread.join(timeout=2.0)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            self.beat(read_until=next_at + self.agent.spec.cluster.timing.heartbeat)
            # A fixed cadence: a slow renewal does not push every later one back.
            next_at = max(next_at + self.agent.spec.cluster.timing.heartbeat, time.monotonic())
            # Until then, a store watch (etcd) may ask for a read at once (Agent._store_watch):
            # a released claim is then seen now rather than at the next heartbeat.
            while not self.stop_event.is_set() and self.nudge.wait(max(0.0, next_at - time.monotonic())):
                self.nudge.clear()
                if self.stop_event.is_set():
                    break
                try:
                    self.read_once()
                except Exception:
                    log.exception("store read failed")

    def beat(self, read_until: float = float("inf")) -> None:
        """One heartbeat: renew, then read, unless the renewal took so long that the next
        one is due already (an overloaded machine or store): the lease comes first. A read
        is never skipped twice within lease / 2, so the view stays fresh enough to plan
        with (the loop marks it unreachable after lease / 2 + heartbeat without a read)."""
        try:
            self.renew_once()
        except Exception:  # never let the thread die silently: the lease would lapse
            log.exception("lease renewal failed")
        now = time.monotonic()
        if now >= read_until and now - self._read_started < self.agent.spec.cluster.timing.lease / 2:
            return
        self._read_started = now
        try:
            self.read_once()
        except Exception:
            log.exception("store read failed")

    def read_once(self) -> None:
        """Read the store (and /proc/hpc) into the agent's view, here.

        The loop is woken only when the view changed in a way the planner cares about
        (Agent._apply_read), or every POST_EVERY seconds so that it proves itself alive;
        an idle node's loop then sleeps through most heartbeats. Whenever it does plan, it
        takes the latest view (Agent.view is replaced whole, never modified in place).
        """
        a = self.agent
        hpc, error = a.read_membership()
        try:
            snap = a.store.read_blocking()
        except StoreError as exc:
            snap, error = None, error or str(exc)
        changed = a._apply_read(snap, a.publish_error or error, hpc)
        now = time.monotonic()
        if changed or now - self._posted_at >= POST_EVERY:
            self._posted_at = now
            self.loop.call_soon_threadsafe(a.read_posted, changed)

    def renew_once(self) -> None:
        a = self.agent
        t = a.spec.cluster.timing
        started = time.monotonic()
        stalled = started - a.loop_alive_at
        if stalled > self.loop_stall:
            if not self._stalled_logged:
                log.error("the event loop has not run for %.1fs: not renewing the lease", stalled)
                self._stalled_logged = True
            a.publish_error = f"agent event loop stalled for {stalled:.1f}s"
            return
        self._stalled_logged = False
        a.counter += 1  # only this thread counts once it runs
        digest = a._digest_of[1] if a._digest_of is not None else ""
        hb = Heartbeat(node=a.node, counter=a.counter, digest=digest, status=a.status_doc, wall=time.time())
        try:
            a.store.publish_blocking(hb)
        except StoreError as exc:
            a.publish_error = str(exc)
            return
        a.publish_error = ""
        with a.lease_lock:
            if a.finished:
                return
            if a.lease_until < started and a.lease_until != float("-inf"):
                self.loop.call_soon_threadsafe(a.after_lapse, started)
                return
            a.lease_until = max(a.lease_until, started + t.lease)
            if not a.once:
                a.write_lease_locked()
