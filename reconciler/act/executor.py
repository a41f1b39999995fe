"""execute(plan): carry out one group's actions in order, with bounded tenacity retries.

A failed action ends its group's run for this round: what follows depends on it (a process
needs its mount). Failures are remembered with a retry time, so the next plan backs off
instead of hammering; nothing here decides *what* to do, only how.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import attrs
import tenacity

from reconciler import spec as specmod
from reconciler.act import fence as fencemod
from reconciler.act import process
from reconciler.decide.plan import Action
from reconciler.store import Claim, Store, StoreError

log = logging.getLogger("reconciler.act")

STORE_CONCURRENCY = 16  # store calls in flight at once (see Executor._store_turns)
LOST_HOLD = 0.25  # after losing a claim race: about two heartbeats for the winner to show


@attrs.define
class ResourceRecord:
    """What we remember about a mount or address entry beyond what the kernel shows."""

    owned: bool = False  # we applied it: only what we applied is ever removed
    failures: int = 0
    retry_at: float | None = None
    message: str = ""
    since: float = 0.0  # when it became ours (kept across restores: the stop order uses it)
    entry: specmod.Entry | None = None  # last known definition: a removed entry is still removable
    applying: bool = False  # a start is in flight: listed for the keeper before it takes effect


@attrs.define
class Events:
    """Callbacks the agent passes in: metrics and cached-view updates. All optional."""

    action: Callable[[Action, str, float], None] = lambda a, result, seconds: None
    retry: Callable[[str], None] = lambda kind: None
    claimed: Callable[[str, Claim | None], None] = lambda group, claim: None
    fenced: Callable[[str, fencemod.Outcome], None] = lambda group, outcome: None
    taken_over: Callable[[str, Claim], None] = lambda group, claim: None
    claim_attempt: Callable[[str, bool], None] = lambda group, won: None  # every store.claim answer


class Executor:
    def __init__(
        self,
        *,
        node: str,
        supervisor: process.Supervisor,
        store: Store,
        resources=None,
        events: Events | None = None,
        store_budget: float = 0.3,
        resource_file: str | os.PathLike | None = None,
    ):
        self.node = node
        self.supervisor = supervisor
        self.store = store
        self.resources = resources
        self.events = events or Events()
        self.store_budget = store_budget
        self.book: dict[tuple[str, str], ResourceRecord] = {}
        self.blocked: dict[str, tuple[float, str]] = {}  # group -> (retry_at, message)
        self._block_count: dict[str, int] = {}
        # STATE/NODE/resources.json: the mounts and addresses this node applied, for the
        # keeper to remove when the lease lapses while the agent cannot (see keeper.py).
        self.resource_file = Path(resource_file) if resource_file is not None else None
        self._resource_doc: str | None = None
        self._resource_error = ""  # the last write error, logged once
        # At most this many store calls (claim, release, break) in flight: a node claiming
        # 1,000 groups at once would otherwise get 1,000 replies in one turn of the event
        # loop, and its heartbeat could not renew the lease in between.
        self._store_turns = asyncio.Semaphore(STORE_CONCURRENCY)

    async def run_group(self, spec: specmod.Spec, actions: tuple[Action, ...], generation: int | None) -> None:
        for a in actions:
            started = time.monotonic()
            try:
                ok, msg = await self._do(spec, a, generation)
            except _Failed as exc:
                ok, msg = False, str(exc)
                self.block(a.group, msg)
            except Exception as exc:  # a bug or an unexpected OS error must not kill the loop
                log.exception("%s failed", a.describe())
                ok, msg = False, f"{type(exc).__name__}: {exc}"
            result = "ok" if ok else "error"
            self.events.action(a, result, time.monotonic() - started)
            level = logging.INFO if ok else logging.WARNING
            log.log(level, "%s -> %s%s", a.describe(), result, f" ({msg})" if msg else "",
                    extra={"group": a.group, "tag": a.tag, "node": self.node, "reason": a.reason, "result": result})
            if not ok:
                return

    async def _do(self, spec: specmod.Spec, a: Action, generation: int | None) -> tuple[bool, str]:
        g = spec.groups.get(a.group)
        entry = spec.entry(a.group, a.tag) if a.tag else None
        if entry is None and (a.group, a.tag) in self.book:
            entry = self.book[(a.group, a.tag)].entry
        if a.kind in ("start", "stop") and entry is not None and entry.kind != "process":
            return await self._resource(a, entry)
        if a.kind == "start":
            assert entry is not None and g is not None
            env = {
                "RECONCILER_NODE": self.node,
                "RECONCILER_GROUP": a.group,
                "RECONCILER_TAG": a.tag,
                "RECONCILER_RUNLEVEL": g.runlevel,
            }
            if generation is not None:
                env["RECONCILER_GENERATION"] = str(generation)
            try:
                result = await self.supervisor.start(a.group, entry, level=g.runlevel, env=env)
            except process.StartError as exc:
                return False, str(exc)
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
            self.book.pop((a.group, a.tag), None)
            return True, ""
        if a.kind == "claim":
            claim = await self._store(lambda: self.store.claim(a.group, self.node), "claim")
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
        claim = await self._store(lambda: self.store.claim(a.group, self.node), "claim")
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
        rec = self.book.setdefault((a.group, a.tag), ResourceRecord(entry=entry))
        if self.resources is None:
            return False, f"{entry.kind} entries are not supported on this node"
        now = time.monotonic()
        budget = max(1.0, entry.stop_timeout)
        was_owned = rec.owned
        try:
            if a.kind == "start":
                rec.entry, rec.applying = entry, True
                # Write-ahead: the keeper must know before the kernel does. Not recorded, not
                # applied: the keeper could not take it away if the lease lapsed.
                try:
                    self.save_resources(strict=True)
                except OSError as exc:
                    rec.applying = False
                    raise NotRecorded(f"cannot record {_what(entry)} in {self.resource_file}: "
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
            permanent = getattr(exc, "permanent", False)
            rec.failures += 1
            rec.retry_at = now + min(30.0, 0.5 * 2 ** min(rec.failures, 6)) * (4 if permanent else 1)
            rec.message = str(exc)
            if not was_owned:
                rec.since = now
            self.save_resources()
            return False, str(exc)
        rec.failures, rec.retry_at, rec.message = 0, None, ""
        # A restore (an owned mount or address put back after it vanished) keeps its
        # original time: the plan stops entries in reverse `since` order, and a restored
        # mount must still be unmounted after the process that was started on it.
        if not (a.kind == "start" and was_owned):
            rec.since = now
        self.save_resources()
        return True, ""

    def save_resources(self, *, strict: bool = False) -> None:
        """Write the resources this node owns (or is applying) for the keeper, if changed.
        A write that fails is logged (once per error) and tried again at the next call;
        with `strict` it raises the OSError too (the write-ahead of a start: see _resource)."""
        if self.resource_file is None:
            return
        items = []
        for (group, tag), rec in self.book.items():
            e = rec.entry
            if e is None or not (rec.owned or rec.applying):
                continue
            if e.mount is not None:
                m = e.mount
                items.append({"group": group, "tag": tag, "kind": "mount", "target": m.target, "source": m.source,
                              "fstype": m.fstype, "options": m.options})
            elif e.address is not None:
                items.append({"group": group, "tag": tag, "kind": "address", "ip": e.address.ip,
                              "interface": e.address.interface})
            if rec.applying:
                items[-1]["applying"] = True  # changes the file: a keeper that already released looks again
        doc = json.dumps({"node": self.node, "resources": items}, sort_keys=True)
        if doc == self._resource_doc:
            return
        tmp = self.resource_file.with_name(f".{self.resource_file.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                data = (doc + "\n").encode()
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
            os.replace(tmp, self.resource_file)
        except OSError as exc:
            try:
                os.unlink(tmp)  # a partial copy must not keep the space a retry needs
            except OSError:
                pass
            error = f"cannot write {self.resource_file}: {exc.strerror or exc}"
            if error != self._resource_error:
                self._resource_error = error
                log.error("%s (what it lists now is not applied; removed entries stay listed)", error)
            if strict:
                raise
            return
        self._resource_doc = doc
        if self._resource_error:
            log.warning("%s written again", self.resource_file)
            self._resource_error = ""

    def new_record(self, entry: specmod.Entry) -> ResourceRecord:
        return ResourceRecord(entry=entry)

    def block(self, group: str, message: str) -> None:
        n = self._block_count.get(group, 0) + 1
        self._block_count[group] = n
        self.blocked[group] = (time.monotonic() + min(30.0, 0.5 * 2 ** min(n, 6)), message)

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
