"""Lease renewal on a thread of its own, so that a busy event loop does not cost the lease.

The event loop plans, observes and spawns; with hundreds of groups a single pass, or a burst
of spawns, can keep it from running anything else for longer than the lease (400 ms by
default), and a renewal queued behind that work would let the lease lapse: the node demotes
itself, releases its groups, claims them again, and the burst repeats. The renewer publishes
the heartbeat and moves the lease on from a plain thread instead (backends whose `publish`
can run off the loop: `Store.blocking_publish`; the etcd store does it through a twin on an
event loop of the thread's own); the GIL hands it the interpreter within a
switch interval (5 ms) however busy the loop is.

It renews only while the loop itself is alive: the loop stamps `Agent.loop_alive_at` after
every reconcile pass and whenever this thread posts to it (at least every post_after), and
after `loop_stall` seconds without a stamp the renewer stops renewing, so a wedged agent
loses its lease (and the keeper stops its processes) as a dead one would.

A lease that has already lapsed is extended together with marking the node's claims stale
(peers may have taken them over meanwhile), both under `lease_lock` (Agent.after_lapse); the
loop reads the lease and the stale claims under the same lock (Agent._with_lease), so no plan
ever sees a renewed lease together with claims that outlived a lapse. (Handing the lapse to
the loop instead would make recovery wait for a busy loop, and with 1,000 groups the lease
could lapse again before the loop got to it, over and over.)

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
POST_AFTER = 1.5  # seconds: post to a loop that has not proved itself alive for this long


class Renewer:
    def __init__(self, agent, loop):
        self.agent = agent
        self.loop = loop
        self.stop_event = threading.Event()
        self.nudge = Nudge()  # read now (set from the loop when the store changed)
        self.thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)
        t = agent.spec.cluster.timing
        self.loop_stall = max(2.0, 2 * t.lease)
        self._stalled_logged = False
        self._posted_at = 0.0

    @property
    def post_after(self) -> float:
        """Posts that only prove the loop alive: well before loop_stall, and rarely while
        the loop's own passes (once a tick, 1 s by default) prove it."""
        return min(POST_AFTER, 0.75 * self.loop_stall)

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
            self._between_beats(next_at)

    def _between_beats(self, next_at: float) -> None:
        """Sleep until the next beat is due: one wake-up per heartbeat while nothing happens
        (a wake-up is the main cost of an idle agent). Meanwhile a store watch (etcd) may ask
        for a read at once (Agent._store_watch): a released claim is then seen now rather
        than at the next heartbeat. One such read per beat at most, and only with half a
        heartbeat to spare: never at the cost of the next renewal (a busy store's reads are
        slow); a nudge later than that is left to the beat's own read."""
        half = self.agent.spec.cluster.timing.heartbeat / 2
        if not self.nudge.wait(max(0.0, next_at - time.monotonic())) or self.stop_event.is_set():
            return
        if next_at - time.monotonic() >= half:
            try:
                self.read_once()
            except Exception:
                log.exception("store read failed")
        self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def beat(self, read_until: float = float("inf")) -> None:
        """One heartbeat: renew, then read, unless the renewal took so long that the next
        one is due already (an overloaded machine or store): the lease comes first, and
        the loop marks the view unreachable (no takeovers) while reads stay away longer
        than lease / 2 + heartbeat."""
        try:
            self.renew_once()
        except Exception:  # never let the thread die silently: the lease would lapse
            log.exception("lease renewal failed")
        if time.monotonic() >= read_until:
            return
        try:
            self.read_once()
        except Exception:
            log.exception("store read failed")

    def read_once(self) -> None:
        """Read the store (and /proc/hpc) into the agent's view, here.

        The loop is woken only when the view changed in a way the planner cares about
        (Agent._apply_read), or when the loop has not proved itself alive for post_after
        seconds (a pass proves it, at least once a tick); an idle node's loop then sleeps
        through its heartbeats. Whenever it does plan, it
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
        # Unchanged: post only if the loop has not proved itself alive for a while (every
        # pass does, at least once a tick), so that an idle loop is not woken for nothing.
        if changed or (now - a.loop_alive_at >= self.post_after and now - self._posted_at >= self.post_after / 2):
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
        if not a.may_publish():  # node identity: watching this node's record, or a twin
            return
        a.counter += 1  # only this thread counts once it runs
        digest = a._digest_of[1] if a._digest_of is not None else ""
        hb = Heartbeat(node=a.node, counter=a.counter, digest=digest, status=a.status_doc, wall=time.time(),
                       instance=a.instance)
        try:
            a.store.publish_blocking(hb)
        except StoreError as exc:
            a.publish_error = str(exc)
            return
        a.publish_error = ""
        a.note_published(started)
        if a.lease_until < started and a.lease_until != float("-inf"):
            a.after_lapse(started)  # claims marked stale and the lease extended, under lease_lock
            return
        with a.lease_lock:
            a.extend_lease_locked(started + t.lease)  # only as far as the lease file says (or none if finished)


class Nudge:
    """A flag one thread sets and another waits for and clears in one step: like
    threading.Event, but one lock and no Condition per wait (about 50 us less CPU per
    wake-up here, at ten wake-ups a second on an idle node)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held: not set

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass  # set already

    def wait(self, timeout: float) -> bool:
        """True (and cleared again) once set, False after `timeout` seconds."""
        return self._lock.acquire(timeout=timeout)
