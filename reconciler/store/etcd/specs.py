"""The etcd store's cluster spec: numbered revisions under PREFIX/spec/.

    spec/head              the current revision's number (decimal)
    spec/rev/NNNNNNNNNN    one revision (published.revision_dumps), NNNNNNNNNN its number

A put is one transaction: it compares head (its value is the number before, or for the first
revision, its create revision is 0: absent), and if that holds puts head and the revision and
deletes the revisions older than the newest KEEP (a range delete). etcd applies transactions
one at a time, so among concurrent putters of one number exactly one wins, and head, the
revision and the pruning are seen together or not at all. No key has a lease: the spec
outlives every node.

Reads: spec_get(None) reads head and the newest revision key in one transaction (one
revision of etcd), and they must agree; Snapshot.spec_revision comes from the mirror
(mirror.py: every delta and full read carries spec/head), so it costs no round trip.
"""

from __future__ import annotations

from aetcd import rpc
from aetcd.utils import prefix_range_end

from reconciler.published import SpecRevision, StatusError, revision_dumps, revision_loads
from reconciler.store import KEEP, SpecConflict
from reconciler.store.etcd import values
from reconciler.store.etcd.conn import Connection, compare_op, put_op


class Specs:
    def __init__(self, conn: Connection):
        self._conn = conn
        self.head = conn.key("spec", "head")
        self._revs = conn.key("spec", "rev/")

    def _key(self, number: int) -> bytes:
        return self._revs + f"{number:010d}".encode()

    def _entry(self, key: bytes) -> str:
        return key[len(self._conn.prefix) + 1:].decode(errors="replace")

    def _parse(self, kv, number: int | None = None) -> SpecRevision:
        """A spec/rev/ key's revision; StoreError naming the key if it is malformed or holds
        another number than its name."""
        entry = self._entry(kv.key)
        name = kv.key[len(self._revs):]
        if not (name.isdigit() and len(name) == 10):
            raise self._conn.error("spec", f"{entry}: not a revision key (spec/rev/NNNNNNNNNN)")
        try:
            rev = revision_loads(kv.value)
        except StatusError as exc:
            raise self._conn.error("spec", f"{entry}: {exc}") from None
        if rev.number != int(name) or (number is not None and rev.number != number):
            raise self._conn.error("spec", f"{entry}: holds revision {rev.number}")
        return rev

    def _head(self, kvs) -> int:
        """spec/head's number from a range over it (0: absent); StoreError if malformed."""
        if not kvs:
            return 0
        n = values.parse_spec_head(kvs[0].value)
        if isinstance(n, str):
            raise self._conn.error("spec", n)
        return n

    def _newest(self, limit: int) -> rpc.RequestOp:
        return rpc.RequestOp(request_range=rpc.RangeRequest(
            key=self._revs, range_end=prefix_range_end(self._revs), sort_order=rpc.RangeRequest.DESCEND,
            sort_target=rpc.RangeRequest.KEY, limit=limit))

    async def get(self, number: int | None) -> SpecRevision | None:
        """Store.spec_get."""
        conn = self._conn
        if number is not None:
            if number < 1:
                return None
            key = self._key(number)
            resp = await conn.call("spec", lambda s, t, md: s.kv.Range(rpc.RangeRequest(key=key), timeout=t, metadata=md),
                                   conn.deadline())
            return self._parse(resp.kvs[0], number) if resp.kvs else None
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=self.head)), self._newest(1)]
        resp = await conn.txn("spec", [], ops, [], conn.deadline())
        head, newest = (r.response_range.kvs for r in resp.responses)
        current = self._head(head)
        if not current:
            return None
        if not newest or self._entry(newest[0].key) != self._entry(self._key(current)):
            found = self._entry(newest[0].key) if newest else "none"
            raise conn.error("spec", f"spec/head names revision {current}, but the newest revision key is {found}")
        return self._parse(newest[0], current)

    async def history(self) -> list[SpecRevision]:
        """Store.spec_history."""
        conn = self._conn
        request = self._newest(KEEP).request_range
        resp = await conn.call("spec", lambda s, t, md: s.kv.Range(request, timeout=t, metadata=md), conn.deadline())
        return [self._parse(kv) for kv in resp.kvs]

    async def put(self, rev: SpecRevision) -> tuple[SpecRevision, int]:
        """Store.spec_put, and the etcd revision it was written at.

        A try that timed out may have been applied (Connection.call retries on another
        endpoint): if the store's current revision is then this very one (same number, same
        text), that was this call's and it is returned, not reported as a conflict.
        """
        conn, n = self._conn, rev.number
        if n < 1:
            raise conn.error("spec", f"spec revision {n}: numbers start at 1")
        text = revision_dumps(rev).encode()
        compare = ([compare_op(self.head, "CREATE", create_revision=0)] if n == 1
                   else [compare_op(self.head, "VALUE", value=str(n - 1).encode())])
        success = [put_op(self.head, str(n)), put_op(self._key(n), text)]
        if n > KEEP:
            success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=self._revs, range_end=self._key(n - KEEP + 1))))
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k in (self.head, self._key(n))]
        attempts: list[str] = []
        resp = await conn.txn(f"spec put {n}", compare, success, failure, conn.deadline(), attempts)
        if resp.succeeded:
            return rev, resp.header.revision
        head, mine = (r.response_range.kvs for r in resp.responses)
        current = self._head(head)
        if attempts and current == n and mine and mine[0].value == text:
            return rev, mine[0].mod_revision
        raise SpecConflict(f"{conn.url}: spec revision {n} not stored: the current revision is {current}, not {n - 1}",
                           current=current)
