"""The agent's part of the cluster's history: what happened here, appended to the store.

`History.record` only puts an Event on a bounded queue (never I/O, never awaited by the
reconcile pass); a task of its own (`run`) takes what is queued in batches and appends it
(Store.events_append). When the store is slow or down the queue fills and further events
are dropped and counted (`dropped`: the metric reconciler_events_dropped_total, and the
node's published status): the history is for people, and must never be a reason for a
heartbeat or a pass to be slower. The renewer thread never touches it.

Where events come from (one small hook each): the executor's results (claims, releases,
takeovers with their phases, fence runs and results, failed starts, restarts, give-ups:
`wrap`), the reconcile pass (takeover dispatched: `dispatched`; tests that failed here and
bans, seen in what was observed: `observed`), and the cluster spec revisions this node
published (agent/specsync.py). An event says what the log line says; the same event for the
same group twice in a row (a crash loop's failed start at every backoff step) is told once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Collection, Mapping

import attrs

from reconciler import spec as specmod
from reconciler.act.executor import Events
from reconciler.decide import health, placement
from reconciler.decide.intent import Action, Plan
from reconciler.model import Observed
from reconciler.published import Event
from reconciler.store import Store, StoreError

log = logging.getLogger("reconciler.agent")

QUEUE = 1000  # events waiting at most; more are dropped (and counted)
BATCH = 100  # events per append
RETRY = 1.0  # seconds after a failed append before the next one
APPEND_TIMEOUT = 5.0  # an append that takes longer is given up (its events dropped)
TAKEOVER_TOLD_AFTER = 300.0  # seconds: a takeover whose group never ran is told then, without "start"
# Kinds told once while their reason stays the same (a crash loop fails its start at every
# backoff step; a give-up stops every entry with one reason).
ONCE = ("start-failed", "give-up")


@attrs.define
class _Takeover:
    """A takeover under way here: its phases so far (History.dispatched, then the executor's)."""

    detect: float  # how long the owner had been silent when this node decided (first dispatch)
    owner: str
    reason: str
    started: float  # monotonic: when the action was dispatched
    fence: float | None = None
    fenced_at: float | None = None
    claimed_at: float | None = None
    generation: int = 0


class History:
    def __init__(self, node: str, *, queue: int = QUEUE, on_appended=lambda n: None, on_dropped=lambda n: None):
        self.node = node
        self._queue: collections.deque[Event] = collections.deque()
        self._limit = queue
        self._ready = asyncio.Event()
        self.appended = 0
        self.dropped = 0
        self._appending = False
        self._on_appended, self._on_dropped = on_appended, on_dropped
        self._last: dict[tuple[str, str], str] = {}  # (group, kind) -> the reason last told
        self._takeovers: dict[str, _Takeover] = {}
        self._failed_tests: set[tuple[str, str]] = set()
        self._banned: set[str] = set()

    # --- the queue ----------------------------------------------------------------------------

    def record(self, kind: str, group: str = "", reason: str = "", phases: Mapping[str, float] | None = None) -> None:
        """Queue one event now (never blocks, never raises): dropped and counted if the queue is full."""
        if kind in ONCE:
            if self._last.get((group, kind)) == reason:
                return  # told already: the same again is not news
            self._last[(group, kind)] = reason
        if len(self._queue) >= self._limit:
            self._drop(1)
            return
        phases = {k: round(v, 4) for k, v in (phases or {}).items()}
        self._queue.append(Event(wall=time.time(), node=self.node, kind=kind, group=group, reason=reason, phases=phases))
        self._ready.set()

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._on_dropped(n)

    async def drain(self, timeout: float) -> None:
        """Wait until what is queued has been appended (or dropped), at most `timeout` seconds:
        at a clean exit, so that its last events (releases) are told."""
        deadline = time.monotonic() + timeout
        while (self._queue or self._appending) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def run(self, store: Store) -> None:
        """Append what is queued, in batches, until cancelled."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            self._appending = True
            try:
                await self._append_all(store)
            finally:
                self._appending = False

    async def _append_all(self, store: Store) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            try:
                async with asyncio.timeout(APPEND_TIMEOUT):
                    await store.events_append(batch)
            except (StoreError, TimeoutError) as exc:
                self._drop(len(batch))
                log.debug("history: %d events dropped: %s", len(batch), exc)
                await asyncio.sleep(RETRY)
                continue
            self.appended += len(batch)
            self._on_appended(len(batch))

    # --- the hooks ------------------------------------------------------------------------------

    def wrap(self, events: Events) -> Events:
        """The executor's callbacks `events`, each also telling this history."""
        fenced, taken_over, done = events.fenced, events.taken_over, events.done
        handed_over, intent_ended = events.handed_over, events.intent_ended

        def on_handed_over(group, claim):
            handed_over(group, claim)
            self.record("move", group, f"stopped here, claim handed to {claim.node}: generation {claim.generation}")

        def on_intent_ended(intent, result):
            intent_ended(intent, result)
            self.record(f"{intent.kind}-ended", intent.group, f"{intent.key}: {result}")

        def on_fenced(group, outcome):
            fenced(group, outcome)
            t = self._takeovers.get(group)
            if t is not None:
                t.fence, t.fenced_at = outcome.seconds, time.monotonic()
            result = "ok" if outcome.ok else f"failed: {outcome.message}"
            self.record("fence-result", group, f"fence {t.owner if t else 'the owner'}: {result} ({outcome.seconds:.2f}s)")

        def on_taken_over(group, claim):
            taken_over(group, claim)
            t = self._takeovers.get(group)
            if t is not None:
                t.claimed_at, t.generation = time.monotonic(), claim.generation

        def on_done(a: Action, ok: bool, message: str):
            done(a, ok, message)
            self._done(a, ok, message)

        return attrs.evolve(events, fenced=on_fenced, taken_over=on_taken_over, done=on_done, handed_over=on_handed_over,
                            intent_ended=on_intent_ended)

    def _done(self, a: Action, ok: bool, message: str) -> None:
        if a.kind == "claim" and ok:
            self.record("claim", a.group, f"{a.reason}: {message}")
        elif a.kind == "release" and ok:
            self.record("release", a.group, a.reason)
        elif a.kind == "takeover" and not ok:
            self._takeovers.pop(a.group, None)
            if "first" not in message:  # (a lost race is no news: the winner tells it)
                self.record("takeover-failed", a.group, f"{a.reason}: {message}")
        elif a.kind in ("start", "restart") and not ok:
            self.record("start-failed", a.group, f"{a.tag}: {message}")
        elif a.kind == "restart":
            self.record("restart", a.group, f"{a.tag}: {a.reason}")
        elif a.kind == "stop" and a.reason.startswith("gave up:"):
            self.record("give-up", a.group, a.reason)
        if a.kind in ("claim", "takeover") and ok:
            self._last.pop((a.group, "give-up"), None)  # a later give-up is news again
            self._last.pop((a.group, "start-failed"), None)

    def dispatched(self, a: Action, stalled: float) -> None:
        """The reconcile pass dispatched takeover `a`, the owner silent for `stalled` seconds."""
        if a.claim is None:
            return
        t = self._takeovers.get(a.group)
        if t is None or t.owner != a.claim.node:
            self._takeovers[a.group] = _Takeover(detect=stalled, owner=a.claim.node, reason=a.reason, started=time.monotonic())
        if a.fence:
            self.record("fence", a.group, f"fence {a.claim.node}: {' '.join(a.fence)}")

    def observed(self, spec: specmod.Spec, observed: Observed, plan: Plan, busy: Collection[str], now: float) -> None:
        """After a pass: finish the takeovers whose group now runs here, and tell the tests
        that failed here and the bans that began since the last pass."""
        for group, t in list(self._takeovers.items()):
            if t.claimed_at is None:
                continue
            states = [st for (g, _), st in observed.entries.items() if g == group]
            running = any(st.state in ("running", "done") for st in states)
            started = running and not plan.for_group(group) and group not in busy
            late = time.monotonic() - t.claimed_at > TAKEOVER_TOLD_AFTER
            if started or late:
                del self._takeovers[group]
                phases = {"detect": t.detect, "claim": t.claimed_at - (t.fenced_at or t.started)}
                if started:
                    phases["start"] = time.monotonic() - t.claimed_at
                if t.fence is not None:
                    phases["fence"] = t.fence
                how = "started" if started else f"not started within {TAKEOVER_TOLD_AFTER:.0f}s"
                self.record("takeover", group, f"{t.reason}: generation {t.generation}, {how}", phases)
        failed = set()
        for name, g in spec.groups.items():
            for tag in placement.leading_tags(g):
                st = observed.entries.get((name, tag))
                if st is not None and st.state == "failed":
                    failed.add((name, tag))
                    if (name, tag) not in self._failed_tests:
                        self.record("test-failed", name, f"{tag}: {st.message or 'failed'}")
        self._failed_tests = failed
        banned = {g for g, until in observed.bans.items() if until > now and g in spec.groups}
        for name in sorted(banned - self._banned):
            self.record("ban", name, health.ban_note(spec.groups[name]))
        self._banned = banned
