"""The etcd store's watch: what wakes EtcdStore.wait().

One gRPC stream carries the _WATCHES (watch i has id i + 1); each resumes, on whichever
endpoint the store uses, from the revision after the last event it delivered, so no change is
lost when a member fails. Heartbeat puts are left out (every live node writes one every
heartbeat): a new node writes its status with its first heartbeat and a changed status or
digest rewrites it, so those still wake wait(). Reads never depend on the watch; a broken
watch only costs latency.
"""

from __future__ import annotations

import asyncio

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

# The watches wait() relies on: (kind, filters).
_WATCHES = (("claims", ()), ("status", ()), ("nodes", (rpc.WatchCreateRequest.NOPUT,)))


class WatchMixin:
    """wait() and the background watch behind it, for EtcdStore (which provides _stubs,
    _metadata, _rotate, _key, _error, endpoints, timeout, _idx, _main and _closed)."""

    def _init_watch(self) -> None:
        self._read_rev = 0  # revision of the last read()
        self._event_rev = 0  # revision of the last change that should wake wait()
        self._watch_from = [0] * len(_WATCHES)  # per watch: next revision it must deliver (0: from now)
        self._watch_task: asyncio.Task | None = None
        self._watching, self._watch_down_since, self._watch_error = False, 0.0, "no watch yet"
        self._created: set[int] = set()  # the watches created on the current stream
        self._changed = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return when the store changed after the last read(), or after `timeout` seconds.

        A background watch (started by the first publish, read or wait) reports changes:
        claims, statuses and deletions (lease expiry) wake it, and so do a new node and a
        changed digest (both rewrite the node's status); a heartbeat counter alone does not.
        When its member fails, the watch resumes on another endpoint from the revision after
        the last event it delivered, so no change is lost. Raises StoreError (at the end of
        `timeout`) if the watch has been down for longer than `self.timeout`.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            raise self._error("wait", "store closed")
        self._ensure_watch()
        end = loop.time() + timeout
        while self._event_rev <= self._read_rev and (remaining := end - loop.time()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        if not self._watching and loop.time() - self._watch_down_since >= self.timeout:
            raise self._error("watch", self._watch_error)

    def _ensure_watch(self) -> None:
        if self._main is not None:
            return  # the twin only renews and reads: the main instance's watch serves wait()
        if self._closed or (self._watch_task is not None and not self._watch_task.done()):
            return
        self._watch_down_since = asyncio.get_running_loop().time()
        self._watch_task = asyncio.create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        """Keep the _WATCHES open on one stream (watch i has id i + 1), each resuming from
        its own next revision."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            idx, call, self._created = self._idx, None, set()
            try:
                stubs = await self._stubs(idx, self.timeout)
                # "hasleader": the member cancels the watch when it loses its leader.
                call = stubs.watch.Watch(metadata=self._metadata(idx, ("hasleader", "true")))
                for i, (kind, filters) in enumerate(_WATCHES):
                    if not self._watch_from[i] and self._read_rev:
                        self._watch_from[i] = self._read_rev + 1
                    key = self._key(kind)
                    await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                        key=key, range_end=prefix_range_end(key), start_revision=self._watch_from[i],
                        filters=filters, watch_id=i + 1)))
                resp = await asyncio.wait_for(call.read(), self.timeout)
                while resp is not grpc.aio.EOF and not self._on_watch(resp):
                    resp = await call.read()
                self._watch_error = f"{self.endpoints[idx]}: watch ended"
            except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                self._watch_error = f"{self.endpoints[idx]}: {describe(exc) or 'watch not created in time'}"
            finally:
                if call is not None:
                    call.cancel()
                if self._watching:
                    self._watching, self._watch_down_since = False, loop.time()
            self._rotate(idx)
            await asyncio.sleep(0.05)

    def _on_watch(self, resp) -> bool:
        """Take in one watch response; True if the server canceled a watch (the loop then
        opens them all again)."""
        i = resp.watch_id - 1
        if not 0 <= i < len(_WATCHES):
            return False
        if resp.created and not resp.canceled:
            self._created.add(i)
            self._watching = len(self._created) == len(_WATCHES)
            self._watch_from[i] = self._watch_from[i] or resp.header.revision + 1
        if resp.compact_revision:  # events before it are gone: assume everything changed
            self._watch_from[i] = resp.compact_revision
            self._wake(resp.compact_revision)
        for ev in resp.events:
            self._watch_from[i] = max(self._watch_from[i], ev.kv.mod_revision + 1)
            self._wake(ev.kv.mod_revision)
        return resp.canceled

    def _wake(self, revision: int) -> None:
        self._event_rev = max(self._event_rev, revision)
        self._changed.set()

    def _note_read(self, revision: int) -> None:
        """A read at `revision` happened: wait() need not report changes up to it. (A twin's
        reads count for its main instance, whose watch serves wait().)"""
        self._read_rev = max(self._read_rev, revision)
        if self._main is not None:
            self._main._read_rev = max(self._main._read_rev, revision)

    async def _stop_watch(self) -> None:
        if self._watch_task is not None:
            # Cancel until done: Python 3.11's asyncio.wait_for can swallow a cancel.
            while not self._watch_task.done():
                self._watch_task.cancel()
                await asyncio.wait({self._watch_task}, timeout=0.1)
            await asyncio.gather(self._watch_task, return_exceptions=True)


def describe(exc: Exception) -> str:
    """A gRPC or OS error in one line."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{exc.strerror or exc} ({exc.filename})" if isinstance(exc, OSError) else str(exc)
