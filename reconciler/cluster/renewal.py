"""Lease renewal on a thread of its own, so that a busy event loop does not cost the lease.

The event loop plans, observes and spawns; with hundreds of groups a single pass, or a burst
of spawns, can keep it from running anything else for longer than the lease (400 ms by
default), and a renewal queued behind that work would let the lease lapse: the node demotes
itself, releases its groups, claims them again, and the burst repeats. The renewer publishes
the heartbeat and moves the lease on from a plain thread instead (the store's
publish_blocking; the etcd store does it through a twin on an event loop of the thread's
own); the GIL hands it the interpreter within a switch interval (5 ms) however busy the loop
is.

It renews only while the loop itself is alive: the loop stamps its Pulse after every
reconcile pass and whenever this thread posts to it (at least every post_after), and after
`loop_stall` seconds without a stamp the renewer stops renewing (decide/view.py), so a
wedged agent loses its lease (and the keeper stops its processes) as a dead one would.

A lease that has already lapsed is extended together with marking the node's claims stale
(peers may have taken them over meanwhile), both under the lease's lock (Lease.after_lapse);
the loop reads the lease and the stale claims under the same lock (Watch.planning_view), so
no plan ever sees a renewed lease together with claims that outlived a lapse. (Handing the
lapse to the loop instead would make recovery wait for a busy loop, and with 1,000 groups
the lease could lapse again before the loop got to it, over and over.)

The same thread then reads the store into the cluster watch (read_once); the loop is woken
only when something it plans on changed. If a read hangs, the loop notices on its own
(Watch.planning_view marks the store unreachable in the view it plans with).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from reconciler.cluster.instance import Instance
from reconciler.cluster.lease import Lease
from reconciler.cluster.watch import Watch
from reconciler.decide import view as rules
from reconciler.model import Heartbeat
from reconciler.published import NodeStatus
from reconciler.spec import Timing
from reconciler.store import Store, StoreError

log = logging.getLogger("reconciler.agent")
POST_AFTER = 1.5  # seconds: post to a loop that has not proved itself alive for this long


class Pulse:
    """When the event loop last proved itself alive (it stamps this after every pass and
    every post from the renewer)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.at = clock()

    def stamp(self) -> None:
        self.at = self._clock()


class Publisher:
    """Builds this node's heartbeats: the counter (only the renewer thread counts once it
    runs), the spec digest and status document the loop last made, the instance id."""

    def __init__(self, node: str, *, instance: Instance, digest: Callable[[], str], status: Callable[[], NodeStatus],
                 wall: Callable[[], float] = time.time):
        self.node = node
        self.counter = time.time_ns() // 1_000_000
        self._instance = instance
        self._digest = digest
        self._status = status
        self._wall = wall

    def heartbeat(self) -> Heartbeat:
        self.counter += 1
        return Heartbeat(node=self.node, counter=self.counter, digest=self._digest(), status=self._status(),
                         wall=self._wall(), instance=self._instance.id)


class Renewer:
    """Publishes through `publisher` to `store`, moves `lease` on, reads into `watch`; posts
    `post(changed)` to the loop, whose liveness `pulse` tells."""

    def __init__(self, *, lease: Lease, watch: Watch, instance: Instance, store: Store, publisher: Publisher,
                 pulse: Pulse, post: Callable[[bool], object], timing: Callable[[], Timing],
                 clock: Callable[[], float] = time.monotonic):
        self.lease = lease
        self.watch = watch
        self.instance = instance
        self.store = store
        self.publisher = publisher
        self.pulse = pulse
        self.post = post
        self._timing = timing
        self._clock = clock
        self.stop_event = threading.Event()
        self.nudge = Nudge()  # read now (set from the loop when the store changed)
        self.thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)
        self.loop_stall = rules.loop_stall(timing().lease)
        self.publish_error = ""  # the last publish error ("": it succeeded)
        self._stalled_logged = False
        self._posted_at = 0.0

    @property
    def post_after(self) -> float:
        """Posts that only prove the loop alive: well before loop_stall, and rarely while
        the loop's own passes (once a tick, 1 s by default) prove it."""
        return rules.post_after(self.loop_stall, POST_AFTER)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.nudge.set()
        self.thread.join(timeout=2.0)

    def _run(self) -> None:
        next_at = self._clock()
        while not self.stop_event.is_set():
            self.beat(read_until=next_at + self._timing().heartbeat)
            # A fixed cadence: a slow renewal does not push every later one back.
            next_at = max(next_at + self._timing().heartbeat, self._clock())
            self._between_beats(next_at)

    def _between_beats(self, next_at: float) -> None:
        """Sleep until the next beat is due: one wake-up per heartbeat while nothing happens
        (a wake-up is the main cost of an idle agent). Meanwhile a store watch (etcd) may ask
        for a read at once (relay_changes): a released claim is then seen now rather than at
        the next heartbeat. One such read per beat at most, and only with half a heartbeat
        to spare: never at the cost of the next renewal (a busy store's reads are slow); a
        nudge later than that is left to the beat's own read."""
        half = self._timing().heartbeat / 2
        if not self.nudge.wait(max(0.0, next_at - self._clock())) or self.stop_event.is_set():
            return
        if next_at - self._clock() >= half:
            try:
                self.read_once()
            except Exception:
                log.exception("store read failed")
        self.stop_event.wait(max(0.0, next_at - self._clock()))

    def beat(self, read_until: float = float("inf")) -> None:
        """One heartbeat: renew, then read, unless the renewal took so long that the next
        one is due already (an overloaded machine or store): the lease comes first, and
        the loop marks the view unreachable (no takeovers) while reads stay away longer
        than lease / 2 + heartbeat."""
        try:
            self.renew_once()
        except Exception:  # never let the thread die silently: the lease would lapse
            log.exception("lease renewal failed")
        if self._clock() >= read_until:
            return
        try:
            self.read_once()
        except Exception:
            log.exception("store read failed")

    def read_once(self) -> None:
        """Read the store (and /proc/hpc) into the watch, here.

        The loop is posted to only when the view changed in a way the planner cares about
        (Watch.apply_read), or when the loop has not proved itself alive for post_after
        seconds (a pass proves it, at least once a tick); an idle node's loop then sleeps
        through its heartbeats. Whenever it does plan, it takes the latest view (the watch
        replaces it whole, never modifies it in place).
        """
        hpc, error = self.watch.read_membership()
        try:
            snap = self.store.read_blocking()
        except StoreError as exc:
            snap, error = None, str(exc)  # (a membership error is in the view apart: Watch.apply_read)
        changed = self.watch.apply_read(snap, self.publish_error or error, hpc)
        now = self._clock()
        if rules.should_post(changed, now, loop_alive_at=self.pulse.at, posted_at=self._posted_at,
                             post_after=self.post_after):
            self._posted_at = now
            self.post(changed)

    def renew_once(self) -> None:
        started = self._clock()
        if rules.renewal_stopped(started, self.pulse.at, stall=self.loop_stall):
            stalled = started - self.pulse.at
            if not self._stalled_logged:
                log.error("the event loop has not run for %.1fs: not renewing the lease", stalled)
                self._stalled_logged = True
            self.publish_error = f"agent event loop stalled for {stalled:.1f}s"
            return
        self._stalled_logged = False
        if not self.instance.may_publish():  # node identity: watching this node's record, or a twin
            return
        try:
            self.store.publish_blocking(self.publisher.heartbeat())
        except StoreError as exc:
            self.publish_error = str(exc)
            return
        self.publish_error = ""
        self.instance.note_published(started)
        duration = self._timing().lease
        if rules.renewal_after_lapse(self.lease.until, started):
            # Claims marked stale and the lease extended, in one step under the lease's lock.
            if self.lease.after_lapse(started, claims=self.watch.view.claims, duration=duration):
                self.instance.lease_broken(started)
            return
        self.lease.extend(started + duration)  # only as far as the lease file says (or not if finished)


async def relay_changes(store: Store, nudge: "Nudge", *, timing: Callable[[], Timing]) -> None:
    """On the loop: a store that can tell of changes (etcd) has the renewer read at once."""
    t = timing()
    while True:
        try:
            await store.wait(t.tick)
        except StoreError:
            await asyncio.sleep(t.heartbeat)
            continue
        # The renewer reads at once; wait() returns at once until it has (a pause, so that
        # this never spins the loop while the read is on its way).
        nudge.set()
        await asyncio.sleep(0.01)


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
