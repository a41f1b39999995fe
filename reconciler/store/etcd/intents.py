"""The etcd store's operator intents (published.Intent): the keys intents/KEY.

Each holds the intent's JSON (published.intent_dumps), with no lease: an intent outlives every
node. A put replaces the key's value; a delete is a transaction comparing the value with the
instance read (its random id is in it), so an intent put again since is never removed. Reads
need nothing here: the mirror ranges over intents/ in every delta (mirror.py).

Each call returns, with its result, the revision it wrote at (0: none), which the store's next
read must show.
"""

from __future__ import annotations

from aetcd import rpc

from reconciler import published
from reconciler.published import Intent
from reconciler.store.etcd.conn import Connection, compare_op, put_op


class Intents:
    def __init__(self, conn: Connection):
        self._conn = conn

    async def put(self, intent: Intent) -> int:
        """Store.intent_put: one put."""
        conn = self._conn
        resp = await conn.txn(f"intent {intent.key}", [], [put_op(conn.key("intents", intent.key), published.intent_dumps(intent))],
                              [], conn.deadline())
        return resp.header.revision

    async def delete(self, current: Intent) -> tuple[bool, int]:
        """Store.intent_delete of `current`, the instance the caller read (and checked the id of)."""
        conn = self._conn
        key = conn.key("intents", current.key)
        compare = [compare_op(key, "VALUE", value=published.intent_dumps(current).encode())]
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
        resp = await conn.txn(f"forget {current.key}", compare, [delete], [], conn.deadline())
        return bool(resp.succeeded), resp.header.revision if resp.succeeded else 0
