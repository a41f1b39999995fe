"""execute(plan): carry out one group's actions in order, with bounded tenacity retries.

A failed action ends its group's run for this round: what follows depends on it (a process
needs its mount). Failures are remembered with a retry time, so the next plan backs off
instead of hammering; nothing here decides *what* to do, only how.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import ModuleType
from typing import Callable

import attrs
import tenacity

from reconciler import spec as specmod
from reconciler.act import fence as fencemod
from reconciler.act import process
from reconciler.act.book import ResourceBook
from reconciler.act.ledger import Ledger
from reconciler.decide import backoff
from reconciler.decide.plan import Action
from reconciler.store import Claim, Intent, Store, StoreError

log = logging.getLogger("reconciler.act")

STORE_CONCURRENCY = 16  # store calls in flight at once (see Executor._store_turns)
LOST_HOLD = 0.25  # after losing a claim race: about two heartbeats for the winner to show


@attrs.define
class Events:
    """Callbacks the agent passes in: metrics and cached-view updates. All optional."""

    action: Callable[[Action, str, float], None] = lambda a, result, seconds: None
    retry: Callable[[str], None] = lambda kind: None
    claimed: Callable[[str, Claim | None], None] = lambda group, claim: None
    fenced: Callable[[str, fencemod.Outcome], None] = lambda group, outcome: None
    taken_over: Callable[[str, Claim], None] = lambda group, claim: None
    handed_over: Callable[[str, Claim], None] = lambda group, claim: None  # the new claim, the target's
    intent_ended: Callable[[Intent, str], None] = lambda intent, result: None  # a move done/refused/timed out
    forgotten: Callable[[Intent], None] = lambda intent: None  # an intent is gone from the store (view update)
    claim_attempt: Callable[[str, bool], None] = lambda group, won: None  # every store.claim answer
    done: Callable[[Action, bool, str], None] = lambda a, ok, message: None  # what the log line says (agent/events.py)


class Executor:
    def __init__(
        self,
        *,
        node: str,
        supervisor: process.Supervisor,
        store: Store,
        resources: ModuleType,
        book: ResourceBook,
        events: Events | None = None,
        store_budget: float = 0.3,
        ledger: Ledger | None = None,
    ):
        """`resources`: reconciler.act.resources (or a stand-in with its start and stop)."""
        self.node = node
        self.supervisor = supervisor
        self.store = store
        self.resources = resources
        self.book = book
        self.events = events or Events()
        self.store_budget = store_budget
        self.ledger = ledger  # the failure ledger (act/ledger.py): a restart counts there
        self.restart_reasons: dict[tuple[str, str], str] = {}  # (group, tag) -> why it was last restarted (status)
        self.blocked: dict[str, tuple[float, str]] = {}  # group -> (retry_at, message)
        self._block_count: dict[str, int] = {}
        # At most this many store calls (claim, release, break) in flight: a node claiming
        # 1,000 groups at once would otherwise get 1,000 replies in one turn of the event
        # loop, and its heartbeat could not renew the lease in between.
        self._store_turns = asyncio.Semaphore(STORE_CONCURRENCY)

    async def run_group(self, spec: specmod.Spec, actions: tuple[Action, ...], generation: int | None) -> None:
        for a in actions:
            started = time.monotonic()
            reported = False  # the supervisor logged this failure already
            try:
                ok, msg = await self._do(spec, a, generation)
            except _Failed as exc:
                ok, msg = False, str(exc)
                self.block(a.group, msg)
            except process.StartError as exc:
                ok, msg, reported = False, str(exc), True
            except Exception as exc:  # a bug or an unexpected OS error must not kill the loop
                log.exception("%s failed", a.describe())
                ok, msg = False, f"{type(exc).__name__}: {exc}"
            result = "ok" if ok else "error"
            self.events.action(a, result, time.monotonic() - started)
            # A respawn that worked, and a start that failed, are the supervisor's to report
            # (act/process.py: once per backoff step of a crash loop or of a missing program,
            # not at every retry). A give-up (too many failures here: decide/health.py) is a
            # warning too.
            level = (logging.DEBUG if reported or (ok and a.reason.startswith("respawn:")) else
                     logging.WARNING if not ok or a.reason.startswith("gave up:") else logging.INFO)
            log.log(level, "%s -> %s%s", a.describe(), result, f" ({msg})" if msg else "",
                    extra={"group": a.group, "tag": a.tag, "node": self.node, "reason": a.reason, "result": result})
            self.events.done(a, ok, msg)
            if not ok:
                return

    async def _do(self, spec: specmod.Spec, a: Action, generation: int | None) -> tuple[bool, str]:
        g = spec.groups.get(a.group)
        entry = spec.entry(a.group, a.tag) if a.tag else None
        if entry is None:
            entry = self.book.entry(a.group, a.tag)
        if a.kind in ("start", "stop") and entry is not None and entry.kind != "process":
            return await self._resource(a, entry)
        if a.failure and self.ledger is not None:  # an unhealthy entry (decide/health.py): one failure of the group here
            self.ledger.record(a.group, a.tag, "unhealthy", a.failure.removeprefix("unhealthy: "))
        if a.kind == "restart":
            assert entry is not None and g is not None
            await self.supervisor.stop(a.group, a.tag, sig=entry.stop_signal, timeout=entry.stop_timeout, resume=True)
            self.restart_reasons[(a.group, a.tag)] = a.reason
        if a.kind in ("start", "restart"):
            assert entry is not None and g is not None
            env = {
                "RECONCILER_NODE": self.node,
                "RECONCILER_GROUP": a.group,
                "RECONCILER_TAG": a.tag,
                "RECONCILER_RUNLEVEL": g.runlevel,
            }
            if generation is not None:
                env["RECONCILER_GENERATION"] = str(generation)
            result = await self.supervisor.start(a.group, entry, level=g.runlevel, env=env)  # StartError: run_group's
            if entry.foreground:
                rec = self.supervisor.records[(a.group, a.tag)]
                return rec.state in ("done", "passed"), rec.message or f"exit {result}"
            return True, f"pid {result}"
        if a.kind == "stop":
            sig, timeout = (entry.stop_signal, entry.stop_timeout) if entry else (15, 10.0)
            if a.urgent and a.deadline is not None:
                timeout = max(0.0, a.deadline - time.monotonic())
            await self.supervisor.stop(a.group, a.tag, sig=sig, timeout=timeout, deadline=a.deadline)
            return True, ""
        if a.kind == "reset":
            self.supervisor.reset(a.group, a.tag)
            self.book.forget(a.group, a.tag)
            return True, ""
        if a.kind == "claim":
            fenced = a.group in spec.groups and bool(spec.groups[a.group].fence)
            claim = await self._store(lambda: self.store.claim(a.group, self.node, outlive_owner=fenced), "claim")
            self.events.claim_attempt(a.group, claim is not None)
            if claim is None:
                # Lost the race: wait for the next store read to show the winner rather than
                # trying again at once against a view that still says "unclaimed".
                self.hold(a.group, LOST_HOLD, "another node claimed it first")
                return False, "another node claimed it first"
            self.events.claimed(a.group, claim)
            self.unblock(a.group)
            return True, f"generation {claim.generation}"
        if a.kind == "release":
            assert a.claim is not None
            won = await self._store(lambda: self.store.release(a.claim), "release")
            self.events.claimed(a.group, None)
            return True, "released" if won else "already gone"
        if a.kind == "takeover":
            return await self._takeover(spec, a)
        if a.kind == "handover":
            assert a.claim is not None
            fenced = a.group in spec.groups and bool(spec.groups[a.group].fence)
            handed = await self._store(lambda: self.store.hand_over(a.claim, a.target, outlive_owner=fenced), "handover")
            if handed is None:
                return False, "the claim was no longer this node's"
            self.events.claimed(a.group, handed)  # the view shows the new owner before the next read
            self.events.handed_over(a.group, handed)
            return True, f"handed to {a.target}: generation {handed.generation}"
        if a.kind == "forget":
            assert a.intent is not None
            intent = a.intent
            gone = await self._store(lambda: self.store.intent_delete(intent.key, token=intent.id), "forget")
            # Out of the view at once (as a claim won is): until the next read, each pass would
            # plan the same forget again, and count and tell its end again.
            self.events.forgotten(intent)
            if gone:
                self.events.intent_ended(intent, a.reason)
            return True, "intent removed" if gone else "intent already gone"
        return False, f"unknown action kind {a.kind}"

    async def _takeover(self, spec: specmod.Spec, a: Action) -> tuple[bool, str]:
        assert a.claim is not None
        g = spec.groups[a.group]
        if a.fence:
            outcome = await fencemod.fence(a.fence, node=a.claim.node, timeout=g.fence_timeout)
            self.events.fenced(a.group, outcome)
            if not outcome.ok:
                self.block(a.group, f"fencing {a.claim.node} failed: {outcome.message}")
                return False, outcome.message
        await self._store(lambda: self.store.break_claim(a.claim), "break")
        claim = await self._store(lambda: self.store.claim(a.group, self.node, outlive_owner=bool(g.fence)), "claim")
        self.events.claim_attempt(a.group, claim is not None)
        if claim is None:
            self.hold(a.group, LOST_HOLD, "another node took it over first")
            return False, "another node took it over first"
        self.unblock(a.group)
        self.events.claimed(a.group, claim)
        self.events.taken_over(a.group, claim)
        return True, f"took over from {a.claim.node}: generation {claim.generation}"

    async def _store(self, call, kind: str):
        """A store call retried within a small budget: a flicker should not cost a round."""
        try:
            async for attempt in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_delay(self.store_budget) | tenacity.stop_after_attempt(4),
                wait=tenacity.wait_exponential(multiplier=0.02, max=0.1),
                retry=tenacity.retry_if_exception_type(StoreError),
                before_sleep=lambda _state: self.events.retry(kind),
                reraise=True,
            ):
                with attempt:
                    async with self._store_turns:
                        return await call()
        except StoreError as exc:
            raise _Failed(str(exc)) from None

    async def _resource(self, a: Action, entry: specmod.Entry) -> tuple[bool, str]:
        rec = self.book.record(a.group, entry)
        now = time.monotonic()
        budget = max(1.0, entry.stop_timeout)
        was_owned = rec.owned
        try:
            if a.kind == "start":
                rec.entry, rec.applying = entry, True
                # Write-ahead: the keeper must know before the kernel does. Not recorded, not
                # applied: the keeper could not take it away if the lease lapsed.
                try:
                    self.book.save(strict=True)
                except OSError as exc:
                    rec.applying = False
                    raise NotRecorded(f"cannot record {_what(entry)} in {self.book.resource_file}: "
                                      f"{exc.strerror or exc}: not applied") from None
                try:
                    await self.resources.start(entry, deadline=budget)
                finally:
                    rec.applying = False
                rec.owned = True
            else:
                await self.resources.stop(entry, deadline=budget)
                rec.owned = False
        except Exception as exc:
            rec.failures += 1
            rec.retry_at = backoff.for_resource(permanent=getattr(exc, "permanent", False)).retry_at(rec.failures, now)
            rec.message = str(exc)
            if not was_owned:
                rec.since = now
            self.book.save()
            return False, str(exc)
        rec.failures, rec.retry_at, rec.message = 0, None, ""
        # A restore (an owned mount or address put back after it vanished) keeps its
        # original time: the plan stops entries in reverse `since` order, and a restored
        # mount must still be unmounted after the process that was started on it.
        if not (a.kind == "start" and was_owned):
            rec.since = now
        self.book.save()
        return True, ""

    def block(self, group: str, message: str) -> None:
        n = self._block_count.get(group, 0) + 1
        self._block_count[group] = n
        self.blocked[group] = (backoff.GROUP.retry_at(n, time.monotonic()), message)

    def hold(self, group: str, seconds: float, message: str) -> None:
        """Keep the plan off a group for a moment, without growing the backoff."""
        self.blocked[group] = (time.monotonic() + seconds, message)

    def unblock(self, group: str) -> None:
        self.blocked.pop(group, None)
        self._block_count.pop(group, None)


class _Failed(Exception):
    pass


class NotRecorded(Exception):
    """A mount or address whose write-ahead record could not be written: not applied."""

    permanent = False


def _what(entry: specmod.Entry) -> str:
    if entry.address is not None:
        return entry.address.ip
    if entry.mount is not None:
        return f"mount {entry.mount.target}"
    return entry.tag
