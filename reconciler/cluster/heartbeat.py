"""This node's heartbeat, its lease, and the cluster view it reads: the part of the agent
that talks to the store every heartbeat (a mixin of agent.Agent).

Two ways to run it: with a backend that can publish from any thread (`blocking_publish`:
both stores), a renewer thread publishes, moves the lease on and reads
(reconciler/renewal.py); otherwise the event loop does (`_heartbeat_loop`). Either way the
view the planner uses is replaced whole, never modified in place, and the lease file the
keeper watches is written under `lease_lock`.

(Slightly over ~400 lines: lease, view and the node-identity bookkeeping of the mixin;
issue 13 turns the mixin into components of their own. The lease file is leasefile.py.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid

import attrs

from reconciler.decide import identity
from reconciler.cluster import leasefile
from reconciler.act import logs
from reconciler.store import ClusterView, StoreError, records
from reconciler.cluster import hpc as hpcmod
from reconciler.host import leaserecord

log = logging.getLogger("reconciler.agent")
KEEPER_CHECK_EVERY = 1.0  # seconds: how often the loop makes sure the keeper runs


class Heartbeating:
    """Lease, heartbeat and view methods of Agent (its attributes are set in Agent.__init__)."""

    lease_file: "leasefile.LeaseFile | None" = None  # the keeper's lease file, once written
    _logs_rotated_at = float("-inf")  # the last look at the entry logs' sizes
    log_rotator: "logs.Rotator | None" = None  # entry log rotation (its policy from the environment)

    def _inherit_lease(self) -> None:
        """A restarted agent continues its predecessor's lease, or knows that it lapsed."""
        previous = leaserecord.read_deadline(str(self.node_dir / "lease"))
        if previous is None:
            previous = float("-inf")
        self.lease_until = previous
        self.lapsed_at_start = previous <= time.monotonic()

    def extend_lease_locked(self, until: float) -> None:
        """Move lease_until on to `until` (never back), but only as far as the keeper is
        told: the keeper acts on the lease file, so a renewal the file does not show is no
        renewal (the agent then demotes by the deadline the keeper enforces). The caller
        holds lease_lock."""
        until = max(self.lease_until, until)
        if self.finished or until == self.lease_until:
            return
        if self.once or self.write_lease_locked(until):
            self.lease_until = until

    def write_lease_locked(self, until: float) -> bool:
        """Tell the keeper `until` (leaserecord.RELEASED: the clean-shutdown record); True once the
        file at STATE/NODE/lease says so (reconciler/leasefile.py). The caller holds lease_lock."""
        if self.lease_file is None:
            self.lease_file = leasefile.LeaseFile(os.path.join(self.node_dir, "lease"))
        return self.lease_file.write(until, lease_until=self.lease_until)

    def release_lease_locked(self) -> None:
        """A clean shutdown's last word to the keeper: the "released" record (it then exits
        once nothing of this node is alive), and the descriptor closed. The caller holds
        lease_lock, with everything stopped."""
        if self.once:
            return  # a one-shot run never owned the lease file (another agent may)
        if not self.write_lease_locked(leaserecord.RELEASED):
            log.error("the keeper was not told of the clean shutdown: it keeps watch over nothing")
        if self.lease_file is not None:
            self.lease_file.close()

    def after_lapse(self, started: float) -> None:
        """A renewal that began at `started` succeeded after the lease had run out: mark this
        node's claims stale and extend the lease, in one step under lease_lock (called from
        the renewer thread, or from the loop without one)."""
        mine = {g for g, c in self.view.claims.items() if c.node == self.node}
        with self.lease_lock:
            if self.finished or self.lease_until >= started:
                return
            if mine:
                log.warning("lease lapsed for %.2fs: re-arbitrating %s", started - self.lease_until, ", ".join(sorted(mine)))
            self.stale |= mine
            self.continuous_since = started  # (identity: the lease was broken)
            self.extend_lease_locked(started + self.spec.cluster.timing.lease)

    def _with_lease(self, view: ClusterView) -> ClusterView:
        """The view to plan with: this node's current lease and stale claims, and (renewer
        mode) the store marked unreachable if no read has come back for too long."""
        import attrs

        with self.lease_lock:  # the lease and the stale claims as one (see after_lapse)
            if self.stale:
                self.stale &= {g for g, c in view.claims.items() if c.node == self.node}
            lease_until, stale = self.lease_until, frozenset(self.stale)
        changes = {}
        if self.renewer is not None:
            t = self.spec.cluster.timing
            overdue = time.monotonic() - self._read_at
            if overdue > t.lease / 2 + t.heartbeat and view.store_ok:
                # The renewer is stuck in a read (a hung store): never plan with a view this old.
                changes = {"store_ok": False, "store_error": f"{self.store.url}: no answer for {overdue:.1f}s"}
        return attrs.evolve(view, lease_until=lease_until, stale_claims=stale, **changes)

    def _follow_lease(self, margin: float) -> "LeaseTimer":
        """A timer on the loop that wakes it once lease_until - margin has passed without a
        renewal moving it on; each renewal in the meantime only re-arms the timer."""
        loop = asyncio.get_running_loop()
        timer = LeaseTimer()

        def check() -> None:
            deadline = self.lease_until - margin  # (loop.time() is time.monotonic(), the lease's clock)
            if loop.time() >= deadline:
                self.wake()
            else:
                timer.handle = loop.call_at(deadline, check)

        timer.handle = loop.call_at(self.lease_until - margin, check)
        return timer

    async def _heartbeat_loop(self) -> None:
        """Publish and read from the event loop (backends without blocking_publish: etcd)."""
        t = self.spec.cluster.timing
        while True:
            started = time.monotonic()
            self.store_changed.clear()
            await self._heartbeat_once()
            self.store_read.set()
            self._loop_beat()
            # A store watch (etcd) cuts the wait short, so a released claim or an expired
            # lease is read at once rather than at the next heartbeat.
            try:
                async with asyncio.timeout(max(0.0, t.heartbeat - (time.monotonic() - started))):
                    await self.store_changed.wait()
            except TimeoutError:
                pass

    def _loop_beat(self) -> None:
        """On the loop, after every pass and whenever the renewer posts (at least every
        Renewer.post_after): proof that the loop runs (for the renewer and systemd's
        watchdog), and a look at the keeper now and then."""
        self.loop_alive_at = time.monotonic()
        if self.notify and self.notified_ready:  # (systemd wants READY=1 first)
            self.notify.watchdog()
        self._ensure_keeper_cheap()
        self._rotate_logs_cheap()

    def read_posted(self, changed: bool) -> None:
        """From the renewer thread: the view changed (plan again), or just a beat that
        proves the loop alive (when no pass has for a while)."""
        self._loop_beat()
        if changed:
            self.wake()

    async def _store_watch(self) -> None:
        t = self.spec.cluster.timing
        while True:
            try:
                await self.store.wait(t.tick)
            except StoreError:
                await asyncio.sleep(t.heartbeat)
                continue
            if self.renewer is not None:
                # The renewer reads at once; wait() returns at once until it has (a pause,
                # so that this never spins the loop while the read is on its way).
                self.renewer.nudge.set()
                await asyncio.sleep(0.01)
                continue
            # wait() returns at once until the change has been read (etcd), so wait for the
            # heartbeat loop's next read before waiting again: never spin the event loop.
            self.store_read.clear()
            self.store_changed.set()
            await self.store_read.wait()

    def _ensure_keeper_cheap(self) -> None:
        """_ensure_keeper about once a second: it reads a file and /proc."""
        now = time.monotonic()
        if now - self._keeper_checked_at >= KEEPER_CHECK_EVERY:
            self._keeper_checked_at = now
            self._ensure_keeper()

    def _rotate_logs_cheap(self) -> None:
        """Rotate the entry logs that are due, at most once a tick (reconciler/act/logs.py):
        a chatty entry must not fill the state directory, which holds the lease file."""
        now = time.monotonic()
        if self.once or now - self._logs_rotated_at < self.spec.cluster.timing.tick:
            return
        self._logs_rotated_at = now
        if self.log_rotator is None:
            self.log_rotator = logs.Rotator(self.supervisor.logs, logs.Policy.from_env())
        self.log_rotator.look()

    async def _heartbeat_once(self) -> None:
        """Publish, then read the store into the view, from the loop (at start-up, and
        always for backends without blocking_publish)."""
        from reconciler.store import Heartbeat

        t = self.spec.cluster.timing
        started = time.monotonic()
        try:
            if not self.may_publish():
                raise _NotPublishing
            self.counter += 1
            hb = Heartbeat(node=self.node, counter=self.counter, digest=self._digest(self.spec), status=self.status_doc,
                           wall=time.time(), instance=self.instance)
            await asyncio.wait_for(self.store.publish(hb), t.lease / 2)
            self.note_published(started)
            if self.lease_until < started and self.lease_until != float("-inf"):
                self.after_lapse(started)
            else:
                with self.lease_lock:
                    self.extend_lease_locked(started + t.lease)
            error = ""
        except _NotPublishing:
            error = ""
        except (StoreError, TimeoutError) as exc:
            error = str(exc) or f"{self.store.url}: no answer within {t.lease / 2:g}s"
        hpc, hpc_error = self.read_membership()
        error = error or hpc_error
        try:
            async with asyncio.timeout(t.lease / 2):
                snap = await self.store.read()
        except (StoreError, TimeoutError) as exc:
            error = error or str(exc) or f"{self.store.url}: no answer"
            snap = None
        self._apply_read(snap, error, hpc)

    def read_membership(self):
        """(the /proc/hpc view, "") or (None, why not); (None, "") without hpc membership."""
        if not self.spec.cluster.membership.startswith("hpc:"):
            return None, ""
        try:
            return hpcmod.read(self.spec.path(self.spec.cluster.membership[4:])), ""
        except hpcmod.MembershipError as exc:
            return None, str(exc)

    def _apply_read(self, snap, error: str, hpc) -> bool:
        """Take a read into the view; True if the planner should look at it (then also
        woken, when called on the loop). The renewer thread calls it too: it only ever
        replaces self.view, and wakes the loop through call_soon_threadsafe."""
        t = self.spec.cluster.timing
        if snap is None:
            self.view = _evolve(self.view, store_ok=False, store_error=error)
            self._fingerprint = None
            return self._woken()
        now = time.monotonic()
        view = self.liveness.update(
            snap, now, groups=list(self.spec.groups), lease_until=self.lease_until, hpc=hpc,
            stale_claims=frozenset(self.stale), store_ok=not error, store_error=error,
        )
        if hpc is not None and hpc.me != self.node:
            view = _evolve(view, quorum=False, store_error=f"node name {self.node} is not this node's hpc id {hpc.me}")
        verdict = self._identity_read(snap, now)
        if verdict.twin or not verdict.claim or snap.skipped:
            view = _evolve(view, twin=verdict.twin, may_run=verdict.run, may_claim=verdict.claim, skipped=snap.skipped)
        self.view = view
        if not error:
            self._read_at = now
        fp = _fingerprint(view, now, t.dead_after)
        # Kept even when equal: the next comparison then meets the objects this read
        # handed out (the same ones while nothing changes) and stops at identity checks.
        last, self._fingerprint = self._fingerprint, fp
        if fp != last:
            return self._woken()
        return False

    def _woken(self) -> bool:
        if threading.current_thread() is self._loop_thread:  # (the renewer wakes it by posting)
            self.wake()
        return True

    def set_claim(self, group: str, claim) -> None:
        """The executor won (or lost) a claim: show it in the view before the next read."""
        claims = dict(self.view.claims)
        if claim is None:
            claims.pop(group, None)
        else:
            claims[group] = claim
        self.view = _evolve(self.view, claims=claims)
        with self.lease_lock:
            self.stale.discard(group)

    # --- node identity: this agent's instance id and what it saw of its own node record,
    # the observations identity.decide judges. Called from the renewer thread (before each
    # publish and after each read) and from the loop; attributes are replaced whole.

    def _identity_init(self) -> None:
        self.instance = uuid.uuid4().hex[:16]  # published with every heartbeat
        self.predecessor = ""  # the instance id the last agent of this state directory recorded
        self.watch_from = time.monotonic()
        self.watch_until: float | None = None  # set at the first read (identity.watch_until)
        self.foreign: identity.Foreign | None = None
        self.published_at: float | None = None  # the first successful publish of this instance
        self.continuous_since: float | None = None
        self.verdict = identity.Verdict("watch", publish=False, claim=False, run=True, twin="")
        self._twin_logged: str | None = None  # the other instance the last log line was about

    def _identity_start(self) -> None:
        """Under the node's lock: read the predecessor's instance id, record ours."""
        path = os.path.join(self.node_dir, "instance")
        try:
            with open(path, "rb") as fh:
                text = fh.read(64).decode("ascii", "replace").strip()
            self.predecessor = text if records.INSTANCE_RE.match(text) else ""
        except OSError:
            self.predecessor = ""
        try:
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(self.instance + "\n")
            os.replace(tmp, path)
        except OSError as exc:  # the next agent then watches before it publishes: slower, not unsafe
            log.warning("cannot record this agent's instance id in %s: %s", path, exc.strerror or exc)
        self.watch_from = time.monotonic()

    def identity_verdict(self, now: float) -> identity.Verdict:
        """identity.decide on what has been seen so far; logs every change of state."""
        t = self.spec.cluster.timing
        obs = identity.Observations(
            instance=self.instance,
            watch_until=float("inf") if self.watch_until is None else self.watch_until,
            published_at=self.published_at,
            continuous_since=self.continuous_since if self.lease_until > now else None,
            yielded=self.verdict.state == "yield",
            foreign=self.foreign,
        )
        verdict = identity.decide(obs, now, dead_after=t.dead_after, heartbeat=t.heartbeat)
        last, self.verdict = self.verdict, verdict
        who = self.foreign.instance if self.foreign is not None else None
        # Logged when the state or the other agent changes (the text carries ages: not each time).
        if verdict.state != last.state or bool(verdict.twin) != bool(last.twin) or who != self._twin_logged:
            self._twin_logged = who
            if verdict.twin:
                log.warning("node name %s: %s", self.node, verdict.twin)
            elif last.state in ("yield", "incumbent"):
                log.warning("node name %s: the other agent under this name is gone: claiming again", self.node)
            elif last.state == "watch" and self.published_at is None:
                log.info("no other agent publishes as %s: publishing (instance %s)", self.node, self.instance)
        return verdict

    def may_publish(self) -> bool:
        """Before each publish (renewer thread or loop): may this instance publish now?"""
        if self.verdict.state == "ok" and self.foreign is None:
            return True  # the usual case, ten times a second: nothing to judge
        return self.identity_verdict(time.monotonic()).publish

    def note_published(self, started: float) -> None:
        """A publish that began at `started` succeeded."""
        if self.published_at is None or self.continuous_since is None:
            self.continuous_since = started
        if self.published_at is None:
            self.published_at = started
            # The lease file exists from now on: the loop's next beat starts the keeper
            # (one started before it, at start-up, found none and exited).
            self._keeper_checked_at = float("-inf")

    def _identity_read(self, snap, now: float) -> identity.Verdict:
        """Fold this node's own record (and the one the last publish replaced) into what is
        known of other writers under this name, then judge."""
        own = snap.members.get(self.node)
        if (self.foreign is None and self.verdict.state == "ok" and not snap.displaced
                and (own is None or own.instance == self.instance)):
            return self.verdict  # the usual case: only this agent writes its record
        t = self.spec.cluster.timing
        if self.watch_until is None:
            self.watch_until = identity.watch_until(self.watch_from, own, self.predecessor, dead_after=t.dead_after,
                                                    heartbeat=t.heartbeat)
        foreign = self.foreign
        for record in (snap.displaced.get(self.node), own):
            foreign = identity.observe(foreign, record, me=self.instance, predecessor=self.predecessor, now=now,
                                       published=self.published_at is not None)
        self.foreign = foreign
        return self.identity_verdict(now)


class LeaseTimer:
    """The loop's current timer of Heartbeating._follow_lease."""

    handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def _fingerprint(view: ClusterView, now: float, dead_after: float) -> object:
    """What, in a fresh view, should wake a reconcile when it differs from the last one.

    Compared with ==, which is cheap when nothing changed: a store hands back the very same
    claim and status objects while they are unchanged, and == on equal-by-identity values
    stops at the identity check (this runs on every heartbeat).
    """
    alive = frozenset(n for n in view.members if view.alive(n, now, dead_after))
    eligible = {n: m.heartbeat.status.eligible_groups for n, m in view.members.items() if m.heartbeat is not None}
    return (alive, eligible, view.claims, view.store_ok, view.quorum, view.twin, view.may_claim, view.may_run)


class _NotPublishing(Exception):
    """identity: this instance must not publish now (watching its record, or a twin)."""


def _evolve(view: ClusterView, **changes) -> ClusterView:
    return attrs.evolve(view, **changes)
