"""The etcd store: nodes coordinate through an etcd v3 cluster (3.4 or later).

Layout under the prefix (default /reconciler; a URL path, etcd://HOST:PORT/ha1, replaces it):
    nodes/NODE           heartbeat {node, counter, digest, status_hash, wall}; bound to the
                         node's lease; status_hash: values.status_hash of status/NODE's value
    status/NODE          published status; written only together with nodes/NODE, when it (or
                         the digest) changed and with the first heartbeat under each lease;
                         bound to the lease
    claims/GROUP         "NODE:GENERATION"; created only if absent, bound to the claimer's lease
    generations/GROUP    the last generation handed out for GROUP (no lease: it only grows)
    spec/head, spec/rev/NNNNNNNNNN   the cluster spec's revisions (specs.py; no lease)
    events/head, events/e/N...       the cluster's history (events.py; no lease)

Each store instance holds one etcd lease (lease.py), kept alive by `publish` (every
`lease.renew_every` seconds, not every heartbeat). When a node stops renewing, etcd deletes
its heartbeat, status and claims once the lease TTL has run out by the etcd leader's clock.
The TTL is ceil(lease_ttl) + 1 whole seconds, and a heartbeat is never written to a lease
renewed longer than TTL - lease_ttl - 0.5 s before, so a claim outlives its owner's own
self-demotion deadline (the start of its last successful publish + lease_ttl) by at least
half a second. A claim instance is identified by its key's create revision (claims.py).

Reading rides along with publishing: each publish transaction also brings the store's
*mirror* (mirror.py) of the heartbeats, statuses and claims up to its own revision, so the
read() right after a publish usually costs no round trip of its own (`_read` says why that is
exact). A background watch (watch.py: claims/ and status/, and deletions under nodes/) wakes
`wait`; peers' heartbeat counters never reach it, so it costs nothing while the cluster idles.

Talks gRPC through aetcd's generated stubs (aetcd.Client lacks TLS, per-call deadlines,
failover and resumable watches). Every call has a deadline (`timeout`, default 1 s); within it
a call moves on to the next endpoint after UNAVAILABLE or a timed-out attempt, after it raises
StoreError. Use one instance from one event loop.

The store composes its parts, each given what it needs when it is made: conn.py, lease.py,
watch.py, mirror.py, claims.py, specs.py, intents.py and twin.py; values.py parses what etcd holds.
(About 450 lines: what is left here is the Store contract's methods, each a few lines that
delegate, and the publish and read transactions with their freshness argument.)
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from reconciler.published import EMPTY, Event, Intent, NodeStatus, SpecRevision
from reconciler.spec import redact_url
from reconciler.store import EVENTS_KEEP, EVENTS_MAX_AGE, Claim, Heartbeat, Snapshot, Store, StoreError, records
from reconciler.store.etcd import values
from reconciler.store.etcd.claims import Claims
from reconciler.store.etcd.intents import Intents
from reconciler.store.etcd.conn import Connection, LeaseGone, put_op
from reconciler.store.etcd.events import Events
from reconciler.store.etcd.lease import Lease
from reconciler.store.etcd.mirror import Mirror
from reconciler.store.etcd.specs import Specs
from reconciler.store.etcd.twin import Twin
from reconciler.store.etcd.watch import Watch


class EtcdStore(Store):
    """`url`: etcd://HOST[:PORT],HOST[:PORT]... or etcds://... (TLS with `ca`, `cert`, `key`).

    `lease_ttl` (alias `lease`): the agent's lease in seconds; `timeout`: the per-call deadline;
    `user`/`password`: etcd authentication. `mirror_reads` and `full_reads` count how read()
    calls were answered (from the last publish, or by a read of their own); `fetches` the
    round trips that fetched what a delta left out (see read). `twin_of` is for this class
    only: the instance a renewal twin renews for (see publish_blocking).
    """

    def __init__(self, url: str, *, prefix: str = "/reconciler", lease_ttl: float | None = None,
                 lease: float | None = None, timeout: float = 1.0, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, user: str | None = None,
                 password: str | None = None, twin_of: EtcdStore | None = None):
        options: dict[str, Any] = dict(prefix=prefix, lease_ttl=lease_ttl, lease=lease, timeout=timeout, ca=ca,
                                       cert=cert, key=key, user=user, password=password)
        # The renewal twin (see publish_blocking): this instance's heartbeat, lease and reads
        # on a thread and event loop of their own; `twin_of` is set on the twin.
        self._renewal: Twin[EtcdStore] = Twin(lambda: EtcdStore(url, **options, twin_of=self))
        self.twin_of = twin_of
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
        self.timeout = timeout
        self.conn = Connection(url=shown, endpoints=self.endpoints, prefix=self.prefix, timeout=timeout,
                               tls=(ca, cert, key) if parts.scheme == "etcds" else None,
                               auth=(user, password) if user is not None and password is not None else None)
        # Renew the etcd lease only this often (at most every TTL/4). A heartbeat written at t
        # finds the lease renewed after t - renew_every, so etcd keeps the node's keys and
        # claims until after t + TTL - renew_every >= t + lease_ttl + 0.5 s: past the owner's
        # lease deadline and its keeper's kill slack. (TTL >= lease_ttl + 1, so >= 0.25 s.)
        self.lease = Lease(self.conn, ttl=self.ttl, renew_every=min(self.ttl / 4, self.ttl - seconds - 0.5))
        # A twin's reads count for the watch of the instance it renews for, which serves
        # wait(); the twin runs no watch of its own.
        self.watch: Watch = Watch(self.conn) if twin_of is None else twin_of.watch
        self._claims = Claims(self.conn)
        self._specs = Specs(self.conn)
        self._intents = Intents(self.conn)
        # node -> (lease, status hash, digest) last written: a status is written again under
        # a new lease (its keys went with the old one) and when it or the digest changed.
        self._last_status: dict[str, tuple[int, str, str]] = {}
        self._status_json: dict[str, tuple[NodeStatus, bytes, str]] = {}  # node -> (status, its JSON, hash) last published
        # The revision of the last publish if read() may still answer with the mirror at it
        # (0: read etcd), and the latest revision this store wrote (publish, claim, release,
        # break) or saw a claim at: a read must show it.
        self._fresh = 0
        self.floor = 0
        self.mirror_reads = self.full_reads = self.fetches = 0
        self._base = f"{self.prefix}/".encode()
        # (named without credentials: the log shows the endpoints and the prefix only)
        self._skips = records.Skips(f"{parts.scheme}://{','.join(self.endpoints)}{self.prefix}")
        self._mirror = Mirror(self._base, self._skips)
        self._events = Events(self.conn, self._skips)
        self._written: dict[str, bytes] = {}  # node -> the heartbeat value this store put last
        self._displaced: dict[str, Heartbeat] = {}  # see Snapshot.displaced

    @property
    def skipped_total(self) -> int:  # type: ignore[override]
        """Skipped entries counted by this instance's reads and by its renewal twin's."""
        twin = self._renewal.store
        return self._skips.total + (twin.skipped_total if twin is not None else 0)

    @property
    def twin(self) -> EtcdStore | None:
        """The renewal twin, once publish_blocking or read_blocking has made it."""
        return self._renewal.store

    async def _bound_lease(self, deadline: float) -> int:
        """The lease this instance's keys bind to: its own, granted if need be, or once it
        has a renewal twin, the twin's (the node's one lease, which the twin keeps alive)."""
        if (twin := self._renewal.store) is not None:
            if not twin.lease.id:
                raise self.conn.error("claim", "no etcd lease yet (the heartbeat has not been published)")
            return twin.lease.id
        return await self.lease.ensure(deadline)

    def _lease_gone(self, lease: int) -> None:
        self.lease.drop(lease)  # (a twin's lease: the twin's next heartbeat finds out itself)

    def _ensure_watch(self) -> None:
        if self.twin_of is None:
            self.watch.ensure()

    async def wait(self, timeout: float) -> None:
        """Return when the store changed after the last read(), or after `timeout` seconds;
        StoreError if the watch is down (Watch.wait)."""
        if self.twin_of is not None:
            raise self.conn.error("wait", "a renewal twin has no watch")
        await self.watch.wait(timeout)

    # --- heartbeat ------------------------------------------------------------------------

    async def publish(self, heartbeat: Heartbeat) -> None:
        """Write this node's heartbeat (and its status if that or the digest changed), keep
        the lease alive, and bring the mirror up to this write.

        Renews the etcd lease if `lease.renew_every` seconds have passed since it was last
        renewed or granted (see __init__ for why that keeps the TTL guarantee), then puts the
        heartbeat and any changed status in one transaction bound to the lease: readers see
        the old or the new record, never a torn one. The heartbeat names the hash of the
        status (values.status_hash), which is only ever written together with it. If etcd
        says the lease has expired (on the keepalive, or "lease not found" on the put), grants
        a new one and writes both keys again. The same transaction reads what changed since
        the mirror's revision (see read). Returns once the etcd quorum has committed it.
        Raises StoreError if no endpoint answers within `timeout`; then nothing is assumed
        renewed.

        The status is serialized again only if it is not the very dict published last: treat
        a published status as read-only (the agent builds a new one when it changes).
        """
        self._fresh = 0  # until this publish has succeeded (also if it is cancelled)
        loop = asyncio.get_running_loop()
        deadline, node = loop.time() + self.timeout, heartbeat.node
        cached = self._status_json.get(node)
        if cached is None or cached[0] is not heartbeat.status:
            value = records.status_text(heartbeat.status).encode()
            cached = self._status_json[node] = (heartbeat.status, value, values.status_hash(value))
        _, status, shash = cached
        record: dict[str, object] = {"node": node, "counter": heartbeat.counter, "digest": heartbeat.digest,
                                     "status_hash": shash}
        if heartbeat.wall is not None:
            record["wall"] = round(heartbeat.wall, 3)
        if heartbeat.instance:
            record["instance"] = heartbeat.instance
        beat = json.dumps(record, separators=(",", ":"))
        for _ in range(3):
            await self.lease.renew_if_due(deadline)
            lease = await self._bound_lease(deadline)
            # prev_kv: the record this put replaces (Snapshot.displaced: a twin's, if not ours)
            ops = [put_op(self.conn.key("nodes", node), beat, lease, prev_kv=bool(heartbeat.instance))]
            # A new digest rewrites the status too: its watch is what wakes the peers.
            written = (lease, shash, heartbeat.digest)
            put_status = self._last_status.get(node) != written
            if put_status:
                ops.append(put_op(self.conn.key("status", node), status, lease))
            delta = self._mirror.delta_ops()  # its ranges see the puts above
            try:
                resp = await self.conn.txn("publish", [], ops + delta.ops, [], deadline)
            except LeaseGone:
                self._lease_gone(lease)
                continue
            if self.lease.id == lease:
                self._last_status[node] = written
            if heartbeat.instance:
                self._note_displaced(node, resp.responses[0].response_put.prev_kv.value, beat.encode())
            rev = resp.header.revision
            self.floor = max(self.floor, rev)
            if self._mirror.advance(delta, rev, resp.responses[len(ops):], {node: status} if put_status else None):
                self._fresh = rev
            self._ensure_watch()
            return
        raise self.conn.error("publish", "the lease keeps expiring")

    def _note_displaced(self, node: str, prev: bytes, mine: bytes) -> None:
        last, self._written[node] = self._written.get(node), mine
        hb = values.parse_heartbeat(node, values.parse_json(prev), EMPTY) if prev and prev != last else None
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
        if self.conn.closed:
            raise self.conn.error("read", "store closed")
        fresh, self._fresh = self._fresh, 0
        floor = max(self.floor, self.twin_of.floor if self.twin_of is not None else 0)  # the main's claims too
        deadline = self.conn.deadline()
        try:
            if fresh and fresh == self._mirror.rev and floor <= fresh and await self._settle(deadline):
                self.mirror_reads += 1
                self.watch.note_read(fresh)
                return self._mirror.snapshot()
            self.full_reads += 1
            if self._mirror.rev:
                delta = self._mirror.delta_ops()
                resp = await self.conn.txn("read", [], delta.ops, [], deadline)
                rev = resp.header.revision
                if self._mirror.advance(delta, rev, resp.responses) and await self._settle(deadline) \
                        and self._mirror.rev == rev:
                    self.watch.note_read(rev)
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

            resp = await self.conn.call("read", call, deadline)
            self.fetches += 1
            if resp is None or not self._mirror.apply_fetch(fetch, resp.responses):
                return False
        return not self._mirror.pending

    async def _read_full(self, deadline: float) -> Snapshot:
        """The linearizable read: nodes/, status/, claims/ and spec/head in one transaction
        (not the spec's revisions: up to KEEP whole specs, which spec_get reads; nor the
        generations: a role limited to what the agent uses may leave the rest out); it
        replaces the mirror if newer."""
        keys = [self.conn.key(kind) for kind in ("nodes", "status", "claims", "intents")]
        ranges = [(k, prefix_range_end(k)) for k in keys] + [(self._specs.head, b"")]
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k, range_end=e)) for k, e in ranges]
        resp = await self.conn.txn("read", [], ops, [], deadline)
        rev = resp.header.revision
        self.watch.note_read(rev)
        parsed = self._mirror.parse_all([kv for r in resp.responses for kv in r.response_range.kvs])
        if rev < self._mirror.rev:  # a publish answered meanwhile moved the mirror past this read
            return Snapshot(members=parsed[2], claims=parsed[3], skipped=tuple(sorted(parsed[5])), spec_revision=parsed[6],
                            intents=parsed[7])
        self._mirror.install(rev, parsed)
        return self._mirror.snapshot()

    # --- claims (claims.py) ----------------------------------------------------------------

    async def claim(self, group: str, node: str, *, outlive_owner: bool = False) -> Claim | None:
        """Create the claim on `group` for `node` if absent, bound to this store's lease
        (Claims.claim), or to no lease if `outlive_owner` (Store.claim: a fenced group's
        claim must be broken, after fencing, never expire). Returns None if a claim exists, or the claim an attempt of this call
        made that timed out but was applied. Raises StoreError if no endpoint answers within
        `timeout`. The next read() shows the claim made or found.
        """
        deadline = self.conn.deadline()
        attempts: list[str] = []
        while True:
            lease = 0 if outlive_owner else await self._bound_lease(deadline)
            try:
                made, rev = await self._claims.claim(group, node, lease=lease, deadline=deadline, attempts=attempts)
            except LeaseGone:
                self._lease_gone(lease)
                continue
            self.floor = max(self.floor, rev)
            return made

    records_expire = True  # a node's keys go with its etcd lease

    async def forget(self, node: str) -> bool:
        """Store.forget: nodes/NODE and status/NODE deleted in one transaction."""
        ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self.conn.key(kind, node)))
               for kind in ("nodes", "status")]
        resp = await self.conn.txn(f"forget {node}", [], ops, [], asyncio.get_running_loop().time() + self.timeout)
        self.floor = max(self.floor, resp.header.revision)  # the next read() must not show it any more
        return any(r.response_delete_range.deleted for r in resp.responses)

    async def release(self, claim: Claim) -> bool:
        """The owner deletes its claim instance (Claims.end): True if this call removed it; a
        stale owner never removes a successor's claim. Raises StoreError if no endpoint
        answers within `timeout`."""
        return await self._end("release", claim)

    async def break_claim(self, claim: Claim) -> bool:
        """Another node deletes a dead owner's claim instance (Claims.end): among concurrent
        breakers of one instance exactly one succeeds, and a replaced instance is never
        touched. Raises StoreError if no endpoint answers within `timeout`."""
        return await self._end("break", claim)

    async def _end(self, what: str, claim: Claim) -> bool:
        ended, rev = await self._claims.end(what, claim)
        self.floor = max(self.floor, rev)  # the next read() must not show the claim any more
        return ended

    # --- operator intents (intents.py) and hand-over (claims.py) ---------------------------

    async def intent_put(self, intent: Intent) -> Intent:
        """Store.intent_put (Intents.put): one put; the next read() shows it."""
        self.floor = max(self.floor, await self._intents.put(intent))
        return intent

    async def intent_delete(self, key: str, *, token: str) -> bool:
        """Store.intent_delete (Intents.delete): only the instance whose id is `token`, as the
        mirror (read again if it does not hold it) has it."""
        current = self._mirror.intents.get(key)
        if current is None or current.id != token:
            await self.read()
            current = self._mirror.intents.get(key)
            if current is None or current.id != token:
                return False
        gone, rev = await self._intents.delete(current)
        self.floor = max(self.floor, rev)
        return gone

    async def hand_over(self, claim: Claim, node: str, *, outlive_owner: bool = False) -> Claim | None:
        """Store.hand_over (Claims.hand_over): the claim is put again for `node`, bound to the
        lease of `node`'s heartbeat (as its own claim would be), in one transaction that checks
        the instance and that lease; None if either changed."""
        lease = self._mirror.leases.get(node)
        if not lease:
            await self.read()
            lease = self._mirror.leases.get(node)
            if not lease:
                return None  # no live heartbeat of `node`: nothing to bind its claim to
        handed, rev = await self._claims.hand_over(claim, node, lease=lease, node_key=self.conn.key("nodes", node),
                                                   bind=not outlive_owner)
        self.floor = max(self.floor, rev)
        return handed

    # --- the cluster spec (specs.py) ------------------------------------------------------

    async def spec_get(self, number: int | None = None) -> SpecRevision | None:
        """Store.spec_get (Specs.get): one linearizable round trip; a malformed spec/head or
        revision key is a StoreError naming it."""
        return await self._specs.get(number)

    async def spec_put(self, revision: SpecRevision) -> SpecRevision:
        """Store.spec_put (Specs.put): one transaction; the next read() shows the number."""
        stored, rev = await self._specs.put(revision)
        self.floor = max(self.floor, rev)
        return stored

    async def spec_history(self) -> list[SpecRevision]:
        """Store.spec_history (Specs.history): one range, newest first."""
        return await self._specs.history()

    async def events_append(self, events: Sequence[Event], *, keep: int = EVENTS_KEEP,
                            max_age: float = EVENTS_MAX_AGE) -> list[Event]:
        """Store.events_append (events.py): a transaction per batch on events/head."""
        return await self._events.append(list(events), keep, max_age)

    async def events_read(self, *, after: int = 0, limit: int = 1000) -> list[Event]:
        """Store.events_read (events.py): one range over events/e/."""
        return await self._events.read(after, limit)

    # --- renewal off the event loop ---------------------------------------------------------

    def publish_blocking(self, heartbeat: Heartbeat) -> None:
        """publish() from the agent's renewal thread (reconciler/cluster/renewal.py).

        A gRPC channel belongs to the event loop it was made on, so the calling thread gets
        a twin of this store on an event loop of its own (twin.py); the twin holds the node's
        etcd lease and keeps it alive, and this instance's claims bind to that lease (a claim
        before the first heartbeat fails with StoreError). Call it, and read_blocking, from
        one thread at a time.
        """
        self._in_twin(lambda twin: twin.publish(heartbeat))

    def read_blocking(self) -> Snapshot:
        """read() from the renewal thread, by the twin (see publish_blocking): it shows the
        claims this instance made as well."""
        return self._in_twin(lambda twin: twin.read())

    def _in_twin(self, call):
        if self.conn.closed:
            raise self.conn.error("publish", "store closed")
        return self._renewal.run(call)

    async def close(self) -> None:
        """Stop the watch and close the connections. The lease is not revoked: the node's
        heartbeat and claims are left to expire with it."""
        await self._renewal.close(lambda twin: twin.close())
        self.conn.refuse()
        if self.twin_of is None:
            await self.watch.stop()  # (a twin's is the main instance's)
        self.lease.close()
        await self.conn.close()

