"""The etcd store's watch: what wakes EtcdStore.wait().

One gRPC stream carries the _WATCHES (watch i has id i + 1); each resumes, on whichever
endpoint the connection uses, from the revision after the last event it delivered, so no change
is lost when a member fails. Heartbeat puts are left out (every live node writes one every
heartbeat): a new node writes its status with its first heartbeat and a changed status or
digest rewrites it, so those still wake wait(). Reads never depend on the watch; a broken
watch only costs latency.
"""

from __future__ import annotations

import asyncio

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from reconciler.store.etcd.conn import Connection, describe

# The watches wait() relies on: (what, filters); "spec/head" is one key (a new spec revision),
# the others are prefixes.
_WATCHES = (("claims", ()), ("status", ()), ("nodes", (rpc.WatchCreateRequest.NOPUT,)), ("spec/head", ()), ("intents", ()))


class Watch:
    """The background watch behind wait(), over `conn`; the store tells it of its reads
    (note_read) so that wait() reports only changes a read has not shown yet."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._read_rev = 0  # revision of the last read()
        self._event_rev = 0  # revision of the last change that should wake wait()
        self.resume_from = [0] * len(_WATCHES)  # per watch: next revision it must deliver (0: from now)
        self.task: asyncio.Task | None = None
        self._watching, self._down_since, self._error = False, 0.0, "no watch yet"
        self._created: set[int] = set()  # the watches created on the current stream
        self._changed = asyncio.Event()

    @property
    def watching(self) -> bool:
        """True while every watch is open."""
        return self._watching

    async def wait(self, timeout: float) -> None:
        """EtcdStore.wait: return when the store changed after the last read (note_read), or
        after `timeout` seconds.

        The background watch (started by the store's first publish, read or wait) reports
        changes: claims, statuses, deletions (lease expiry) and a new cluster spec revision
        (spec/head) wake it, and so do a new node and a changed digest (both rewrite the
        node's status); a heartbeat counter alone does not. When its member fails, the watch resumes on another endpoint from the revision
        after the last event it delivered, so no change is lost. Raises StoreError (at the end
        of `timeout`) if the watch has been down for longer than the connection's timeout.
        """
        loop = asyncio.get_running_loop()
        if self._conn.closed:
            raise self._conn.error("wait", "store closed")
        self.ensure()
        end = loop.time() + timeout
        while self._event_rev <= self._read_rev and (remaining := end - loop.time()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        if not self._watching and loop.time() - self._down_since >= self._conn.timeout:
            raise self._conn.error("watch", self._error)

    def ensure(self) -> None:
        """Start the watch if it is not running (on the running loop)."""
        if self._conn.closed or (self.task is not None and not self.task.done()):
            return
        self._down_since = asyncio.get_running_loop().time()
        self.task = asyncio.create_task(self.run())

    def note_read(self, revision: int) -> None:
        """A read at `revision` happened: wait() need not report changes up to it."""
        self._read_rev = max(self._read_rev, revision)

    async def run(self) -> None:
        """Keep the _WATCHES open on one stream (watch i has id i + 1), each resuming from
        its own next revision."""
        conn, loop = self._conn, asyncio.get_running_loop()
        while not conn.closed:
            idx, call, self._created = conn.idx, None, set()
            try:
                stubs = await conn.stubs(idx, conn.timeout)
                # "hasleader": the member cancels the watch when it loses its leader.
                call = stubs.watch.Watch(metadata=conn.metadata(idx, ("hasleader", "true")))
                for i, (kind, filters) in enumerate(_WATCHES):
                    if not self.resume_from[i] and self._read_rev:
                        self.resume_from[i] = self._read_rev + 1
                    key = conn.key(kind) if "/" not in kind else f"{conn.prefix}/{kind}".encode()
                    await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                        key=key, range_end=prefix_range_end(key) if "/" not in kind else b"", start_revision=self.resume_from[i],
                        filters=filters, watch_id=i + 1)))
                resp = await asyncio.wait_for(call.read(), conn.timeout)
                while resp is not grpc.aio.EOF and not self._on_response(resp):
                    resp = await call.read()
                self._error = f"{conn.endpoints[idx]}: watch ended"
            except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                self._error = f"{conn.endpoints[idx]}: {describe(exc) or 'watch not created in time'}"
            finally:
                if call is not None:
                    call.cancel()
                if self._watching:
                    self._watching, self._down_since = False, loop.time()
            conn.rotate(idx)
            await asyncio.sleep(0.05)

    def _on_response(self, resp) -> bool:
        """Take in one watch response; True if the server canceled a watch (the loop then
        opens them all again)."""
        i = resp.watch_id - 1
        if not 0 <= i < len(_WATCHES):
            return False
        if resp.created and not resp.canceled:
            self._created.add(i)
            self._watching = len(self._created) == len(_WATCHES)
            self.resume_from[i] = self.resume_from[i] or resp.header.revision + 1
        if resp.compact_revision:  # events before it are gone: assume everything changed
            self.resume_from[i] = resp.compact_revision
            self._wake(resp.compact_revision)
        for ev in resp.events:
            self.resume_from[i] = max(self.resume_from[i], ev.kv.mod_revision + 1)
            self._wake(ev.kv.mod_revision)
        return resp.canceled

    def _wake(self, revision: int) -> None:
        self._event_rev = max(self._event_rev, revision)
        self._changed.set()

    async def stop(self) -> None:
        if self.task is not None:
            # Cancel until done: Python 3.11's asyncio.wait_for can swallow a cancel.
            while not self.task.done():
                self.task.cancel()
                await asyncio.wait({self.task}, timeout=0.1)
            await asyncio.gather(self.task, return_exceptions=True)
