"""The agent: one asyncio loop per node that keeps reality equal to the spec.

Child exits, store changes, spec edits and a periodic tick all set one wake event; every
wake runs the same level-triggered reconcile (observe -> plan -> execute -> publish), so
nothing depends on having seen a particular event. The renewer (reconciler/cluster/renewal.py,
on a thread of its own) publishes the heartbeat, renews this node's lease and the keeper's
deadline (cluster/lease.py) and reads the store into the cluster watch (cluster/watch.py);
`plan` alone decides what that means for the groups.

(About 500 lines: start-up order (lock, store, adoption, lease, first beat, keeper),
the pass and the shutdown are the loop's own, and it wires the failsafe, the history and the
operator's intents into them; the parts it composes live in cluster/, act/ and agent/upkeep.py,
agent/narrator.py, agent/events.py.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path

import attrs

from reconciler import __version__, published
from reconciler import spec as specmod
from reconciler.host import cgroups
from reconciler.cluster import instance as instancemod
from reconciler.cluster.instance import AlreadyRunning, identity_lock  # noqa: F401 (agent.AlreadyRunning: the CLI's)
from reconciler.cluster import lease as leasemod
from reconciler.cluster import watch as watchmod
from reconciler.spec import loader
from reconciler.observe.observer import Observer
from reconciler.decide import intents
from reconciler.decide import plan as planmod
from reconciler.cluster import renewal
from reconciler.spec import watch as specwatch
from reconciler.agent import status as statusmod
from reconciler.act import executor as executormod
from reconciler.act import process, resources
from reconciler.act.book import ResourceBook
from reconciler.act.exemptions import Exemptions
from reconciler.act.ledger import Ledger
from reconciler.observe.events import KernelEvents
from reconciler.observe.probes import Prober
from reconciler.agent.events import History
from reconciler.agent.metrics import Metrics
from reconciler.agent.narrator import Narrator
from reconciler.agent.specsync import SpecSync
from reconciler.agent.upkeep import Upkeep
from reconciler.store import ClusterView, Store, StoreError, StoreRefused
from reconciler.cluster import survey
from reconciler.cluster import failsafe as failsafemod
from reconciler.cluster.peer import PeerError  # noqa: F401 (agent.PeerError: the CLI's)
import contextlib

log = logging.getLogger("reconciler.agent")
PACE_MAX = 0.05  # the longest pause between two reconcile passes (see Agent._wait_until_due)


class StateUnwritable(Exception):
    """The node's state directory cannot take what an agent must record before it runs
    anything (one line, for the CLI: the service manager restarts the agent later)."""


class Agent:
    def __init__(
        self, spec_path: str, node: str, *, once: bool = False, metrics: Metrics | None = None, notify=None, early_signals=None,
        node_file: str | None = None,
    ):
        self.early_signals = early_signals if early_signals is not None else []
        self.spec_path = spec_path
        self.node = node
        self.once = once
        self.metrics = metrics or Metrics(node)
        self.notify = notify
        self._spec_files = specwatch.fingerprint(spec_path, node_file)  # (before the load: an edit during it is seen)
        self._spec_checked_at = time.monotonic()
        self.node_file = node_file
        # The local files until the cluster spec is read from the store (agent/specsync.py);
        # the node's local settings (store, state_dir, ...) come from them for good.
        self.spec: specmod.Spec = loader.load(spec_path, node_file=node_file)  # SpecError: the caller reports it
        self.local = loader.local_settings(spec_path, node_file=node_file)
        self.specsync: SpecSync  # built in run(), with the store
        self._sync_task: asyncio.Task | None = None
        self._sync_head = -1  # the store revision number the last sync step was started for
        self._sync_retry_at = 0.0
        self._spec_error_seen = ""  # the sync's error the metrics last counted
        self.wake_event = asyncio.Event()
        self.watch_stop = threading.Event()
        self._watched: tuple[tuple[str, ...], frozenset[str]] | None = None  # _start_spec_watch's roots and names
        self.reload = False
        self.stopping = False
        self.busy: dict[str, asyncio.Task] = {}
        # This node's part of the cluster (reconciler/cluster/): the lease, its identity under
        # the node name, the heartbeats it publishes; the watch and the renewer join in run().
        self.node_dir = Path(self.spec.state_dir) / node
        self.lease = leasemod.Lease(node, str(self.node_dir / "lease"), keeper=not once)
        self.instance = instancemod.Instance(node, str(self.node_dir / "instance"), lease=self.lease,
                                             timing=self._timing, on_first_publish=self._keeper_due)
        self.pulse = renewal.Pulse()  # the loop stamps it every beat (see renewal)
        self.publisher = renewal.Publisher(node, instance=self.instance, digest=self._published_digest,
                                           status=lambda: self.status_doc)
        self.watch: watchmod.Watch  # (these three: built in run())
        self.renewer: renewal.Renewer
        self.upkeep: Upkeep
        self.failsafe: failsafemod.Failsafe | None = None  # issue 17: peers' promises during a store outage
        self._takeovers: dict[str, str] = {}  # group -> the owner a dispatched takeover breaks (the failsafe's)
        self.last_plan = planmod.Plan()
        self.status_doc = published.EMPTY  # what the heartbeat publishes (agent/status.py)
        self._digest_of: tuple[specmod.Spec, str] | None = None  # (spec, spec.digest()): see _digest
        self._planned_lease = float("-inf")  # the lease_until the last plan was made with
        self._last_pass = 0.0  # seconds the last reconcile pass took
        # What changed between two planning views, in the log; the summary, to systemd.
        self.narrator = Narrator(node, dead_after=lambda: self._timing().dead_after,
                                 send_status=notify.status if notify else None)
        self.metrics.spec_loaded(self.spec, ok=True)

    # --- setup --------------------------------------------------------------------------

    def _build(self) -> None:
        self.store = survey.open_spec_store(self.spec)
        self.watch = watchmod.Watch(self.node, spec=lambda: self.spec, store_url=self.store.url, lease=self.lease,
                                    instance=self.instance)
        # (read_at only moves on a read whose heartbeat publish before it succeeded too)
        self.metrics.follow_store(round_trip_at=lambda: self.watch.read_at, lease_until=lambda: self.lease.until)
        # Health (issue 16): each group's failures here (kept in STATE/NODE/health.json) and the probes.
        self.ledger = Ledger(path=None if self.once else self.node_dir / "health.json", on_failure=self.metrics.failure)
        self.prober = Prober(node=self.node, on_change=self.wake, measured=self.metrics.probed)
        self.supervisor = process.Supervisor(node=self.node, state_dir=self.spec.state_dir, on_change=self.wake,
                                             on_failure=self.ledger.record,
                                             on_backoff=lambda g, t, why: self.history.record("backoff", g, f"{t}: {why}"))
        self.book = ResourceBook(node=self.node, resource_file=None if self.once else self.node_dir / "resources.json")
        self.exemptions = Exemptions(None if self.once else self.node_dir / "maintenance.json")
        # The executor's events are metrics', except that a claim won or ended goes straight to
        # the cluster watch (the view shows it before the next read).
        events = attrs.evolve(self.metrics.executor_events(supervisor=self.supervisor), claimed=self.watch.set_claim,
                              forgotten=self.watch.drop_intent)
        # The cluster's history (agent/events.py): told by the executor's results, appended by a task of its own.
        self.history = History(self.node, on_appended=self.metrics.events_appended, on_dropped=self.metrics.events_dropped)
        events = self.history.wrap(events)
        self.executor = executormod.Executor(
            node=self.node, supervisor=self.supervisor, store=self.store, resources=resources, book=self.book, events=events,
            ledger=self.ledger,
        )
        self.observer = Observer(
            node=self.node, supervisor=self.supervisor, book=self.book, read_kernel=resources.observe,
            spec=lambda: self.spec, claimed=lambda: (g for g, c in self.watch.view.claims.items() if c.node == self.node),
            busy=lambda: self.busy, blocked=lambda: self.executor.blocked, prober=self.prober, ledger=self.ledger,
        )


    def wake(self) -> None:
        self.wake_event.set()

    @property
    def view(self) -> ClusterView:
        """The cluster view as last read (the watch's)."""
        return self.watch.view

    def _timing(self) -> specmod.Timing:
        return self.spec.cluster.timing

    def _published_digest(self) -> str:
        """The digest the heartbeat carries: the last one a pass computed ("" before that)."""
        return self._digest_of[1] if self._digest_of is not None else ""

    def _keeper_due(self) -> None:
        self.upkeep.keeper_due()  # (the first publish comes after run() built it)

    def read_posted(self, changed: bool) -> None:
        """From the renewer thread: the view changed (plan again), or just a beat that
        proves the loop alive (when no pass has for a while)."""
        self.upkeep.beat()
        if changed:
            self.wake()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # The lock first: a second agent under this name must touch nothing (state, cgroups).
        self.node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = identity_lock(self.node, self.node_dir / "agent.lock")  # one agent per node name here
        self._build()
        self.upkeep = Upkeep(self.node_dir, once=self.once, pulse=self.pulse, logs_dir=self.supervisor.logs,
                             tick=lambda: self._timing().tick, notify=self.notify)
        self.instance.start()
        try:
            await self.store.setup()  # the only call that creates the store's layout
        except StoreRefused:
            raise
        except StoreError as exc:
            log.warning("store setup: %s (publishing waits for it)", exc)
        # (After the checks that refuse to start: their one line says why on its own.)
        log.info("reconciler %s starting: node %s, store %s, spec %s (digest %s)", __version__, self.node,
                 self.spec.shown_store_url, self.spec_path, self._digest(self.spec))
        sup = self.supervisor
        log.info("processes tracked by %s", f"cgroups under {sup.tree.root}" if sup.tree else f"the table and environment markers: {sup.cgroup_note}")
        if sup.tree and not cgroups.favors_dynmods():
            log.info("cgroup2 is mounted without favordynmods: each start and respawn waits ~10-20 ms for the kernel"
                     " to move the process into its cgroup (docs/operations.md, 'Processes and cgroups')")
        try:  # the keeper's hand-over needs it (keeper.py): no agent may run without it
            (self.node_dir / "agent.pid").write_text(f"{os.getpid()} {process.start_ticks(os.getpid())}\n")
        except OSError as exc:
            raise StateUnwritable(f"{self.node_dir / 'agent.pid'}: {exc.strerror or exc} (the state directory"
                                  " must be writable; the keeper stops what ran here meanwhile)") from None
        self.supervisor.attach(loop)
        self.kernel_events = KernelEvents(on_change=self.wake)  # an address or mount changed: look at once
        self.kernel_events.start(loop)
        self.lease.inherit()
        adopted = self.supervisor.adopt()
        for rec in adopted:
            log.info("adopted %s/%s pid %s", rec.group, rec.tag, rec.pid)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if self.early_signals:
            self.request_stop()  # a stop asked for while starting up
        # The renewer publishes and reads, on its thread (its first beat: here, at once).
        self.renewer = renewal.Renewer(
            lease=self.lease, watch=self.watch, instance=self.instance, store=self.store, publisher=self.publisher,
            pulse=self.pulse, post=lambda changed: loop.call_soon_threadsafe(self.read_posted, changed),
            timing=self._timing,
        )
        c = self.spec.cluster
        if c.peer_listen and c.peer_secret_file and not self.once:
            self.failsafe = failsafemod.build(
                self.node, cluster_listen=c.peer_listen, advertise=c.peer_advertise, secret_file=self.spec.path(c.peer_secret_file),
                node_dir=str(self.node_dir), lease=self.lease, watch=self.watch, instance=self.instance, timing=self._timing,
                records_expire=self.store.records_expire, loop_alive_at=lambda: self.pulse.at,
                tell=self.notify.status if self.notify else lambda line: None)
            self.metrics.follow_failsafe(self.failsafe.counters)
            self.failsafe.start()
            log.info("failsafe on: peer endpoint %s (advertised as %s)", c.peer_listen, self.failsafe.advertise)
        await asyncio.to_thread(self.renewer.beat)
        self.specsync = SpecSync(spec_path=self.spec_path, node_file=self.node_file, node=self.node, store=self.store,
                                 node_dir=self.node_dir, local=self.local, running=lambda: self.spec,
                                 published=lambda rev: self.history.record("spec-revision", "", f"revision {rev.number} published: {rev.summary}"))
        if self.view.store_ok:
            # Before the first pass: a node whose files are older than the cluster's spec
            # must not plan with them, not even once.
            self._sync_head = self.view.spec_revision
            self._adopt(await self.specsync.step(self._sync_head))
        self.upkeep.start_keeper()
        tasks = [asyncio.create_task(self.history.run(self.store), name="history")]
        self.renewer.start()
        if type(self.store).wait is not Store.wait:  # the backend can tell of changes (etcd)
            tasks.append(asyncio.create_task(renewal.relay_changes(self.store, self.renewer.nudge, timing=self._timing),
                                             name="store-watch"))
        if not self.once:
            self._start_spec_watch()
        self.upkeep.ready(self.narrator.ready(self.watch.planning_view(), time.monotonic()))
        try:
            return await self._main()
        finally:
            self.watch_stop.set()
            await self.history.drain(0.5)  # (a clean exit's releases; a hung store costs half a second)
            await asyncio.to_thread(self.renewer.stop)
            if self.failsafe is not None:
                await asyncio.to_thread(self.failsafe.stop)
            log.debug("exit: waiting for %s", [t.get_name() for t in tasks])
            # Cancel until they are done: Python 3.11's asyncio.wait_for swallows a cancel
            # that arrives as its inner wait completes (the task then runs on).
            pending = set(tasks)
            while pending:
                for t in pending:
                    t.cancel()
                _done, pending = await asyncio.wait(pending, timeout=0.1)
            await asyncio.gather(*tasks, return_exceptions=True)  # all done: collects their outcome
            self.prober.stop()
            self.kernel_events.stop()
            self.supervisor.save()
            self.supervisor.detach()
            await self.store.close()
            log.debug("exit: done")

    def request_stop(self) -> None:
        if not self.stopping:
            log.info("stopping every local group, then exiting")
            if self.notify:
                self.notify.stopping()
        self.stopping = True
        self.wake()

    async def _main(self) -> int:
        while True:
            self.wake_event.clear()
            self._notice_spec_edit()
            self._maybe_sync()
            self.reconcile()
            self.upkeep.beat()  # at least once a tick, even while the store (and the renewer) hang
            if self.stopping:
                log.debug("shutdown waits for busy=%s active=%s", sorted(self.busy),
                          sorted(f"{st.group}/{st.tag}:{st.state}" for st in self.observer.observe(time.monotonic()).entries.values() if st.active))
            if self.stopping and not self.busy and not self._anything_runs():
                await self._release_all()
                self.lease.release()  # tells the keeper: clean exit (see keeper.py); no renewal after it
                return 0
            if self.once and not self.busy and self.last_plan.empty and self.instance.verdict.state not in ("watch", "hold"):
                return 0
            await self._wait_until_due()

    async def _wait_until_due(self) -> None:
        """Wait for a wake-up, the next tick, or the plan's earliest deadline.

        An owner's plan wakes it at its self-demotion deadline (lease_until - demote_margin
        of the lease it was planned with). A renewal moves that deadline on and changes
        nothing else, so while it is the plan's earliest deadline a bare timer callback
        follows the renewed lease instead (Lease.follow), and the loop itself wakes only
        once the lease has not been renewed in time: an idle owner reconciles once per
        tick, not every 200-300 ms, and its loop sleeps through the renewals.
        """
        t = self.spec.cluster.timing
        tick_due = time.monotonic() + t.tick
        planned = self._planned_lease
        # Pacing: after a pass that took D, the rest of the loop (heartbeat renewals, spawns,
        # store replies) gets at least min(D, PACE_MAX) before the next pass, so a burst of
        # wake-ups (hundreds of groups finishing their actions) coalesces into fewer passes
        # instead of starving the heartbeat. Negligible for small specs (D ~ 1 ms).
        if self._last_pass > 0.002:
            await asyncio.sleep(min(self._last_pass, PACE_MAX))
        due, wake, follow = tick_due, self.last_plan.wake_at, None
        if wake is not None:
            demote_at = planned - t.demote_margin
            if planned != float("-inf") and wake >= demote_at:
                follow = self.lease.follow(t.demote_margin, self.wake)
                if wake > demote_at:
                    due = min(due, wake)  # a later deadline of the plan's own
            else:
                due = min(due, wake)
        try:
            while not self.wake_event.is_set():
                remaining = due - time.monotonic()
                if remaining <= 0:
                    return
                try:
                    # asyncio.timeout, not wait_for: no task per wait
                    async with asyncio.timeout(remaining + 0.001):
                        await self.wake_event.wait()
                except TimeoutError:
                    pass
        finally:
            if follow is not None:
                follow.cancel()

    def _anything_runs(self) -> bool:
        # (groups in maintenance are left running by a shutdown, as by everything else: the
        # keeper spares them, and the next agent adopts them)
        spared = intents.exempt(self.watch.view, self.spec.groups)
        return any(st.active and st.group not in spared for st in self.observer.observe(time.monotonic()).entries.values())

    async def _release_all(self) -> None:
        if not self.instance.may_release():
            return  # the claims under this name may be another agent's (node identity)
        spared = intents.exempt(self.watch.view, self.spec.groups)  # kept: they run on, in maintenance
        for g, c in list(self.watch.view.claims.items()):
            if c.node == self.node and g not in spared:
                try:
                    await self.store.release(c)
                    self.history.record("release", g, "the agent stops")
                except StoreError as exc:
                    log.warning("could not release %s: %s", g, exc)

    def reconcile(self) -> None:
        started = time.monotonic()
        try:
            spec = self.spec
            if self.stopping:
                spec = attrs.evolve(spec, groups={n: _stopped(g) for n, g in spec.groups.items()})
            self.ledger.apply_requests()  # `reconcile clear`: before observing, so this pass shows it
            now = time.monotonic()
            observed = self.observer.observe(now)
            # (the failsafe: no promise is given between this view and the dispatch of its takeovers)
            planning = self.failsafe.planning() if self.failsafe is not None else contextlib.nullcontext(lambda _owners: None)
            with planning as taking_over:
                p, view = self._plan_and_dispatch(spec, observed, now, taking_over)
            self.history.observed(spec, observed, p, self.busy, now)
            self.supervisor.save()
            self.book.save()  # observation may have adopted or dropped some
            state_errors = tuple(e for e in (self.supervisor.save_error, self.lease.file_error) if e)
            # The keeper spares the groups in maintenance; until it is told, this node shows maintenance still.
            told = self.exemptions.save(intents.exempt(view, spec.groups))
            # (the digest of the spec as loaded: while stopping, `spec` says runlevel stop, and its
            # digest would show a cleanly stopped node's last record as running another spec)
            doc = statusmod.node_status(spec, observed, view, p, now, spec_error=self.specsync.error, digest=self._digest(self.spec),
                                        state_errors=state_errors, spec_revision=self.specsync.revision,
                                        restarts=self.executor.restart_reasons, cleared=self.ledger.cleared,
                                        events_dropped=self.history.dropped,
                                        maintenance=None if told else ("maintenance",))
            if self.failsafe is not None:
                doc = attrs.evolve(doc, peer=self.failsafe.advertise)
            if doc != self.status_doc:  # the same object while unchanged: the store skips it
                self.status_doc = doc
            self.metrics.tick(  # (the spec as loaded: while stopping, `spec` says runlevel stop)
                observed, view, time.monotonic() - started, groups=self.spec.groups,
                dead_after=self.spec.cluster.timing.dead_after,
                plan=p, busy=self.busy, skipped_total=getattr(self.store, "skipped_total", 0),
            )
            self._last_pass = time.monotonic() - started
        except Exception:
            log.exception("reconcile failed")
            self.metrics.tick_failed(time.monotonic() - started)

    def _plan_and_dispatch(self, spec, observed, now: float, taking_over) -> tuple[planmod.Plan, ClusterView]:
        view = self.watch.planning_view()
        self._planned_lease = view.lease_until
        self.narrator.tell(view, now)
        p = planmod.plan(spec, observed, view, now)
        self.last_plan = p
        by_group: dict[str, list[planmod.Action]] = {}
        for a in p.actions:
            by_group.setdefault(a.group, []).append(a)
        for group, actions in by_group.items():
            for a in actions:
                if a.kind == "takeover" and a.claim is not None:
                    self.metrics.takeover_dispatched(group, a.claim.generation, view.stalled_for(a.claim.node, now))
                    self.history.dispatched(a, view.stalled_for(a.claim.node, now))
                    self._takeovers[group] = a.claim.node
            running = self.busy.get(group)
            if running is not None:
                running.cancel()  # only urgent actions reach a busy group: preempt it
            claim = view.claims.get(group)
            gen = claim.generation if claim is not None and claim.node == self.node else None
            self.busy[group] = asyncio.create_task(self._run_group(spec, group, tuple(actions), gen, running))
        taking_over(frozenset(self._takeovers.values()))
        return p, view

    async def _run_group(self, spec, group, actions, generation, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            await self.executor.run_group(spec, actions, generation)
        finally:
            if self.busy.get(group) is asyncio.current_task():
                del self.busy[group]
                if self._takeovers.pop(group, None) is not None and self.failsafe is not None:
                    self.failsafe.book.taking_over = frozenset(self._takeovers.values())
            self.supervisor.save()
            self.wake()

    def _notice_spec_edit(self) -> None:
        """Once a tick, reload if the spec's files changed on disk although the watch did not
        say so (an edit made while the watch was being set up is not reported by it)."""
        now = time.monotonic()
        if self.once or now - self._spec_checked_at < self.spec.cluster.timing.tick:
            return
        self._spec_checked_at = now
        if specwatch.fingerprint(self.spec_path, self.node_file) != self._spec_files:
            self.reload = True

    def _maybe_sync(self) -> None:
        """Start a cluster spec step (agent/specsync.py) when the files changed, the store's
        revision moved, or the last one must be retried; one at a time, as a task of its own
        (a store that hangs never holds up a pass)."""
        if self.once or (self._sync_task is not None and not self._sync_task.done()):
            return
        view = self.view
        head = view.spec_revision
        retry = self.specsync.retry and time.monotonic() >= self._sync_retry_at
        if not view.store_ok or not (self.reload or head != self._sync_head or retry):
            return
        self.reload = False
        self._sync_head = head
        self._sync_retry_at = time.monotonic() + self._timing().tick
        self._spec_files = specwatch.fingerprint(self.spec_path, self.node_file)
        self._sync_task = asyncio.create_task(self._sync(head), name="spec-sync")

    async def _sync(self, head: int) -> None:
        try:
            self._adopt(await self.specsync.step(head))
        except Exception:
            log.exception("cluster spec sync failed")
        finally:
            self.wake()

    def _adopt(self, new: specmod.Spec | None) -> None:
        """Run `new` (a revision that loads here) from now on."""
        self.metrics.spec_running(self.specsync.revision)
        if new is not None:
            digest = new.digest()
            changed = digest != self._digest(self.spec)
            self.spec = new
            self._digest_of = (new, digest)
            if changed:  # (the seed of the store, or the store's revision of the same spec: no reload)
                log.info("spec reloaded: digest %s", digest)
                self.metrics.spec_loaded(new, ok=True)
        elif self.specsync.error != self._spec_error_seen:
            # refused (valid 0), or in step again after a refusal (valid 1: the files load)
            self.metrics.spec_loaded(None if self.specsync.error else self.spec, ok=not self.specsync.error)
        self._spec_error_seen = self.specsync.error
        # A link that points elsewhere now is watched where it leads.
        if self._watched is not None and specwatch.roots(self.spec_path, self.spec) != self._watched:
            self._start_spec_watch()

    def _start_spec_watch(self) -> None:
        """Watch the spec where it really is (reconciler/spec/watch.py); called again when a
        reload finds its links pointing elsewhere (the previous watch is told to stop)."""

        def changed() -> None:
            self.reload = True
            self.wake()

        self.watch_stop.set()
        self.watch_stop = threading.Event()
        self._watched = specwatch.roots(self.spec_path, self.spec)
        loop = asyncio.get_running_loop()
        specwatch.start(*self._watched, changed=lambda: loop.call_soon_threadsafe(changed), stop=self.watch_stop)

    def _digest(self, spec: specmod.Spec) -> str:
        """spec.digest(), computed once per spec object: it hashes the whole spec, and the
        heartbeat (every 100 ms) and every reconcile need it."""
        if self._digest_of is None or self._digest_of[0] is not spec:
            self._digest_of = (spec, spec.digest())
        return self._digest_of[1]


def _stopped(g: specmod.Group) -> specmod.Group:
    return attrs.evolve(g, runlevel=specmod.STOP)
