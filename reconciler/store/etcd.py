"""The etcd store: nodes coordinate through an etcd v3 cluster (3.4 or later).

Layout under the prefix (default /reconciler; a URL path, etcd://HOST:PORT/ha1, replaces it):
    nodes/NODE           heartbeat {node, counter, digest}; bound to the node's lease
    status/NODE          published status; rewritten only when it changes; bound to the lease
    claims/GROUP         "NODE:GENERATION"; created only if absent, bound to the claimer's lease
    generations/GROUP    the last generation handed out for GROUP (no lease: it only grows)

Each store instance holds one etcd lease, kept alive by `publish`. When a node stops renewing,
etcd deletes its heartbeat, status and claims once the lease TTL has run out by the etcd
leader's clock. The TTL is ceil(lease_ttl) + 1 whole seconds, so a claim outlives its owner's
own self-demotion deadline.

A claim instance is identified by the create revision of its key (Claim.token). Release and
break delete the key in a transaction comparing that revision, so exactly one caller ends an
instance and nobody ever removes a successor (a re-created key has a new create revision).

Talks gRPC through aetcd's generated stubs (aetcd.Client lacks TLS, per-call deadlines,
failover and resumable watches). Every call has a deadline (`timeout`, default 1 s); within it
a call moves on to the next endpoint after UNAVAILABLE or a timed-out attempt, after it raises
StoreError. Use one instance from one event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace
from urllib.parse import urlsplit

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from reconciler.store import Claim, Heartbeat, Snapshot, Store, StoreError

_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Find a restarted member within a second (gRPC's default backoff grows to 2 min), and notice
# a silently dead one under an idle watch (etcd refuses pings more often than every 5 s).
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 10000),
                    ("grpc.keepalive_timeout_ms", 3000)]


class _LeaseGone(StoreError):
    """etcd no longer knows the lease a write referred to: it expired."""


class EtcdStore(Store):
    """`url`: etcd://HOST[:PORT],HOST[:PORT]... or etcds://... (TLS with `ca`, `cert`, `key`).

    `lease_ttl` (alias `lease`): the agent's lease in seconds; `timeout`: the per-call deadline;
    `user`/`password`: etcd authentication.
    """

    def __init__(self, url: str, *, prefix: str = "/reconciler", lease_ttl: float | None = None,
                 lease: float | None = None, timeout: float = 1.0, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, user: str | None = None,
                 password: str | None = None):
        parts = urlsplit(url)
        hosts = [h.strip() for h in parts.netloc.rpartition("@")[2].split(",") if h.strip()]
        if parts.scheme not in ("etcd", "etcds") or not hosts:
            raise StoreError(f"{url}: not an etcd URL (etcd://HOST:PORT,HOST:PORT or etcds://...)")
        if (user is None) != (password is None):
            raise StoreError(f"{url}: etcd authentication needs both user and password")
        self.url = url
        self.endpoints = [h if h.rpartition(":")[2].isdigit() else f"{h}:2379" for h in hosts]
        self.prefix = (parts.path if parts.path.strip("/") else prefix).rstrip("/")
        seconds = lease_ttl if lease_ttl is not None else lease if lease is not None else 1.0
        self.ttl = max(1, math.ceil(seconds) + 1)
        self.timeout = timeout
        self._tls = (ca, cert, key) if parts.scheme == "etcds" else None
        self._auth = (user, password) if user is not None else None
        self._stubs_by_idx: dict[int, SimpleNamespace] = {}
        self._tokens: dict[int, str] = {}  # endpoint -> auth token
        self._idx = 0  # the endpoint in use; moves on when it fails
        self._lease, self._lease_lock = 0, asyncio.Lock()
        self._last_status: dict[str, str] = {}  # node -> status written under the current lease
        self._gens: dict[str, tuple[int, int]] = {}  # group -> (generation, its key's mod revision)
        self._read_rev = 0  # revision of the last read()
        self._event_rev = 0  # revision of the last change that should wake wait()
        self._watch_from = 0  # next revision the watch must deliver (0: from now)
        self._watch_task: asyncio.Task | None = None
        self._watching, self._watch_down_since, self._watch_error = False, 0.0, "no watch yet"
        self._digests: dict[str, str] = {}  # node -> digest last seen by the watch
        self._changed, self._closed = asyncio.Event(), False

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
                    raise _LeaseGone(f"{self.url}: {what}: lease expired") from None
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
        async with self._lease_lock:
            if not self._lease:
                grant = rpc.LeaseGrantRequest(TTL=self.ttl)
                fn = lambda s, t, md: s.lease.LeaseGrant(grant, timeout=t, metadata=md)  # noqa: E731
                self._lease = (await self._call("lease grant", fn, deadline)).ID
                self._last_status.clear()
            return self._lease

    def _drop_lease(self, lease: int) -> None:
        if self._lease == lease:
            self._lease = 0  # its keys are gone with it
            self._last_status.clear()

    async def _keepalive(self, lease: int, deadline: float) -> bool:
        """Renew `lease`; False only if etcd answers that it has expired."""

        async def once(stubs, timeout, md):
            call = stubs.lease.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=timeout, metadata=md)
            try:
                async for reply in call:
                    return reply.TTL > 0
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), "keepalive stream ended")
            finally:
                call.cancel()

        return await self._call("lease keepalive", once, deadline)

    # --- heartbeat ------------------------------------------------------------------------

    async def publish(self, heartbeat: Heartbeat) -> None:
        """Renew this node's lease and heartbeat; write its status if it changed.

        Keeps the lease alive (granting a new one if etcd says it expired; the status is then
        written again), then puts the heartbeat and any changed status in one transaction bound
        to the lease: readers see the old or the new record, never a torn one. Returns once the
        etcd quorum has committed it. Raises StoreError if no endpoint answers within `timeout`;
        then nothing is assumed renewed.
        """
        deadline, node = self._deadline(), heartbeat.node
        status = json.dumps(heartbeat.status, sort_keys=True, separators=(",", ":"))
        beat = json.dumps({"node": node, "counter": heartbeat.counter, "digest": heartbeat.digest})
        for _ in range(3):
            lease = self._lease
            if lease and not await self._keepalive(lease, deadline):
                self._drop_lease(lease)
            lease = await self._ensure_lease(deadline)
            ops = [_put(self._key("nodes", node), beat, lease)]
            if self._last_status.get(node) != status:
                ops.append(_put(self._key("status", node), status, lease))
            try:
                await self._txn("publish", [], ops, [], deadline)
            except _LeaseGone:
                self._drop_lease(lease)
                continue
            if self._lease == lease:
                self._last_status[node] = status
            return
        raise self._error("publish", "the lease keeps expiring")

    # --- reading --------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        """Read every heartbeat, status and claim at one revision (one linearizable txn).

        Raises StoreError if no endpoint answers within `timeout`.
        """
        kinds = ("nodes", "status", "claims")
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(
            key=self._key(k), range_end=prefix_range_end(self._key(k)))) for k in kinds]
        resp = await self._txn("read", [], ops, [], self._deadline())
        self._read_rev = max(self._read_rev, resp.header.revision)
        nodes, status, claimed = (
            {kv.key[len(self._key(k)):].decode(): kv for kv in r.response_range.kvs}
            for k, r in zip(kinds, resp.responses))
        members: dict[str, Heartbeat] = {}
        for node, kv in nodes.items():
            beat, doc = _json(kv.value), _json(getattr(status.get(node), "value", b""))
            if isinstance(beat, dict) and isinstance(beat.get("counter"), int):
                members[node] = Heartbeat(node=node, counter=beat["counter"], digest=str(beat.get("digest", "")),
                                          status=doc if isinstance(doc, dict) else {})
        claims: dict[str, Claim] = {}
        for group, kv in claimed.items():
            owner, gen = _parse_claim(kv.value)
            if owner:
                claims[group] = Claim(group=group, node=owner, generation=gen, token=str(kv.create_revision))
        return Snapshot(members=members, claims=claims)

    # --- claims ---------------------------------------------------------------------------

    async def claim(self, group: str, node: str) -> Claim | None:
        """Create the claim on `group` for `node` if absent, bound to this store's lease.

        One transaction compares that the claim key does not exist and that generations/GROUP
        is unchanged since we read it, then bumps the generation and creates the claim: among
        concurrent claimers exactly one succeeds, and generations only grow. Returns None if a
        claim exists. If an attempt of this call timed out but was applied (the claim carries
        this store's lease and `node`), returns that claim. Raises StoreError if no endpoint
        answers within `timeout`.
        """
        deadline = self._deadline()
        ckey, gkey = self._key("claims", group), self._key("generations", group)
        attempts: list[str] = []
        while True:
            lease = await self._ensure_lease(deadline)
            gen, mod = self._gens.get(group, (0, 0))
            compare = [_cmp(ckey, "CREATE", create_revision=0), _cmp(gkey, "MOD", mod_revision=mod)]
            success = [_put(gkey, str(gen + 1)), _put(ckey, f"{node}:{gen + 1}", lease)]
            failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k in (ckey, gkey)]
            try:
                resp = await self._txn(f"claim {group}", compare, success, failure, deadline, attempts)
            except _LeaseGone:
                self._drop_lease(lease)
                continue
            if resp.succeeded:
                rev = resp.header.revision  # both keys were written at this revision
                self._gens[group] = (gen + 1, rev)
                return Claim(group=group, node=node, generation=gen + 1, token=str(rev))
            current, gens = (r.response_range.kvs for r in resp.responses)
            last = gens[0].value if gens else b"0"
            self._gens[group] = (int(last) if last.isdigit() else 0, gens[0].mod_revision if gens else 0)
            if current:
                owner, cgen = _parse_claim(current[0].value)
                if attempts and owner == node and current[0].lease == lease:
                    return Claim(group=group, node=node, generation=cgen, token=str(current[0].create_revision))
                return None
            # The generation moved on and the claim is gone again: retry with the new number.

    async def release(self, claim: Claim) -> bool:
        """The owner deletes its claim instance. True if this call removed it.

        One transaction deletes the key only if its create revision is the claim's token and
        its value is unchanged, so a stale owner never removes a successor's claim. Raises
        StoreError if no endpoint answers within `timeout`.
        """
        return await self._end("release", claim)

    async def break_claim(self, claim: Claim) -> bool:
        """Another node deletes a dead owner's claim instance. True if this call won.

        The same compare-and-delete transaction as `release`: among concurrent breakers of one
        instance exactly one succeeds, and a replaced instance is never touched. Raises
        StoreError if no endpoint answers within `timeout`.
        """
        return await self._end("break", claim)

    async def _end(self, what: str, claim: Claim) -> bool:
        if not claim.token.isdigit():
            return False
        ckey = self._key("claims", claim.group)
        compare = [_cmp(ckey, "CREATE", create_revision=int(claim.token)),
                   _cmp(ckey, "VALUE", value=f"{claim.node}:{claim.generation}".encode())]
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=ckey))
        resp = await self._txn(f"{what} {claim.group}", compare, [delete], [], self._deadline())
        return bool(resp.succeeded)

    # --- waiting --------------------------------------------------------------------------

    async def wait(self, timeout: float) -> None:
        """Return when the store changed after the last read(), or after `timeout` seconds.

        A background prefix watch (started by the first call) reports changes. Claims, status,
        deletions (lease expiry), new nodes and changed digests wake it; a heartbeat counter
        alone does not. When its member fails, the watch resumes on another endpoint from the
        revision after the last event it delivered, so no change is lost. Raises StoreError
        (at the end of `timeout`) if the watch has been down for longer than `self.timeout`.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            raise self._error("wait", "store closed")
        if self._watch_task is None or self._watch_task.done():
            self._watch_down_since = loop.time()
            self._watch_task = asyncio.create_task(self._watch_loop())
        end = loop.time() + timeout
        while self._event_rev <= self._read_rev and (remaining := end - loop.time()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        if not self._watching and loop.time() - self._watch_down_since >= self.timeout:
            raise self._error("watch", self._watch_error)

    async def _watch_loop(self) -> None:
        loop, base = asyncio.get_running_loop(), f"{self.prefix}/".encode()
        while not self._closed:
            if not self._watch_from and self._read_rev:
                self._watch_from = self._read_rev + 1
            idx, call = self._idx, None
            try:
                stubs = await self._stubs(idx, self.timeout)
                # "hasleader": the member cancels the watch when it loses its leader.
                call = stubs.watch.Watch(metadata=self._metadata(idx, ("hasleader", "true")))
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=base, range_end=prefix_range_end(base), start_revision=self._watch_from)))
                resp = await asyncio.wait_for(call.read(), self.timeout)
                while resp is not grpc.aio.EOF and not self._on_watch(resp):
                    resp = await call.read()
                self._watch_error = f"{self.endpoints[idx]}: watch ended"
            except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                self._watch_error = f"{self.endpoints[idx]}: {_describe(exc) or 'watch not created in time'}"
            finally:
                if call is not None:
                    call.cancel()
            if self._watching:
                self._watching, self._watch_down_since = False, loop.time()
            self._rotate(idx)
            await asyncio.sleep(0.05)

    def _on_watch(self, resp) -> bool:
        """Take in one watch response; True if the server canceled the watch."""
        if resp.created and not resp.canceled:
            self._watching = True
            self._watch_from = self._watch_from or resp.header.revision + 1
        if resp.compact_revision:  # events before it are gone: assume everything changed
            self._watch_from = resp.compact_revision
            self._wake(resp.compact_revision)
        nodes = self._key("nodes")
        for ev in resp.events:
            kv = ev.kv
            self._watch_from = max(self._watch_from, kv.mod_revision + 1)
            if kv.key.startswith(nodes):
                name = kv.key[len(nodes):].decode()
                old = self._digests.pop(name, None)
                if ev.type == rpc.Event.PUT:
                    beat = _json(kv.value)
                    self._digests[name] = str(beat.get("digest", "")) if isinstance(beat, dict) else ""
                    if kv.version > 1 and old == self._digests[name]:
                        continue  # only the heartbeat counter moved
            self._wake(kv.mod_revision)
        return resp.canceled

    def _wake(self, revision: int) -> None:
        self._event_rev = max(self._event_rev, revision)
        self._changed.set()

    async def close(self) -> None:
        """Stop the watch and close the connections. The lease is not revoked: the node's
        heartbeat and claims are left to expire with it."""
        self._closed = True
        if self._watch_task is not None:
            # Cancel until done: Python 3.11's asyncio.wait_for can swallow a cancel.
            while not self._watch_task.done():
                self._watch_task.cancel()
                await asyncio.wait({self._watch_task}, timeout=0.1)
            await asyncio.gather(self._watch_task, return_exceptions=True)
        for stubs in self._stubs_by_idx.values():
            await stubs.channel.close()
        self._stubs_by_idx.clear()


def _put(key: bytes, value: str, lease: int = 0):
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value.encode(), lease=lease))


def _cmp(key: bytes, target: str, **value):
    return rpc.Compare(key=key, target=getattr(rpc.Compare, target), result=rpc.Compare.EQUAL, **value)


def _json(raw: bytes):
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{exc.strerror or exc} ({exc.filename})" if isinstance(exc, OSError) else str(exc)


def _parse_claim(raw: bytes) -> tuple[str, int]:
    """"NODE:GENERATION" -> (NODE, GENERATION); ("", 0) if malformed."""
    owner, _, gen = raw.decode(errors="replace").rpartition(":")
    return (owner, int(gen)) if owner and gen.isdigit() else ("", 0)
