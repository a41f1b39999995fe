"""The etcd store's connection: one gRPC channel per endpoint, every call under a deadline and
moving on to the next endpoint after UNAVAILABLE or a timed-out attempt, and the transaction
helper. The lease (lease.py) and the watch (watch.py) make their calls through it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
from aetcd import rpc

from reconciler.store import StoreError

_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Find a restarted member within a second (gRPC's default backoff grows to 2 min), and notice
# a silently dead one under an idle watch (etcd refuses pings more often than every 5 s).
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 10000),
                    ("grpc.keepalive_timeout_ms", 3000)]


class LeaseGone(StoreError):
    """etcd no longer knows the lease a write referred to: it expired."""


class Connection:
    """The channels to `endpoints` (HOST:PORT; TLS if `tls` is (ca, cert, key), etcd
    authentication if `auth` is (user, password)), keys under `prefix`, errors naming `url`,
    every call's deadline `timeout` seconds away. Use it from one event loop."""

    def __init__(self, *, url: str, endpoints: list[str], prefix: str, timeout: float,
                 tls: tuple[str | None, str | None, str | None] | None = None,
                 auth: tuple[str, str] | None = None):
        self.url, self.endpoints, self.prefix, self.timeout = url, endpoints, prefix, timeout
        self._tls, self._auth = tls, auth
        self._stubs_by_idx: dict[int, SimpleNamespace] = {}
        self._tokens: dict[int, str] = {}  # endpoint -> auth token
        self._idx = 0  # the endpoint in use; moves on when it fails
        self._closed = False

    @property
    def idx(self) -> int:
        """The index of the endpoint in use."""
        return self._idx

    @property
    def closed(self) -> bool:
        return self._closed

    def key(self, kind: str, name: str = "") -> bytes:
        return f"{self.prefix}/{kind}/{name}".encode()

    def error(self, what: str, detail: str) -> StoreError:
        return StoreError(f"{self.url}: {what}: {' '.join(str(detail).split())}")

    def deadline(self) -> float:
        """The deadline of a call starting now, on the running loop's clock."""
        return asyncio.get_running_loop().time() + self.timeout

    async def stubs(self, idx: int, timeout: float) -> SimpleNamespace:
        """The stubs (kv, lease, watch, auth) of endpoint `idx`, authenticated if need be."""
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

    def metadata(self, idx: int, *extra) -> tuple | None:
        """The call metadata for endpoint `idx`: its auth token, if any, and `extra`."""
        token = self._tokens.get(idx)
        return ((("token", token),) if token else ()) + extra or None

    def rotate(self, idx: int) -> None:
        """Endpoint `idx` failed: move on to the next one."""
        if self._idx == idx:  # concurrent failures move on only once
            self._idx = (idx + 1) % len(self.endpoints)

    async def call(self, what: str, fn, deadline: float, attempts: list | None = None):
        """Run `fn(stubs, timeout, metadata)` on the current endpoint until one answers.

        UNAVAILABLE and timed-out attempts move on to the next endpoint; `attempts` collects
        them (their request may have been applied). Raises StoreError at the deadline.
        """
        if self._closed:
            raise self.error(what, "store closed")
        loop = asyncio.get_running_loop()
        err, tried = "timed out", 0
        while (remaining := deadline - loop.time()) > 0:
            idx = self._idx
            # With several endpoints, leave time for another one if this one hangs.
            budget = remaining if len(self.endpoints) == 1 else max(remaining / 2, min(remaining, 0.2))
            try:
                return await fn(await self.stubs(idx, budget), budget, self.metadata(idx))
            except grpc.aio.AioRpcError as exc:
                code, details, err = exc.code(), exc.details() or "", f"{self.endpoints[idx]}: {describe(exc)}"
                if "lease not found" in details:
                    raise LeaseGone(f"{self.url}: {what}: lease expired") from None
                if code == grpc.StatusCode.UNAUTHENTICATED and self._tokens.pop(idx, None):
                    continue  # the auth token expired: authenticate again
                if code not in _RETRY:
                    raise self.error(what, err) from None
                if attempts is not None:
                    attempts.append(err)
            except OSError as exc:  # TLS files
                raise self.error(what, describe(exc)) from None
            self.rotate(idx)
            tried += 1
            if tried % len(self.endpoints) == 0:  # every endpoint failed: pause a little
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        raise self.error(what, err)

    async def txn(self, what, compare, success, failure, deadline, attempts=None):
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self.call(what, lambda s, t, md: s.kv.Txn(request, timeout=t, metadata=md), deadline, attempts)

    def refuse(self) -> None:
        """From now on every call raises StoreError ("store closed"); close() follows."""
        self._closed = True

    async def close(self) -> None:
        self._closed = True
        for stubs in self._stubs_by_idx.values():
            await stubs.channel.close()
        self._stubs_by_idx.clear()


def put_op(key: bytes, value: str | bytes, lease: int = 0, prev_kv: bool = False):
    """A put of `key` as a transaction operation."""
    value = value.encode() if isinstance(value, str) else value
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease, prev_kv=prev_kv))


def compare_op(key: bytes, target: str, **value):
    """A transaction's comparison: `key`'s `target` ("CREATE", "MOD", "VALUE") equals `value`."""
    return rpc.Compare(key=key, target=getattr(rpc.Compare, target), result=rpc.Compare.EQUAL, **value)


def describe(exc: Exception) -> str:
    """A gRPC or OS error in one line."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{exc.strerror or exc} ({exc.filename})" if isinstance(exc, OSError) else str(exc)
