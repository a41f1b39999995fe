"""The etcd store: nodes coordinate through an etcd v3 cluster (3.4 or later).

Layout under the prefix (default /reconciler; a URL path, etcd://HOST:PORT/ha1, replaces it):
    nodes/NODE           heartbeat {node, counter, digest, status_hash, wall}; bound to the
                         node's lease; status_hash: etcdmirror.status_hash of status/NODE's value
    status/NODE          published status; written only together with nodes/NODE, when it (or
                         the digest) changed and with the first heartbeat under each lease;
                         bound to the lease
    claims/GROUP         "NODE:GENERATION"; created only if absent, bound to the claimer's lease
    generations/GROUP    the last generation handed out for GROUP (no lease: it only grows)

Each store instance holds one etcd lease, kept alive by `publish` (every `_renew_every`
seconds, not every heartbeat). When a node stops renewing, etcd deletes its heartbeat, status
and claims once the lease TTL has run out by the etcd leader's clock. The TTL is
ceil(lease_ttl) + 1 whole seconds, and a heartbeat is never written to a lease renewed longer
than TTL - lease_ttl - 0.5 s before, so a claim outlives its owner's own self-demotion
deadline (the start of its last successful publish + lease_ttl) by at least half a second.

A claim instance is identified by the create revision of its key (Claim.token). Release and
break delete the key in a transaction comparing that revision, so exactly one caller ends an
instance and nobody ever removes a successor (a re-created key has a new create revision).

Reading rides along with publishing. The store keeps a *mirror* (etcdmirror.Mirror) of the
heartbeats, statuses and claims at one revision; each publish transaction, after its puts,
also ranges over the nodes/ and claims/ keys modified since the mirror's revision and counts
the keys of nodes/, status/ and claims/, so its one round trip brings the mirror to the
publish's own revision (see `read` for why that is exact). It never ranges over status/: etcd
reads every key of such a range before it filters, and status documents are large. A status
changes only with its heartbeat, which names its hash: the read() right after a publish
fetches the statuses whose hash changed (and, after deletions, the key names of the kind that
lost keys), and otherwise returns the mirror without another round trip. Heartbeats, statuses
and claims are parsed only when their key changed, and an idle cluster's delta is one
heartbeat per live node. A background watch (etcdwatch: claims/ and status/, and deletions
under nodes/) wakes `wait`; peers' heartbeat counters never reach it, so it costs nothing
while the cluster idles.

Talks gRPC through aetcd's generated stubs (aetcd.Client lacks TLS, per-call deadlines,
failover and resumable watches). Every call has a deadline (`timeout`, default 1 s); within it
a call moves on to the next endpoint after UNAVAILABLE or a timed-out attempt, after it raises
StoreError. Use one instance from one event loop.

(Over ~400 lines: the claim transactions and the verified parsing of what etcd returns;
the connection is etcdconn.py, the mirror etcdmirror.py, the watch etcdwatch.py.)
"""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace
from urllib.parse import urlsplit

import attrs
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from reconciler.published import NodeStatus
from reconciler.spec import redact_url
from reconciler.store import Claim, Heartbeat, Snapshot, Store, StoreError, records
from reconciler.store.etcd import mirror as etcdmirror
from reconciler.store.etcd.conn import ConnectionMixin, LeaseGone
from reconciler.store.etcd.watch import WatchMixin

class EtcdStore(ConnectionMixin, WatchMixin, Store):
    """`url`: etcd://HOST[:PORT],HOST[:PORT]... or etcds://... (TLS with `ca`, `cert`, `key`).

    `lease_ttl` (alias `lease`): the agent's lease in seconds; `timeout`: the per-call deadline;
    `user`/`password`: etcd authentication. `mirror_reads` and `full_reads` count how read()
    calls were answered (from the last publish, or by a read of their own); `fetches` the
    round trips that fetched what a delta left out (see read).
    """

    def __init__(self, url: str, *, prefix: str = "/reconciler", lease_ttl: float | None = None,
                 lease: float | None = None, timeout: float = 1.0, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, user: str | None = None,
                 password: str | None = None):
        self._args = (url, dict(prefix=prefix, lease_ttl=lease_ttl, lease=lease, timeout=timeout, ca=ca, cert=cert,
                                key=key, user=user, password=password))
        # The renewal twin (see publish_blocking): this instance's heartbeat, lease and reads
        # on a thread and event loop of their own; `_main` is set on the twin.
        self._twin: EtcdStore | None = None
        self._main: EtcdStore | None = None
        self._tloop: asyncio.AbstractEventLoop | None = None
        parts = urlsplit(url)
        hosts = [h.strip() for h in parts.netloc.rpartition("@")[2].split(",") if h.strip()]
        shown = redact_url(url)  # the URL in every message and in .url: never its password
        if parts.scheme not in ("etcd", "etcds") or not hosts:
            raise StoreError(f"{shown}: not an etcd URL (etcd://HOST:PORT,HOST:PORT or etcds://...)")
        if (user is None) != (password is None):
            raise StoreError(f"{shown}: etcd authentication needs both user and password")
        self.url = shown
        self.endpoints = [h if h.rpartition(":")[2].isdigit() else f"{h}:2379" for h in hosts]
        self.prefix = (parts.path if parts.path.strip("/") else prefix).rstrip("/")
        seconds = max(0.0, lease_ttl if lease_ttl is not None else lease if lease is not None else 1.0)
        self.ttl = max(1, math.ceil(seconds) + 1)
        # Renew the etcd lease only this often (at most every TTL/4). A heartbeat written at t
        # finds the lease renewed after t - _renew_every, so etcd keeps the node's keys and
        # claims until after t + TTL - _renew_every >= t + lease_ttl + 0.5 s: past the owner's
        # lease deadline and its keeper's kill slack. (TTL >= lease_ttl + 1, so >= 0.25 s.)
        self._renew_every = min(self.ttl / 4, self.ttl - seconds - 0.5)
        self.timeout = timeout
        self._tls = (ca, cert, key) if parts.scheme == "etcds" else None
        self._auth = (user, password) if user is not None else None
        self._stubs_by_idx: dict[int, SimpleNamespace] = {}
        self._tokens: dict[int, str] = {}  # endpoint -> auth token
        self._idx = 0  # the endpoint in use; moves on when it fails
        self._lease, self._lease_lock = 0, asyncio.Lock()
        self._renewed_at = float("-inf")  # loop time the last keepalive or grant of _lease was sent
        self._ka: tuple[SimpleNamespace, object] | None = None  # (stubs, open LeaseKeepAlive stream)
        self._last_status: dict[str, tuple[str, str]] = {}  # node -> (status hash, digest) written under the current lease
        self._status_json: dict[str, tuple[NodeStatus, bytes, str]] = {}  # node -> (status, its JSON, hash) last published
        self._gens: dict[str, tuple[int, int]] = {}  # group -> (generation, its key's mod revision)
        self._closed = False
        self._init_watch()
        # The revision of the last publish if read() may still answer with the mirror at it
        # (0: read etcd), and the latest revision this store wrote (publish, claim, release,
        # break) or saw a claim at: a read must show it.
        self._fresh = 0
        self._floor = 0
        self.mirror_reads = self.full_reads = self.fetches = 0
        self._base = f"{self.prefix}/".encode()
        # (named without credentials: the log shows the endpoints and the prefix only)
        self._skips = records.Skips(f"{parts.scheme}://{','.join(self.endpoints)}{self.prefix}")
        self._mirror = etcdmirror.Mirror(self._base, self._skips)
        self._written: dict[str, bytes] = {}  # node -> the heartbeat value this store put last
        self._displaced: dict[str, Heartbeat] = {}  # see Snapshot.displaced

    @property
    def skipped_total(self) -> int:  # type: ignore[override]
        """Skipped entries counted by this instance's reads and by its renewal twin's."""
        return self._skips.total + (self._twin._skips.total if self._twin is not None else 0)

    # --- heartbeat ------------------------------------------------------------------------

    async def publish(self, heartbeat: Heartbeat) -> None:
        """Write this node's heartbeat (and its status if that or the digest changed), keep
        the lease alive, and bring the mirror up to this write.

        Renews the etcd lease if `_renew_every` seconds have passed since it was last renewed
        or granted (see __init__ for why that keeps the TTL guarantee), then puts the
        heartbeat and any changed status in one transaction bound to the lease: readers see
        the old or the new record, never a torn one. The heartbeat names the hash of the
        status (etcdmirror.status_hash), which is only ever written together with it. If etcd
        says the lease has expired (on the keepalive, or "lease not found" on the put), grants
        a new one and writes both keys again. The same transaction reads what changed since
        the mirror's revision (see read). Returns once the etcd quorum has committed it.
        Raises StoreError if no endpoint answers within `timeout`; then nothing is assumed
        renewed.

        The status is serialized again only if it is not the very record published last (the
        agent builds a new one when it changes).
        """
        self._fresh = 0  # until this publish has succeeded (also if it is cancelled)
        loop = asyncio.get_running_loop()
        deadline, node = loop.time() + self.timeout, heartbeat.node
        cached = self._status_json.get(node)
        if cached is None or cached[0] is not heartbeat.status:
            value = records.status_text(heartbeat.status).encode()
            cached = self._status_json[node] = (heartbeat.status, value, etcdmirror.status_hash(value))
        _, status, shash = cached
        beat = {"node": node, "counter": heartbeat.counter, "digest": heartbeat.digest, "status_hash": shash}
        if heartbeat.wall is not None:
            beat["wall"] = round(heartbeat.wall, 3)
        if heartbeat.instance:
            beat["instance"] = heartbeat.instance
        beat = json.dumps(beat, separators=(",", ":"))
        written = (shash, heartbeat.digest)
        for _ in range(3):
            lease = self._lease
            if lease and (sent := loop.time()) - self._renewed_at >= self._renew_every:
                if await self._keepalive(lease, deadline):
                    if self._lease == lease:
                        self._renewed_at = max(self._renewed_at, sent)
                else:
                    self._drop_lease(lease)
            lease = await self._ensure_lease(deadline)
            # prev_kv: the record this put replaces (Snapshot.displaced: a twin's, if not ours)
            ops = [_put(self._key("nodes", node), beat, lease, prev_kv=bool(heartbeat.instance))]
            # A new digest rewrites the status too: its watch is what wakes the peers.
            put_status = self._last_status.get(node) != written
            if put_status:
                ops.append(_put(self._key("status", node), status, lease))
            delta = self._mirror.delta_ops()  # its ranges see the puts above
            try:
                resp = await self._txn("publish", [], ops + delta.ops, [], deadline)
            except LeaseGone:
                self._drop_lease(lease)
                continue
            if self._lease == lease:
                self._last_status[node] = written
            if heartbeat.instance:
                self._note_displaced(node, resp.responses[0].response_put.prev_kv.value, beat.encode())
            rev = resp.header.revision
            self._floor = max(self._floor, rev)
            if self._mirror.advance(delta, rev, resp.responses[len(ops):], {node: status} if put_status else None):
                self._fresh = rev
            self._ensure_watch()
            return
        raise self._error("publish", "the lease keeps expiring")

    def _note_displaced(self, node: str, prev: bytes, mine: bytes) -> None:
        last, self._written[node] = self._written.get(node), mine
        hb = etcdmirror._heartbeat(node, etcdmirror._json(prev), {}) if prev and prev != last else None
        if isinstance(hb, Heartbeat):
            self._displaced[node] = hb
        else:
            self._displaced.pop(node, None)

    # --- reading --------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        """_read(), with the entries it skipped counted (Store.skipped_total) and the records
        the last publish replaced (Snapshot.displaced)."""
        snap = await self._read()
        self._skips.total += len(snap.skipped)
        if self._displaced:
            snap = attrs.evolve(snap, displaced=dict(self._displaced))
        return snap

    async def _read(self) -> Snapshot:
        """Every heartbeat, status and claim, at one revision. Raises StoreError if no
        endpoint answers within `timeout`.

        The first read() after a successful publish() returns the mirror as that publish's
        transaction left it, unless this store has since written (claim, release, break) or
        seen a claim at a later revision. That state is exactly what a linearizable read at
        the publish's revision P returns. The transaction ranged over the nodes/ and claims/
        keys modified after the mirror's revision M and counted the keys of nodes/, status/
        and claims/, at P. A key not in that delta was not modified after M, so it has the
        value the mirror holds -- unless it was deleted: if the mirror's keys of a kind not
        in the delta outnumber the counted ones, this read first reads that kind's key names
        at P. A status is written only in the transaction that also writes its node's
        heartbeat, which names the status's hash: so a status not modified after M belongs
        to a heartbeat not in the delta, or to one naming the hash of the status the mirror
        holds. The statuses of the other heartbeats in the delta (a new hash, or a heartbeat
        of an older version that names none; the delta ranged over the latter's statuses
        itself) this read fetches at P, one key each, before it returns; and if the statuses
        it then holds do not number the counted ones, all of status/ at P. Only in those
        cases does it cost a round trip. So it is as fresh as the read the agent used to
        issue right after its publish; only a write that another client commits in between
        those two calls is left to the next heartbeat.

        Any other read() -- a second one after the same publish, after a failed or unfinished
        publish, or with no publish at all -- brings the mirror to the current revision the
        same way, with the delta in a read-only (linearizable) transaction of its own; with
        no mirror yet (or if that fails, e.g. P was compacted meanwhile), it reads every key
        under the prefix in one linearizable range, which replaces the mirror as a whole (at
        that revision, never mixed with another). `mirror_reads` counts the former reads,
        `full_reads` the latter, `fetches` the round trips for what a delta left out.

        The Snapshot is never changed afterwards (the mirror copies a dict a snapshot holds
        before it changes it); heartbeats, statuses and claims that did not change are the
        same objects as in earlier snapshots: treat them as read-only.
        """
        if self._closed:
            raise self._error("read", "store closed")
        fresh, self._fresh = self._fresh, 0
        floor = max(self._floor, self._main._floor if self._main is not None else 0)  # the main's claims too
        deadline = self._deadline()
        try:
            if fresh and fresh == self._mirror.rev and floor <= fresh and await self._settle(deadline):
                self.mirror_reads += 1
                self._note_read(fresh)
                return self._mirror.snapshot()
            self.full_reads += 1
            if self._mirror.rev:
                delta = self._mirror.delta_ops()
                resp = await self._txn("read", [], delta.ops, [], deadline)
                rev = resp.header.revision
                if self._mirror.advance(delta, rev, resp.responses) and await self._settle(deadline) \
                        and self._mirror.rev == rev:
                    self._note_read(rev)
                    return self._mirror.snapshot()
            return await self._read_full(deadline)
        finally:
            self._ensure_watch()

    async def _settle(self, deadline: float) -> bool:
        """Read what the mirror lacks at its revision (Mirror.fetch_ops), if anything. False
        if it could not: the mirror changed meanwhile, or its revision was compacted (or not
        yet applied by the member now in use)."""
        for _ in range(2):  # the second: all of status/, if the statuses did not add up
            if not self._mirror.pending:
                return True
            fetch = self._mirror.fetch_ops()
            request = rpc.TxnRequest(success=fetch.ops)

            async def call(stubs, timeout, md):
                try:
                    return await stubs.kv.Txn(request, timeout=timeout, metadata=md)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.OUT_OF_RANGE:  # compacted, or not applied there yet
                        return None
                    raise

            resp = await self._call("read", call, deadline)
            self.fetches += 1
            if resp is None or not self._mirror.apply_fetch(fetch, resp.responses):
                return False
        return not self._mirror.pending

    async def _read_full(self, deadline: float) -> Snapshot:
        """The linearizable read: one range over the prefix; it replaces the mirror if newer."""
        request = rpc.RangeRequest(key=self._base, range_end=prefix_range_end(self._base))
        resp = await self._call("read", lambda s, t, md: s.kv.Range(request, timeout=t, metadata=md), deadline)
        rev = resp.header.revision
        self._note_read(rev)
        parsed = self._mirror.parse_all(resp.kvs)
        if rev < self._mirror.rev:  # a publish answered meanwhile moved the mirror past this read
            return Snapshot(members=parsed[2], claims=parsed[3], skipped=tuple(sorted(parsed[5])))
        self._mirror.install(rev, parsed)
        return self._mirror.snapshot()

    # --- claims ---------------------------------------------------------------------------

    async def claim(self, group: str, node: str) -> Claim | None:
        """Create the claim on `group` for `node` if absent, bound to this store's lease.

        One transaction compares that the claim key does not exist and that generations/GROUP
        is unchanged since we read it, then bumps the generation and creates the claim: among
        concurrent claimers exactly one succeeds, and generations only grow. Returns None if a
        claim exists. If an attempt of this call timed out but was applied (the claim carries
        this store's lease and `node`), returns that claim. Raises StoreError if no endpoint
        answers within `timeout`. The next read() shows the claim made or found.
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
            except LeaseGone:
                self._drop_lease(lease)
                continue
            if resp.succeeded:
                rev = resp.header.revision  # both keys were written at this revision
                self._floor = max(self._floor, rev)
                self._gens[group] = (gen + 1, rev)
                return Claim(group=group, node=node, generation=gen + 1, token=str(rev))
            current, gens = (r.response_range.kvs for r in resp.responses)
            last = gens[0].value if gens else b"0"
            if not (last.isdigit() and len(last) < 20):  # read as 0, the fencing token would go backwards
                raise self._error(f"claim {group}", f"generations/{group} holds {last[:20]!r}, not a generation: "
                                  "claims of it are refused until it is repaired")
            self._gens[group] = (int(last), gens[0].mod_revision if gens else 0)
            if current:
                self._floor = max(self._floor, current[0].mod_revision)
                owner, cgen = etcdmirror.parse_claim(current[0].value)
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
        if resp.succeeded:  # the next read() must not show the claim any more
            self._floor = max(self._floor, resp.header.revision)
        return bool(resp.succeeded)

    # --- renewal off the event loop ---------------------------------------------------------

    blocking_publish = True

    def publish_blocking(self, heartbeat: Heartbeat) -> None:
        """publish() from the agent's renewal thread (reconciler/renewal.py).

        A gRPC channel belongs to the event loop it was made on, so the calling thread gets
        a twin of this store on an event loop of its own; the twin holds the node's etcd
        lease and keeps it alive, and this instance's claims bind to that lease (a claim
        before the first heartbeat fails with StoreError). Call it, and read_blocking, from
        one thread at a time.
        """
        self._in_twin(lambda twin: twin.publish(heartbeat))

    def read_blocking(self) -> Snapshot:
        """read() from the renewal thread, by the twin (see publish_blocking)."""
        return self._in_twin(lambda twin: twin.read())

    def _in_twin(self, call):
        if self._closed:
            raise self._error("publish", "store closed")
        if self._tloop is None:
            self._tloop = asyncio.new_event_loop()
        if self._twin is None:
            url, options = self._args
            twin = EtcdStore(url, **options)
            twin._main = self
            self._twin = twin
        return self._tloop.run_until_complete(call(self._twin))

    async def close(self) -> None:
        """Stop the watch and close the connections. The lease is not revoked: the node's
        heartbeat and claims are left to expire with it."""
        if self._twin is not None and self._tloop is not None:
            # The twin's loop is idle by now (the renewal thread has stopped): run its close
            # on a worker thread, as this thread already runs a loop.
            twin, tloop = self._twin, self._tloop
            await asyncio.to_thread(lambda: (tloop.run_until_complete(twin.close()), tloop.close()))
            self._twin = self._tloop = None
        self._closed = True
        await self._stop_watch()
        self._drop_keepalive()
        for stubs in self._stubs_by_idx.values():
            await stubs.channel.close()
        self._stubs_by_idx.clear()


def _put(key: bytes, value: str | bytes, lease: int = 0, prev_kv: bool = False):
    value = value.encode() if isinstance(value, str) else value
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease, prev_kv=prev_kv))


def _cmp(key: bytes, target: str, **value):
    return rpc.Compare(key=key, target=getattr(rpc.Compare, target), result=rpc.Compare.EQUAL, **value)

