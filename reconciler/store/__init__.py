"""The store: where nodes publish heartbeats and status, hold claims on groups, and keep the
cluster spec's numbered revisions (spec_get, spec_put, spec_history).

`Store` is the interface; `directory.DirectoryStore` (the embedded default, also for a
shared NFS/GFS/CephFS directory) and `etcd.EtcdStore` are its backends. One contract test
suite (tests/test_store_contract.py) runs against every backend.

Liveness is never judged by timestamps written by another machine: a node's heartbeat
carries a counter that must advance, and the *observer* times how long it stood still on its
own monotonic clock (`liveness.Liveness`). That needs no clock synchronisation.

Decisions (who claims, when to break a claim) live in `plan`; backends only do I/O.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence



class StoreError(Exception):
    """The store could not be reached or did not answer in time. Transient: retry later.

    Every Store method raises this (and only this) for I/O failures, with a one-line message
    naming the store.
    """


class SpecConflict(StoreError):
    """spec_put() lost: the store's current revision is not the one the new revision was
    based on (`current`: the store's current number, 0 if it holds none)."""

    def __init__(self, message: str, *, current: int):
        super().__init__(message)
        self.current = current


class StoreRefused(StoreError):
    """The store is there but must not be trusted (ownership, permissions, a symlink where a
    directory belongs): the agent refuses to start on it."""


from reconciler.model import Claim, ClusterView, Heartbeat, Member, Snapshot  # noqa: E402,F401
from reconciler.published import Event, Intent, SpecFile, SpecRevision  # noqa: E402,F401

KEEP = 20  # cluster spec revisions a store keeps (history, rollback): the newest KEEP
# The cluster's history (events_append): a store keeps at most the newest EVENTS_KEEP events
# and none much older than EVENTS_MAX_AGE seconds; the appender prunes, every PRUNE_EVERY-th seq.
EVENTS_KEEP = 10_000
EVENTS_MAX_AGE = 7 * 86400.0
PRUNE_EVERY = 100


class Store(abc.ABC):
    """A backend. Every method but the blocking pair (publish_blocking, read_blocking) is a
    coroutine; every I/O failure raises StoreError."""

    url: str = ""
    # Entries a read skipped as malformed or stray, summed over every read (each read of a
    # bad entry counts: the metric reconciler_store_entries_skipped_total keeps rising while
    # one is there); each entry is also logged, once.
    skipped_total: int = 0

    async def setup(self) -> None:
        """Create the store's layout if it does not exist yet, and check what exists.

        The agent calls it once, before its first publish; no other call ever creates
        anything, so a store that disappears later is unreachable, never empty. Raises
        StoreError (one line naming the store) if it cannot, or if what is there must not
        be trusted.
        """

    # The agent renews its lease from a thread of its own (reconciler/cluster/renewal.py), so
    # that a busy or stalled event loop never delays a heartbeat: every backend offers this
    # blocking pair beside publish() and read().

    @abc.abstractmethod
    def publish_blocking(self, heartbeat: Heartbeat) -> None:
        """publish(), called from a thread other than the event loop's; blocks until done.

        The same guarantees as publish(): atomic, durable when it returns, and on error
        (StoreError, and only StoreError, for every I/O failure) nothing is assumed renewed.
        What it wrote is seen by the next read_blocking(), and by read() on the event loop,
        of this store and of every other. There is no timeout: a call that hangs simply
        renews nothing, and the lease runs out. Call it, and read_blocking, from one thread
        at a time.
        """

    @abc.abstractmethod
    def read_blocking(self) -> Snapshot:
        """read(), called from a thread other than the event loop's; blocks until done.

        The same guarantees as read(): as current as a fresh read (it shows what this
        store's publish_blocking() and its claims on the event loop wrote), StoreError and
        only StoreError for I/O failures. No timeout: the agent notices a read that does
        not come back on its own.
        """

    @abc.abstractmethod
    async def publish(self, heartbeat: Heartbeat) -> None:
        """Renew this node's heartbeat and replace its published status, atomically.

        Readers see either the old or the new record, never a torn one. Returns only after
        the write is durable enough for other nodes to read it. On error nothing is assumed
        renewed: the caller's lease runs on from its last successful call.
        """

    @abc.abstractmethod
    async def read(self) -> Snapshot:
        """Read every member's latest heartbeat and every claim, as current as a fresh read.

        A backend may hand back what provably did not change since its last read (the same
        objects: treat a Snapshot as read-only); each backend's docstring says how it knows.
        """

    @abc.abstractmethod
    async def claim(self, group: str, node: str, *, outlive_owner: bool = False) -> Claim | None:
        """Create the claim on `group` for `node` if no claim exists: atomic, one winner.

        Returns the new Claim (with a generation larger than any earlier claim instance of
        the group), or None if a claim already exists (the caller lost).

        A backend may end a claim together with its owner's heartbeat when that expires
        (etcd: the claim is bound to the node's lease), unless `outlive_owner`: then the
        claim stays until it is released or broken, so that a successor must take it over
        (break_claim), and fence its owner first where the group says so. Without it, a
        fenced group's claim could vanish on its own and be claimed afresh, unfenced.
        """

    @abc.abstractmethod
    async def release(self, claim: Claim) -> bool:
        """The owner gives up this claim instance. True if it was removed by this call.

        Removes the claim only if the current claim is this very instance (same token), so a
        stale owner can never remove its successor's claim.
        """

    @abc.abstractmethod
    async def break_claim(self, claim: Claim) -> bool:
        """Another node removes a dead owner's claim instance (after fencing or expiry).

        Atomic with exactly one winner among concurrent breakers of the same instance; a
        claim instance that was already replaced is never touched. True if this call won.
        """

    # --- the cluster spec: numbered revisions (reconciler/published.py: SpecRevision) -------
    # Every read() and read_blocking() reports the current number (Snapshot.spec_revision),
    # cheaply: agents fetch a revision only when that number moves. A store keeps the newest
    # KEEP revisions; the current one is the one with the largest number. A read() shows a
    # put's number as it shows any other write (read()'s freshness: this store's own put at
    # once, another's by the next read; etcd: see EtcdStore._read), and a new number wakes
    # wait() where the backend overrides it.
    # The number a read reports comes without the revision's text (a read never parses a
    # revision); where a backend keeps the number apart (etcd's spec/head) a malformed one
    # reads as 0 and is listed in Snapshot.skipped, while spec_get and spec_put raise
    # StoreError for it.

    @abc.abstractmethod
    async def spec_get(self, number: int | None = None) -> SpecRevision | None:
        """The revision `number` (None: the current one), or None if the store holds none
        (or no longer keeps that one; a number below 1 is none). A stored revision that
        does not parse or holds another number than its key/file name says is a StoreError
        naming it, never None; one a root agent must not trust (permissions: the directory
        store) is StoreRefused (a StoreError)."""

    @abc.abstractmethod
    async def spec_put(self, revision: SpecRevision) -> SpecRevision:
        """Store `revision` as the new current one if the current number is revision.number
        - 1 (0: none yet), atomically: among concurrent callers with the same number exactly
        one wins. Otherwise nothing is written and SpecConflict(current=N) is raised (one
        line naming the store). Durable when it returns; revisions older than the newest
        KEEP are then pruned (never the current one). Returns what was stored (`revision`
        itself). The revision is stored as given: the caller validated it (digest) and set
        node, wall and summary; a number below 1 is a StoreError."""

    @abc.abstractmethod
    async def spec_history(self) -> list[SpecRevision]:
        """The revisions kept, newest first (at most KEEP); [] if none. A malformed one is a
        StoreError naming it (as spec_get)."""

    # --- the cluster's history: events (reconciler/published.py: Event) ---------------------
    # Appended by agents from a queue of their own (agent/events.py), never on the heartbeat's
    # path; read by `reconcile events` from any node. No lease: the history outlives nodes.

    @abc.abstractmethod
    async def events_append(self, events: Sequence[Event], *, keep: int = EVENTS_KEEP,
                            max_age: float = EVENTS_MAX_AGE) -> list[Event]:
        """Append `events` (their seq is ignored), atomically each: a reader sees an event
        whole or not at all. Each gets a store-assigned seq larger than every seq appended
        before it (by any node); returns them with it, in order. Every PRUNE_EVERY-th seq
        the appender also removes events beyond the newest `keep` and those older than
        `max_age` seconds (by the store's notion of their age; never the newest)."""

    @abc.abstractmethod
    async def events_read(self, *, after: int = 0, limit: int = 1000) -> list[Event]:
        """The oldest `limit` events kept whose seq is larger than `after`, in seq order
        ([] if none; a store set up by an older version holds none). A malformed one is
        skipped and counted (skipped_total), as a read skips any entry."""

    # --- operator intents (published.Intent; reconciler/decide/intents.py) and hand-over -----
    # Every read() and read_blocking() reports the current intents (Snapshot.intents, by
    # Intent.key) with the same freshness as claims; a malformed one is skipped and listed in
    # Snapshot.skipped.

    @abc.abstractmethod
    async def intent_put(self, intent: Intent) -> Intent:
        """Store `intent` under its key, replacing whatever intent holds that key. Durable
        when it returns; returns `intent`."""

    @abc.abstractmethod
    async def intent_delete(self, key: str, *, token: str) -> bool:
        """Remove the intent at `key` if it is still the instance whose id is `token` (an
        intent put again since is never removed, like release()). True if this call removed it."""

    @abc.abstractmethod
    async def hand_over(self, claim: Claim, node: str, *, outlive_owner: bool = False) -> Claim | None:
        """The owner hands this claim instance to `node`, atomically: if it is still the
        current instance, it is replaced by a claim of `node` with a larger generation, with
        no moment in which the group is unclaimed (nobody else can claim it in between).
        Returns the new Claim, or None if this instance was no longer current (ended, broken,
        handed over already). Exactly one of concurrent hand_over/release/break_claim calls
        on one instance wins. `outlive_owner`: as for claim() (a fenced group's claim)."""
    # Does a node's record vanish on its own when the node stops (etcd: with its lease)? The
    # failsafe then counts every node this agent has seen as a member, not only the records.
    records_expire: bool = False

    async def forget(self, node: str) -> bool:
        """Remove `node`'s record (heartbeat and status) from the store: a decommissioned node
        is no longer a member (`reconcile forget`, which first checks that it is dead and owns
        no claim). True if there was a record. Backends override it; this default refuses."""
        raise StoreError(f"{self.url}: this store cannot forget a node")

    async def wait(self, timeout: float) -> None:
        """Return when the store may have changed, or after `timeout` seconds.

        This default only sleeps; a backend that can tell of changes overrides it.
        """
        import asyncio

        await asyncio.sleep(timeout)

    async def close(self) -> None:
        """Release connections; the node's heartbeat is left to go stale."""
