"""The etcd store's mirror and lease renewal, on real etcd.

read() right after publish() answers from a mirror that the publish transaction itself brought
up to the publish's revision (reconciler/store/etcd/store.py, EtcdStore._read). These tests check it
against linearizable reads by a store that never publishes (its every read() ranges over etcd):
other clients' heartbeats, statuses, claims and deletions, lease expiry, compaction, a killed
member, a dead watch, a failed publish; that a Snapshot never changes once returned; and that
the lease is renewed every TTL/4 instead of every heartbeat without ever expiring.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
import uuid

import attrs
import grpc
import pytest
from aetcd import rpc

from reconciler.published import EMPTY, GroupStatus, NodeStatus
from reconciler.store import Claim, Heartbeat, StoreError, records
from reconciler.store.etcd import mirror as etcdmirror
from reconciler.store.etcd import values
from reconciler.store.etcd import EtcdStore


def S(**marks) -> NodeStatus:
    """A status record told apart from another by `marks` (these tests compare whole records)."""
    return NodeStatus(spec_error=",".join(f"{k}={v}" for k, v in sorted(marks.items())))


class Stores:
    """Stores under one fresh prefix, all closed at the end of `run`."""

    def __init__(self, url: str):
        self.url, self.prefix, self.made = url, f"/mirror-{uuid.uuid4().hex[:12]}", []

    def new(self, url: str | None = None, **options) -> EtcdStore:
        store = EtcdStore(url or self.url, prefix=self.prefix, **options)
        self.made.append(store)
        return store

    def run(self, body):
        async def main():
            try:
                return await body()
            finally:
                for store in self.made:
                    await store.close()

        return asyncio.run(main())


async def fresh_read(store: EtcdStore):
    """A linearizable read, whatever the store's state."""
    store._fresh = 0
    return await store.read()


async def publish_read(store: EtcdStore, node: str, counter: int, **beat):
    await store.publish(Heartbeat(node=node, counter=counter, **beat))
    return await store.read()


async def kv_stub(url_endpoint: str):
    channel = grpc.aio.insecure_channel(url_endpoint)
    return channel, rpc.KVStub(channel), rpc.LeaseStub(channel)


async def compact_now(endpoint: str) -> int:
    channel, kv, _ = await kv_stub(endpoint)
    try:
        rev = (await kv.Range(rpc.RangeRequest(key=b"\0"), timeout=2)).header.revision
        await kv.Compact(rpc.CompactionRequest(revision=rev, physical=True), timeout=2)
        return rev
    finally:
        await channel.close()


# --- other clients' changes ---------------------------------------------------------------


def test_next_read_after_publish_shows_every_change_of_others(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b, c = stores.new(), stores.new(), stores.new()
        counter = 0

        async def check():
            nonlocal counter
            counter += 1
            snap = await publish_read(a, "na", counter, digest="da", status=S(me=1))
            assert snap == await c.read()  # c never publishes: every read of it ranges over etcd
            return snap

        await b.publish(Heartbeat(node="nb", counter=1, digest="d1", status=S(s=1), wall=1000.5))
        snap = await check()
        assert snap.members["nb"] == Heartbeat(node="nb", counter=1, digest="d1", status=S(s=1), wall=1000.5)
        assert snap.members["na"].status == S(me=1)
        await b.publish(Heartbeat(node="nb", counter=2, digest="d1", status=S(s=1)))
        assert (await check()).members["nb"].counter == 2
        await b.publish(Heartbeat(node="nb", counter=3, digest="d1", status=S(s=2)))
        assert (await check()).members["nb"].status == S(s=2)
        await b.publish(Heartbeat(node="nb", counter=4, digest="d2", status=S(s=2)))
        assert (await check()).members["nb"].digest == "d2"
        held = await b.claim("web", "nb")
        assert (await check()).claims == {"web": held}
        for g in ("g1", "g2", "g3"):
            await b.claim(g, "nb")
        assert set((await check()).claims) == {"web", "g1", "g2", "g3"}
        assert await b.release(held)
        assert "web" not in (await check()).claims  # a deletion: that read goes to etcd
        again = await c.claim("web", "nc")
        assert (await check()).claims["web"] == again
        assert await b.break_claim(again)
        assert "web" not in (await check()).claims
        assert a.mirror_reads >= 7 and a.full_reads <= 4, (a.mirror_reads, a.full_reads)

    stores.run(body)


def test_randomized_operations_mirror_equals_linearizable_read(etcd_single):
    stores = Stores(etcd_single.url)
    rng = random.Random(1234)

    async def body():
        a, observer = stores.new(), stores.new()
        others = {f"n{i}": stores.new() for i in range(3)}
        counters = dict.fromkeys(others, 0)
        counter = 0
        for step in range(150):
            name = rng.choice(list(others))
            store = others[name]
            op = rng.random()
            if op < 0.4:
                counters[name] += 1
                await store.publish(Heartbeat(node=name, counter=counters[name], digest=rng.choice("xy"),
                                              status=S(v=rng.randrange(3))))
            elif op < 0.6:
                await store.claim(f"g{rng.randrange(12)}", name)
            elif op < 0.75:
                snap = await observer.read()
                if snap.claims:
                    await store.break_claim(rng.choice(list(snap.claims.values())))
            elif op < 0.8:
                await a.claim(f"g{rng.randrange(12)}", "na")
            else:
                for _ in range(rng.randrange(1, 4)):  # several changes between two of a's heartbeats
                    n = rng.choice(list(others))
                    counters[n] += 1
                    await others[n].publish(Heartbeat(node=n, counter=counters[n], digest="x"))
            counter += 1
            snap = await publish_read(a, "na", counter, status=S(step=step))
            assert snap == await observer.read(), step
        assert a.mirror_reads > 100, (a.mirror_reads, a.full_reads)

    stores.run(body)


def test_lease_expiry_of_another_store_removes_its_node_and_claims(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b = stores.new(), stores.new(lease_ttl=0.5)  # b: etcd TTL 2 s
        await b.publish(Heartbeat(node="nb", counter=1, status=S(x=1)))
        claims = {g: await b.claim(g, "nb") for g in ("g1", "g2")}
        mine = await a.claim("ga", "na")
        counter = 0
        snap = await publish_read(a, "na", counter)
        assert "nb" in snap.members and {g: snap.claims[g] for g in claims} == claims
        t0 = time.monotonic()  # b stops renewing
        while "nb" in snap.members or "g1" in snap.claims or "g2" in snap.claims:
            assert time.monotonic() - t0 < 6
            await asyncio.sleep(0.1)
            counter += 1
            snap = await publish_read(a, "na", counter)
        assert 1.0 < time.monotonic() - t0
        assert snap.claims == {"ga": mine} and set(snap.members) == {"na"}
        assert snap == await fresh_read(stores.new())
        before = a.mirror_reads
        for _ in range(3):  # the mirror is whole again after the read that saw the deletions
            counter += 1
            assert await publish_read(a, "na", counter) == await fresh_read(b)
        assert a.mirror_reads == before + 3

    stores.run(body)


def test_own_lease_revoked_behind_its_back_is_granted_again(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, c = stores.new(), stores.new()
        await a.publish(Heartbeat(node="na", counter=1, status=S(x=1)))
        await a.claim("web", "na")
        channel, _, lease_stub = await kv_stub(etcd_single.endpoint(0))
        try:
            await lease_stub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=a.lease.id), timeout=2)
        finally:
            await channel.close()
        old = a.lease.id
        snap = await publish_read(a, "na", 2, status=S(x=1))  # "lease not found" on the put: a new lease
        assert a.lease.id != old
        assert snap.claims == {} and snap.members["na"].status == S(x=1)
        assert snap == await c.read()

    stores.run(body)


# --- compaction, member loss, no watch, failed publish ------------------------------------


def test_compaction_keeps_reads_exact_and_a_compacted_watch_wakes_wait(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b, c = stores.new(), stores.new(), stores.new()
        counter = 0
        for _ in range(5):
            counter += 1
            await b.publish(Heartbeat(node="nb", counter=counter))
            assert await publish_read(a, "na", counter) == await c.read()
        while not a.watch.watching:
            await a.wait(0.05)
        await compact_now(etcd_single.endpoint(0))  # the live watch does not mind
        held = await b.claim("web", "nb")
        for _ in range(3):
            counter += 1
            await b.publish(Heartbeat(node="nb", counter=counter))
            snap = await publish_read(a, "na", counter)
            assert snap == await c.read() and snap.claims == {"web": held}
        # The watch goes away; meanwhile a claim goes and the revisions it would resume from
        # are compacted. wait() opens it again, learns of the compaction, and returns at once.
        a.watch.task.cancel()
        await asyncio.wait({a.watch.task})
        assert await b.release(held)
        compacted = await compact_now(etcd_single.endpoint(0))
        t0 = time.monotonic()
        await a.wait(5)
        assert time.monotonic() - t0 < 2
        counter += 1
        snap = await publish_read(a, "na", counter)
        assert snap == await c.read() and snap.claims == {}
        t0 = time.monotonic()
        while not a.watch.watching:  # open again after the compaction, from the compaction on
            await a.wait(0.1)
            assert time.monotonic() - t0 < 3
        assert min(a.watch.resume_from) >= compacted
        task = asyncio.create_task(b.claim("web", "nb"))
        t0 = time.monotonic()
        await a.wait(5)
        assert time.monotonic() - t0 < 2 and await task is not None
        counter += 1
        assert "web" in (await publish_read(a, "na", counter)).claims

    stores.run(body)


def test_watch_member_killed_then_compaction_reads_stay_exact(etcd_cluster3):
    cluster = etcd_cluster3
    leader = cluster.leader()
    follower, other = [i for i in range(3) if i != leader]
    stores = Stores("etcd://" + ",".join(cluster.endpoint(i) for i in (follower, other, leader)))

    async def body():
        a = stores.new()
        b = stores.new("etcd://" + cluster.endpoint(leader))
        c = stores.new("etcd://" + cluster.endpoint(leader))
        counter = 1
        assert await publish_read(a, "na", counter) == await c.read()
        while not a.watch.watching:
            await a.wait(0.05)
        assert a.conn.idx == 0
        cluster.kill(follower)  # a's watch (and its connection) breaks
        held = await b.claim("web", "nb")
        await b.publish(Heartbeat(node="nb", counter=1, status=S(s=1)))
        await compact_now(cluster.endpoint(leader))
        t0 = time.monotonic()
        await a.wait(10)  # the claim, or the compaction if it came first: either wakes
        assert time.monotonic() - t0 < 4
        deadline = time.monotonic() + 5
        while True:
            counter += 1
            try:
                snap = await publish_read(a, "na", counter)
                break
            except StoreError:
                assert time.monotonic() < deadline
        assert snap == await c.read() and snap.claims == {"web": held}
        for _ in range(5):
            counter += 1
            assert await publish_read(a, "na", counter) == await c.read()
        assert a.conn.idx != 0
        t0 = time.monotonic()
        while not a.watch.watching:
            await a.wait(0.1)
            assert time.monotonic() - t0 < 5
        task = asyncio.create_task(b.release(held))
        await a.wait(5)
        assert await task and time.monotonic() - t0 < 5

    stores.run(body)


def test_killing_the_connected_member_keeps_reads_exact_and_the_lease_alive(etcd_cluster3):
    cluster = etcd_cluster3
    leader = cluster.leader()
    follower = next(i for i in range(3) if i != leader)
    order = [follower] + [i for i in range(3) if i != follower]
    stores = Stores("etcd://" + ",".join(cluster.endpoint(i) for i in order))

    async def body():
        a = stores.new(lease_ttl=0.4)  # etcd TTL 2 s: renewed every 0.5 s
        b = stores.new("etcd://" + cluster.endpoint(leader))
        c = stores.new("etcd://" + cluster.endpoint(leader))
        await a.publish(Heartbeat(node="na", counter=0))
        mine = await a.claim("mine", "na")
        lease = a.lease.id
        errors, counter = 0, 0
        t_end = time.monotonic() + 4
        killed = False
        while time.monotonic() < t_end:
            counter += 1
            if counter == 10:
                cluster.kill(follower)  # a's keepalive stream, watch and KV calls break
                killed = True
            await b.publish(Heartbeat(node="nb", counter=counter))
            if counter % 7 == 0:
                await b.claim(f"g{counter}", "nb")
            try:
                snap = await publish_read(a, "na", counter)
            except StoreError:
                errors += 1
                continue
            assert snap == await c.read(), counter
            await asyncio.sleep(0.1)
        assert killed and errors <= 3
        assert a.lease.id == lease  # renewed across the failover: its claim is still there
        assert (await c.read()).claims["mine"] == mine
        assert a.mirror_reads > 20

    stores.run(body)


def test_reads_are_exact_without_a_watch(etcd_single, monkeypatch):
    stores = Stores(etcd_single.url)

    async def body():
        a, b, c = stores.new(timeout=0.3), stores.new(), stores.new()

        async def no_watch():
            await asyncio.sleep(3600)

        monkeypatch.setattr(a.watch, "run", no_watch)
        for counter in range(1, 6):
            await b.publish(Heartbeat(node="nb", counter=counter))
            if counter == 3:
                await b.claim("web", "nb")
            assert await publish_read(a, "na", counter) == await c.read()
        assert a.mirror_reads == 5 and not a.watch.watching
        with pytest.raises(StoreError):
            await a.wait(0.4)  # but wait() says that the watch is down

    stores.run(body)


def test_failed_publish_or_second_read_reads_etcd(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b, c = stores.new(), stores.new(), stores.new()
        await publish_read(a, "na", 1)
        await b.publish(Heartbeat(node="nb", counter=1))
        # A second read after the same publish re-reads: it shows b's newer heartbeat.
        full = a.full_reads
        assert (await a.read()).members["nb"].counter == 1 and a.full_reads == full + 1
        # A publish that did not complete (cancelled by its caller's timeout) leaves nothing
        # for read() to reuse.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(a.publish(Heartbeat(node="na", counter=2)), 0.0001)
        await b.publish(Heartbeat(node="nb", counter=2))
        snap = await a.read()
        assert a.full_reads == full + 2 and snap == await c.read() and snap.members["nb"].counter == 2
        # A claim made after the publish is in the next read.
        await a.publish(Heartbeat(node="na", counter=3))
        held = await a.claim("web", "na")
        assert (await a.read()).claims == {"web": held} and a.full_reads == full + 3
        assert (await publish_read(a, "na", 4)).claims == {"web": held}
        assert a.full_reads == full + 3

    stores.run(body)


# --- snapshots ----------------------------------------------------------------------------


def test_a_snapshot_never_changes_and_unchanged_values_are_shared(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b = stores.new(), stores.new()
        await b.publish(Heartbeat(node="nb", counter=1, status=S(s=1)))
        for g in ("g1", "g2"):
            await b.claim(g, "nb")
        await publish_read(a, "na", 1)
        snap = await publish_read(a, "na", 2)
        members, claims = snap.members, snap.claims
        saved = copy.deepcopy((snap.members, snap.claims))
        await b.publish(Heartbeat(node="nb", counter=2, status=S(s=2)))
        g3 = await b.claim("g3", "nb")
        later = await publish_read(a, "na", 3)
        assert later.members["nb"].status == S(s=2) and later.claims["g3"] == g3
        assert snap.members is members and snap.claims is claims
        assert (snap.members, snap.claims) == saved
        assert later.claims["g1"] is snap.claims["g1"]  # not parsed again
        assert later.members["na"].status is snap.members["na"].status
        quiet = await publish_read(a, "na", 4)
        assert quiet.claims is later.claims  # no claim changed: the very same dict
        assert (await a.read()).claims is later.claims  # also after a full read
        assert await b.release(g3)
        gone = await publish_read(a, "na", 5)
        assert "g3" not in gone.claims and later.claims["g3"] == g3

    stores.run(body)


# --- waking and lease renewal -------------------------------------------------------------


def test_new_node_and_digest_change_wake_wait_a_counter_does_not(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b = stores.new(), stores.new()
        await publish_read(a, "na", 1)
        while not a.watch.watching:
            await a.wait(0.05)
        await publish_read(a, "na", 2)

        async def timed_wait(change) -> float:
            task = asyncio.create_task(change)
            t0 = time.monotonic()
            await a.wait(0.5)
            await task
            elapsed = time.monotonic() - t0
            await publish_read(a, "na", int(time.monotonic() * 1000))
            return elapsed

        assert await timed_wait(b.publish(Heartbeat(node="nb", counter=1, digest="d1"))) < 0.4
        assert await timed_wait(b.publish(Heartbeat(node="nb", counter=2, digest="d1"))) >= 0.45
        assert await timed_wait(b.publish(Heartbeat(node="nb", counter=3, digest="d2"))) < 0.4
        assert (await a.read()).members["nb"].digest == "d2"

    stores.run(body)


@pytest.mark.parametrize("lease_ttl", [0.4, 2.0])
def test_lease_renewed_every_quarter_ttl_not_every_heartbeat(etcd_single, lease_ttl):
    stores = Stores(etcd_single.url)

    async def body():
        a, c = stores.new(lease_ttl=lease_ttl), stores.new()
        renewals = []
        keepalive = a.lease.keepalive

        async def counted(lease, deadline):
            renewals.append(time.monotonic())
            return await keepalive(lease, deadline)

        a.lease.keepalive = counted
        await a.publish(Heartbeat(node="na", counter=0))
        held = await a.claim("web", "na")
        lease = a.lease.id
        assert a.lease.renew_every <= min(a.ttl / 4, a.ttl - lease_ttl - 0.5)
        t0 = time.monotonic()
        counter = 0
        while time.monotonic() - t0 < 2 * a.ttl:  # well past the TTL
            counter += 1
            await a.publish(Heartbeat(node="na", counter=counter))
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert a.lease.id == lease and (await c.read()).claims == {"web": held}
        # Due every _renew_every, done at the next heartbeat (100 ms apart) after that.
        assert elapsed / (a.lease.renew_every + 0.25) - 1 <= len(renewals) <= elapsed / a.lease.renew_every + 1, len(renewals)
        gaps = [b - x for x, b in zip(renewals, renewals[1:])]
        assert max(gaps) < a.lease.renew_every + 0.35

    stores.run(body)


def test_claim_found_by_a_lost_claim_is_in_the_next_read(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b = stores.new(), stores.new()
        await publish_read(a, "na", 1)
        await a.publish(Heartbeat(node="na", counter=2))
        won = await b.claim("web", "nb")  # after a's publish
        assert await a.claim("web", "na") is None
        assert (await a.read()).claims == {"web": won}
        assert Claim(group="web", node="nb", generation=won.generation, token=won.token) == won

    stores.run(body)


# --- renewal through a twin (publish_blocking / read_blocking) ----------------------------------


def test_blocking_publish_runs_a_twin_that_holds_the_lease_for_claims(etcd_single):
    """The agent's renewal thread publishes and reads through a twin on an event loop of its
    own; the main instance's claims bind to the twin's lease, its watch wakes wait() for
    another client's claim, and a twin's read counts as read for wait()."""
    stores = Stores(etcd_single.url)

    async def body():
        main, other = stores.new(lease=0.4), stores.new(lease=0.4)
        assert (await asyncio.to_thread(main.read_blocking)).members == {}  # makes the twin, which has no lease yet
        with pytest.raises(StoreError, match="no etcd lease yet"):
            await main.claim("early", "na")
        await asyncio.to_thread(main.publish_blocking, Heartbeat(node="na", counter=1))
        twin = main.twin
        assert twin is not None and twin.lease.id and twin.twin_of is main and not main.lease.id
        mine = await main.claim("web", "na")
        assert mine is not None
        snap = await asyncio.to_thread(main.read_blocking)
        assert snap.claims["web"] == mine and snap.members["na"].counter == 1
        await main.wait(0.05)  # starts the watch
        await asyncio.sleep(0.3)
        await other.publish(Heartbeat(node="nb", counter=1))  # a new node: its status wakes wait()
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await main.wait(1)
        assert time.monotonic() - t0 < 0.2  # a change not read yet
        await asyncio.to_thread(main.read_blocking)  # the twin's read counts: wait() blocks again
        t0 = time.monotonic()
        await main.wait(0.3)
        assert time.monotonic() - t0 >= 0.25
        theirs = await other.claim("db", "nb")
        t0 = time.monotonic()
        await main.wait(2)
        assert time.monotonic() - t0 < 1.5  # woken by the watch
        await asyncio.to_thread(main.publish_blocking, Heartbeat(node="na", counter=2))
        snap = await asyncio.to_thread(main.read_blocking)
        assert snap.claims["db"] == theirs
        # The claim is bound to the twin's lease: revoking that lease removes it.
        channel, _kv, lease = await kv_stub(etcd_single.endpoint(0))
        try:
            await lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=twin.lease.id), timeout=2)
        finally:
            await channel.close()
        assert "web" not in (await fresh_read(other)).claims

    stores.run(body)


# --- statuses: announced by a hash in the heartbeat, never ranged over by the heartbeat ---------


async def put_raw(endpoint: str, prefix: str, puts: dict[str, bytes | str], deletes: tuple[str, ...] = ()) -> int:
    """Write keys under `prefix` in one transaction, as another client (or an older version)
    would; returns its revision."""
    channel, kv, _ = await kv_stub(endpoint)
    try:
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=f"{prefix}/{k}".encode(),
                                                        value=v.encode() if isinstance(v, str) else v))
               for k, v in puts.items()]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=f"{prefix}/{k}".encode())) for k in deletes]
        return (await kv.Txn(rpc.TxnRequest(success=ops), timeout=2)).header.revision
    finally:
        await channel.close()


def status_value(status: NodeStatus) -> bytes:
    return records.status_text(status).encode()


def record_txns(store: EtcdStore) -> list:
    """Every publish transaction of `store` from now on: (its operations, its answer)."""
    seen = []
    txn = store.conn.txn

    async def recorded(what, compare, success, failure, deadline, attempts=None):
        resp = await txn(what, compare, success, failure, deadline, attempts)
        if what == "publish":
            seen.append((list(success), resp))
        return resp

    store.conn.txn = recorded
    return seen


def test_a_status_change_announced_by_a_heartbeat_is_in_the_next_snapshot(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b, c = stores.new(), stores.new(), stores.new()
        await b.publish(Heartbeat(node="nb", counter=1, digest="d", status=S(s=1)))
        snap = await publish_read(a, "na", 1)
        assert snap.members["nb"].status == S(s=1) and snap == await c.read()
        fetches, reads = a.fetches, a.mirror_reads
        # A heartbeat alone: nothing to fetch, the mirror answers.
        await b.publish(Heartbeat(node="nb", counter=2, digest="d", status=S(s=1)))
        snap = await publish_read(a, "na", 2)
        assert snap.members["nb"].counter == 2 and a.fetches == fetches
        # A new status (same digest): its heartbeat names another hash, and the read after
        # a's publish fetches that one key at the publish's revision.
        await b.publish(Heartbeat(node="nb", counter=3, digest="d", status=S(s=2, big="x" * 5000)))
        snap = await publish_read(a, "na", 3)
        assert snap.members["nb"].status == S(s=2, big="x" * 5000) and snap.members["nb"].counter == 3
        assert snap == await c.read()
        assert a.fetches == fetches + 1 and a.mirror_reads == reads + 2
        # Changes left unfetched by a publish without a read are fetched by the next read.
        await b.publish(Heartbeat(node="nb", counter=4, digest="d", status=S(s=3)))
        await a.publish(Heartbeat(node="na", counter=4))
        await b.publish(Heartbeat(node="nb", counter=5, digest="d", status=S(s=4)))
        await a.publish(Heartbeat(node="na", counter=5, status=S(mine=1)))
        snap = await a.read()
        assert snap.members["nb"].status == S(s=4) and snap.members["na"].status == S(mine=1)
        assert snap == await c.read() and a.mirror_reads == reads + 3
        # a's own new status is known from its own put: nothing to fetch for it.
        fetches = a.fetches
        snap = await publish_read(a, "na", 6, status=S(mine=2))
        assert snap.members["na"].status == S(mine=2) and a.fetches == fetches

    stores.run(body)


def test_the_heartbeat_transaction_never_ranges_over_status(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b, c = stores.new(), stores.new(), stores.new()
        big = NodeStatus(groups={f"g{i}": GroupStatus(actual="running", note="y" * 100) for i in range(300)})
        await b.publish(Heartbeat(node="nb", counter=1, status=big))
        for g in ("g1", "g2"):
            await b.claim(g, "nb")
        txns = record_txns(a)
        status_prefix = f"{stores.prefix}/status/".encode()
        for counter in range(1, 6):
            await b.publish(Heartbeat(node="nb", counter=counter + 1, status=attrs.evolve(big, spec_error=f"n={counter}")))
            snap = await publish_read(a, "na", counter, status=S(n=counter))
            assert snap == await c.read() and snap.members["nb"].status.spec_error == f"n={counter}"
        assert len(txns) == 5
        for ops, resp in txns:
            ranges = [op.request_range for op in ops if op.WhichOneof("request") == "request_range"]
            assert ranges
            for r in ranges:
                if r.count_only:
                    continue
                end = r.range_end or r.key + b"\0"
                # [key, end) must not reach into status/.
                assert end <= status_prefix or r.key >= status_prefix + b"\xff", (r.key, r.range_end)
            for answer in resp.responses:
                if answer.WhichOneof("response") == "response_range":
                    assert not any(kv.key.startswith(status_prefix) for kv in answer.response_range.kvs)
        assert a.fetches == 5  # nb's status, once after each change

    stores.run(body)


def test_an_old_format_heartbeat_without_a_hash_still_gets_its_status(etcd_single):
    stores = Stores(etcd_single.url)
    endpoint = etcd_single.endpoint(0)

    async def body():
        a, c = stores.new(), stores.new()

        async def old(counter, status=None):
            puts = {"nodes/nold": json.dumps({"node": "nold", "counter": counter, "digest": "d"})}
            if status is not None:
                puts["status/nold"] = status_value(status)
            await put_raw(endpoint, stores.prefix, puts)

        await old(1, S(v=1))
        snap = await publish_read(a, "na", 1)
        assert snap.members["nold"].status == S(v=1) and snap == await c.read()
        for counter in range(2, 8):
            fetches = a.fetches
            await old(counter, S(v=counter) if counter % 2 else None)
            snap = await publish_read(a, "na", counter)
            assert snap == await c.read(), counter
            assert snap.members["nold"].status == S(v=counter if counter % 2 else counter - 1)
            assert a.fetches == fetches  # the delta itself ranged over the old node's status
        # The node is upgraded: its heartbeat names the hash from now on.
        value = status_value(S(v="new"))
        await put_raw(endpoint, stores.prefix, {"status/nold": value, "nodes/nold": json.dumps(
            {"node": "nold", "counter": 9, "digest": "d", "status_hash": values.status_hash(value)})})
        snap = await publish_read(a, "na", 9)
        assert snap.members["nold"].status == S(v="new") and snap == await c.read()
        assert a.mirror_reads == 8

    stores.run(body)


def test_many_changed_statuses_and_deletions_behind_the_heartbeats_back(etcd_single):
    """More stale statuses than are fetched key by key (one range over status/ instead), the
    same for nodes without a hash, and keys deleted: claims, a status without its heartbeat,
    a node with its status. Each read after a publish still equals a linearizable read."""
    stores = Stores(etcd_single.url)
    endpoint = etcd_single.endpoint(0)

    async def body():
        a, b, c = stores.new(), stores.new(), stores.new()
        names = [f"m{i:02d}" for i in range(etcdmirror.EACH + 8)]

        async def many(counter, hashed=True):
            puts = {}
            for n in names:
                value = status_value(S(n=n, c=counter))
                beat = {"node": n, "counter": counter, "digest": "d"}
                if hashed:
                    beat["status_hash"] = values.status_hash(value)
                puts[f"nodes/{n}"], puts[f"status/{n}"] = json.dumps(beat), value
            await put_raw(endpoint, stores.prefix, puts)

        counter = 0

        async def check():
            nonlocal counter
            counter += 1
            snap = await publish_read(a, "na", counter)
            assert snap == await c.read(), counter
            return snap

        await check()
        await many(1)
        assert (await check()).members["m03"].status == S(n="m03", c=1)
        await many(2, hashed=False)
        assert (await check()).members["m03"].status == S(n="m03", c=2)
        await many(3, hashed=False)
        assert (await check()).members["m07"].status == S(n="m07", c=3)
        await many(4)
        await check()
        held = [await b.claim(g, "nb") for g in ("g1", "g2", "g3")]
        await check()
        full, fetches = a.full_reads, a.fetches
        assert await b.release(held[1])
        assert set((await check()).claims) == {"g1", "g3"}
        assert a.full_reads == full and a.fetches == fetches + 1  # only the claim names, at the publish's revision
        await put_raw(endpoint, stores.prefix, {}, deletes=("status/m05",))
        assert (await check()).members["m05"].status == EMPTY  # the status count told: all of status/ read
        assert a.fetches == fetches + 2
        await put_raw(endpoint, stores.prefix, {}, deletes=("nodes/m06", "status/m06"))
        snap = await check()
        assert "m06" not in snap.members and a.fetches == fetches + 3
        await check()
        assert a.fetches == fetches + 3 and a.full_reads == full

    stores.run(body)


def test_a_compacted_publish_revision_falls_back_to_a_read_of_its_own(etcd_single):
    stores = Stores(etcd_single.url)

    async def body():
        a, b, c = stores.new(), stores.new(), stores.new()
        await publish_read(a, "na", 1)
        await b.publish(Heartbeat(node="nb", counter=1, status=S(s=1)))
        await a.publish(Heartbeat(node="na", counter=2))  # nb's status is to be fetched at this revision
        await b.publish(Heartbeat(node="nb", counter=2, status=S(s=2)))
        await compact_now(etcd_single.endpoint(0))
        full = a.full_reads
        snap = await a.read()
        assert snap == await c.read() and snap.members["nb"].status == S(s=2)
        assert a.full_reads == full + 1

    stores.run(body)
