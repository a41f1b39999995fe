"""The etcd store's lease: the node's one etcd lease, granted on first use, kept alive on one
LeaseKeepAlive stream, renewed only every `renew_every` seconds, and dropped when etcd says it
has expired (its keys are gone with it)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
from aetcd import rpc

from reconciler.store.etcd.conn import Connection


class Lease:
    """`ttl`: the lease's time to live in whole seconds (etcd's clock); `renew_every`: how
    often renew_if_due() keeps it alive (EtcdStore.__init__ says why that suffices)."""

    def __init__(self, conn: Connection, *, ttl: int, renew_every: float):
        self._conn = conn
        self.ttl = ttl
        self.renew_every = renew_every
        self.id = 0  # the lease (0: none yet, or dropped)
        self._lock = asyncio.Lock()
        self._renewed_at = float("-inf")  # loop time the last keepalive or grant of `id` was sent
        self._ka: tuple[SimpleNamespace, Any] | None = None  # (stubs, open LeaseKeepAlive stream)

    async def ensure(self, deadline: float) -> int:
        """The lease, granted first if there is none, or if it went unrenewed for its whole
        TTL: etcd may have expired it, and keys bound to it now would be deleted with it
        moments later (after a store outage that the failsafe rode out, a claim taken back
        under the old lease vanished again)."""
        async with self._lock:
            if self.id and asyncio.get_running_loop().time() - self._renewed_at >= self.ttl:
                self.drop(self.id)
            if not self.id:
                grant = rpc.LeaseGrantRequest(TTL=self.ttl)
                fn = lambda s, t, md: s.lease.LeaseGrant(grant, timeout=t, metadata=md)  # noqa: E731
                sent = asyncio.get_running_loop().time()
                self.id = (await self._conn.call("lease grant", fn, deadline)).ID
                self._renewed_at = sent
            return self.id

    def drop(self, lease: int) -> None:
        """etcd said `lease` expired: forget it (if it is still the current one)."""
        if self.id == lease:
            self.id = 0  # its keys are gone with it
            self._renewed_at = float("-inf")

    async def renew_if_due(self, deadline: float) -> None:
        """Keep the lease alive if `renew_every` seconds have passed since it was last renewed
        or granted; drop it if etcd answers that it has expired."""
        lease = self.id
        if lease and (sent := asyncio.get_running_loop().time()) - self._renewed_at >= self.renew_every:
            if await self.keepalive(lease, deadline):
                if self.id == lease:
                    self._renewed_at = max(self._renewed_at, sent)
            else:
                self.drop(lease)

    async def keepalive(self, lease: int, deadline: float) -> bool:
        """Renew `lease`; False only if etcd answers that it has expired.

        One LeaseKeepAlive stream stays open to the endpoint in use (a new stream per renewal
        costs twice the CPU): one request, one reply. Any error, timeout or cancellation
        discards the stream, so a late reply can never be taken for the next request's.
        """
        request = rpc.LeaseKeepAliveRequest(ID=lease)

        async def once(stubs, timeout, md):
            if self._ka is None or self._ka[0] is not stubs:
                self.close()
                self._ka = (stubs, stubs.lease.LeaseKeepAlive(metadata=md))
            call = self._ka[1]
            try:
                async with asyncio.timeout(timeout):
                    await call.write(request)
                    reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "keepalive stream ended")
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                self.close()
                raise
            except Exception as exc:  # timed out, or the stream had already finished
                self.close()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else grpc.StatusCode.UNAVAILABLE
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           f"keepalive stream: {exc or 'timed out'}") from None
            return reply.TTL > 0

        return await self._conn.call("lease keepalive", once, deadline)

    def close(self) -> None:
        """Close the keepalive stream (the lease itself is left to expire)."""
        if self._ka is not None:
            self._ka[1].cancel()
            self._ka = None
