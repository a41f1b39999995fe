"""The etcd store's history: events under PREFIX/events/.

    events/head            the largest seq handed out (decimal)
    events/e/NNNNNNNNNNNNNNNNNNNN   one event (published.event_dumps), N its seq in 20 digits

An append is one transaction for a batch (at most BATCH events): it compares head with the
value this store last saw (absent: create revision 0), and if that holds puts head + n and
the n events; otherwise the failure branch reads head and it tries again from there. So
seqs are dense, increasing and handed out once, and a reader ranging over events/e/ sees a
batch whole or not at all. The counter (rather than etcd's own revisions) keeps the keys in
seq order for a plain key range. No key has a lease: the history outlives every node.
When a batch crosses a multiple of PRUNE_EVERY, the same transaction deletes the keys below
head + n - keep (a range delete; not this batch's own keys), and the appender then reads the oldest PRUNE_EVERY events
and deletes those older than max_age by their writer's wall clock (never the newest).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs
from aetcd import rpc
from aetcd.utils import prefix_range_end

from reconciler.published import Event, StatusError, event_dumps, event_loads
from reconciler.store import PRUNE_EVERY, records
from reconciler.store.etcd.conn import Connection, compare_op, put_op

BATCH = 100  # events per transaction (etcd allows 128 operations in one)
TRIES = 20  # conflicting appenders: after this many lost races, StoreError


class Events:
    def __init__(self, conn: Connection, skips: records.Skips):
        self._conn = conn
        self._skips = skips
        self.head = conn.key("events", "head")
        self._keys = conn.key("events", "e/")
        self._seen: int | None = None  # head's value as this store last saw it (None: unknown)

    def _key(self, seq: int) -> bytes:
        return self._keys + f"{seq:020d}".encode()

    async def append(self, events: Sequence[Event], keep: int, max_age: float) -> list[Event]:
        """Store.events_append."""
        out: list[Event] = []
        for i in range(0, len(events), BATCH):
            out.extend(await self._append_batch(events[i:i + BATCH], keep, max_age))
        return out

    async def _append_batch(self, events: Sequence[Event], keep: int, max_age: float) -> list[Event]:
        conn = self._conn
        for _ in range(TRIES):
            base = self._seen
            if base is None:
                resp = await conn.call("events", lambda s, t, md: s.kv.Range(rpc.RangeRequest(key=self.head), timeout=t,
                                                                              metadata=md), conn.deadline())
                base = self._seen = self._parse_head(resp.kvs)
            stored = [attrs.evolve(ev, seq=base + 1 + i) for i, ev in enumerate(events)]
            top = base + len(stored)
            compare = ([compare_op(self.head, "CREATE", create_revision=0)] if base == 0
                       else [compare_op(self.head, "VALUE", value=str(base).encode())])
            success = [put_op(self.head, str(top))] + [put_op(self._key(ev.seq), event_dumps(ev)) for ev in stored]
            crossed = top // PRUNE_EVERY > base // PRUNE_EVERY
            # (etcd refuses a delete over a key the same transaction puts: this batch's own
            # events beyond `keep` wait for the next prune)
            below = min(top - max(keep, 1) + 1, base + 1)
            if crossed and below > 1:
                success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self._keys, range_end=self._key(below))))
            failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=self.head))]
            resp = await conn.txn("events append", compare, success, failure, conn.deadline())
            if resp.succeeded:
                self._seen = top
                if crossed:
                    await self._prune_old(top, max_age)
                return stored
            self._seen = self._parse_head(resp.responses[0].response_range.kvs)
        raise conn.error("events", f"append lost {TRIES} races for the next seq")

    def _parse_head(self, kvs) -> int:
        if not kvs:
            return 0
        text = kvs[0].value.decode(errors="replace")
        if not (text.isdigit() and len(text) <= 20):
            raise self._conn.error("events", f"events/head holds {text[:40]!r}, not a seq")
        return int(text)

    async def _prune_old(self, newest: int, max_age: float) -> None:
        oldest = await self.read(0, PRUNE_EVERY)
        horizon = time.time() - max_age
        old = [ev.seq for ev in oldest if ev.wall < horizon and ev.seq < newest]
        if not old:
            return
        request = rpc.DeleteRangeRequest(key=self._keys, range_end=self._key(old[-1] + 1))
        await self._conn.call("events", lambda s, t, md: s.kv.DeleteRange(request, timeout=t, metadata=md),
                              self._conn.deadline())

    async def read(self, after: int, limit: int) -> list[Event]:
        """Store.events_read: one range from seq after + 1, in key (= seq) order."""
        conn = self._conn
        request = rpc.RangeRequest(key=self._key(after + 1), range_end=prefix_range_end(self._keys), limit=limit,
                                   sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.KEY)
        resp = await conn.call("events", lambda s, t, md: s.kv.Range(request, timeout=t, metadata=md), conn.deadline())
        out = []
        for kv in resp.kvs:
            entry = kv.key[len(conn.prefix) + 1:].decode(errors="replace")
            name = kv.key[len(self._keys):]
            try:
                ev = event_loads(kv.value)
                if not name.isdigit() or ev.seq != int(name):
                    raise StatusError(f"holds seq {ev.seq}")
            except StatusError as exc:
                self._skips.skip(entry, str(exc))
                continue
            out.append(ev)
        return out
