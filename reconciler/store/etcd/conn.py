"""The etcd store's connection and lease plumbing (a mixin of etcd.EtcdStore, whose __init__
sets the attributes used here): one gRPC channel per endpoint, every call under a deadline
and moving on to the next endpoint after UNAVAILABLE or a timed-out attempt, the
transaction helper, and the node's etcd lease (grant, keepalive on one stream, drop)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
from aetcd import rpc

from reconciler.store import StoreError
from reconciler.store.etcd.watch import describe as _describe

_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Find a restarted member within a second (gRPC's default backoff grows to 2 min), and notice
# a silently dead one under an idle watch (etcd refuses pings more often than every 5 s).
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 10000),
                    ("grpc.keepalive_timeout_ms", 3000)]


class LeaseGone(StoreError):
    """etcd no longer knows the lease a write referred to: it expired."""


class ConnectionMixin:
    # --- plumbing -------------------------------------------------------------------------

    def _key(self, kind: str, name: str = "") -> bytes:
        return f"{self.prefix}/{kind}/{name}".encode()

    def _error(self, what: str, detail: str) -> StoreError:
        return StoreError(f"{self.url}: {what}: {' '.join(str(detail).split())}")

    async def _stubs(self, idx: int, timeout: float) -> SimpleNamespace:
        stubs = self._stubs_by_idx.get(idx)
        if stubs is None:
            if self._tls is not None:
                ca, cert, key = (open(p, "rb").read() if p else None for p in self._tls)
                creds = grpc.ssl_channel_credentials(ca, key, cert)
                channel = grpc.aio.secure_channel(self.endpoints[idx], creds, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(self.endpoints[idx], options=_CHANNEL_OPTIONS)
            stubs = self._stubs_by_idx[idx] = SimpleNamespace(
                channel=channel, kv=rpc.KVStub(channel), lease=rpc.LeaseStub(channel),
                watch=rpc.WatchStub(channel), auth=rpc.AuthStub(channel))
        if self._auth is not None and idx not in self._tokens:
            request = rpc.AuthenticateRequest(name=self._auth[0], password=self._auth[1])
            self._tokens[idx] = (await stubs.auth.Authenticate(request, timeout=timeout)).token
        return stubs

    def _metadata(self, idx: int, *extra) -> tuple | None:
        token = self._tokens.get(idx)
        return ((("token", token),) if token else ()) + extra or None

    def _rotate(self, idx: int) -> None:
        if self._idx == idx:  # concurrent failures move on only once
            self._idx = (idx + 1) % len(self.endpoints)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout

    async def _call(self, what: str, fn, deadline: float, attempts: list | None = None):
        """Run `fn(stubs, timeout, metadata)` on the current endpoint until one answers.

        UNAVAILABLE and timed-out attempts move on to the next endpoint; `attempts` collects
        them (their request may have been applied). Raises StoreError at the deadline.
        """
        if self._closed:
            raise self._error(what, "store closed")
        loop = asyncio.get_running_loop()
        err, tried = "timed out", 0
        while (remaining := deadline - loop.time()) > 0:
            idx = self._idx
            # With several endpoints, leave time for another one if this one hangs.
            budget = remaining if len(self.endpoints) == 1 else max(remaining / 2, min(remaining, 0.2))
            try:
                return await fn(await self._stubs(idx, budget), budget, self._metadata(idx))
            except grpc.aio.AioRpcError as exc:
                code, details, err = exc.code(), exc.details() or "", f"{self.endpoints[idx]}: {_describe(exc)}"
                if "lease not found" in details:
                    raise LeaseGone(f"{self.url}: {what}: lease expired") from None
                if code == grpc.StatusCode.UNAUTHENTICATED and self._tokens.pop(idx, None):
                    continue  # the auth token expired: authenticate again
                if code not in _RETRY:
                    raise self._error(what, err) from None
                if attempts is not None:
                    attempts.append(err)
            except OSError as exc:  # TLS files
                raise self._error(what, _describe(exc)) from None
            self._rotate(idx)
            tried += 1
            if tried % len(self.endpoints) == 0:  # every endpoint failed: pause a little
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        raise self._error(what, err)

    async def _txn(self, what, compare, success, failure, deadline, attempts=None):
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self._call(what, lambda s, t, md: s.kv.Txn(request, timeout=t, metadata=md), deadline, attempts)

    # --- lease ----------------------------------------------------------------------------

    async def _ensure_lease(self, deadline: float) -> int:
        if self._twin is not None:
            # The twin holds the node's one lease and keeps it alive; claims bind to it.
            if not self._twin._lease:
                raise self._error("claim", "no etcd lease yet (the heartbeat has not been published)")
            return self._twin._lease
        async with self._lease_lock:
            if not self._lease:
                grant = rpc.LeaseGrantRequest(TTL=self.ttl)
                fn = lambda s, t, md: s.lease.LeaseGrant(grant, timeout=t, metadata=md)  # noqa: E731
                sent = asyncio.get_running_loop().time()
                self._lease = (await self._call("lease grant", fn, deadline)).ID
                self._renewed_at = sent
                self._last_status.clear()
            return self._lease

    def _drop_lease(self, lease: int) -> None:
        if self._twin is not None:
            return  # the twin's next heartbeat finds out itself ("lease not found") and grants anew
        if self._lease == lease:
            self._lease = 0  # its keys are gone with it
            self._renewed_at = float("-inf")
            self._last_status.clear()

    async def _keepalive(self, lease: int, deadline: float) -> bool:
        """Renew `lease`; False only if etcd answers that it has expired.

        One LeaseKeepAlive stream stays open to the endpoint in use (a new stream per renewal
        costs twice the CPU): one request, one reply. Any error, timeout or cancellation
        discards the stream, so a late reply can never be taken for the next request's.
        """
        request = rpc.LeaseKeepAliveRequest(ID=lease)

        async def once(stubs, timeout, md):
            if self._ka is None or self._ka[0] is not stubs:
                self._drop_keepalive()
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
                self._drop_keepalive()
                raise
            except Exception as exc:  # timed out, or the stream had already finished
                self._drop_keepalive()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else grpc.StatusCode.UNAVAILABLE
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           f"keepalive stream: {exc or 'timed out'}") from None
            return reply.TTL > 0

        return await self._call("lease keepalive", once, deadline)

    def _drop_keepalive(self) -> None:
        if self._ka is not None:
            self._ka[1].cancel()
            self._ka = None
