"""The Store contract, run against every backend (directory and a real etcd), plus the
etcd-only behaviour: member loss, watch resumption and lease expiry.

Tests drive the stores with asyncio.run (no pytest-asyncio); every store a test makes is
closed in the same event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from etcd_cluster import free_port
from reconciler.published import EMPTY, EntryStatus, GroupStatus, NodeStatus
from reconciler.store import Claim, Heartbeat, StoreError
from reconciler.store.factory import open_store


def S(**marks) -> NodeStatus:
    """A status record told apart from another by `marks` (these tests compare whole records)."""
    return NodeStatus(spec_error=",".join(f"{k}={v}" for k, v in sorted(marks.items())))


class Backend:
    def __init__(self, kind: str, url: str, *, create: bool = True, **options):
        self.kind, self.url, self.options = kind, url, options
        self.create = create
        self.stores = []

    def new(self, url: str | None = None, **options):
        url = url or self.url
        store = open_store(url, **{**self.options, **options}) if self.kind == "etcd" else open_store(url)
        if self.kind == "dir" and self.create:
            store.create()  # what the agent's start-up does (setup()): nothing else creates it
        self.stores.append(store)
        return store

    def run(self, body):
        async def main():
            try:
                return await body()
            finally:
                for store in self.stores:
                    await store.close()
                self.stores.clear()

        return asyncio.run(main())


@pytest.fixture(params=["dir", "etcd"])
def backend(request, tmp_path):
    if request.param == "dir":
        return Backend("dir", f"dir:{tmp_path / 'store'}")
    cluster = request.getfixturevalue("etcd_single")
    return Backend("etcd", cluster.url, prefix=f"/test-{uuid.uuid4().hex[:12]}")


def etcd_backend(url: str, **options) -> Backend:
    return Backend("etcd", url, prefix=f"/test-{uuid.uuid4().hex[:12]}", **options)


# --- heartbeats ---------------------------------------------------------------------------


def test_publish_read_round_trip(backend):
    async def body():
        s = backend.new()
        hb = Heartbeat(node="n1", counter=7, digest="abc", status=NodeStatus(digest="d1", groups={"web": GroupStatus(actual="run", entries={"s": EntryStatus(state="running", pid=12)})}))
        await s.publish(hb)
        snap = await s.read()
        assert snap.members == {"n1": hb}
        assert snap.claims == {}

    backend.run(body)


def test_forget_removes_a_nodes_record_for_every_reader(backend):
    """Store.forget (`reconcile forget`): the node's heartbeat and status are gone for this
    store and another; the others' records and the claims stay; a second forget finds none."""
    async def body():
        a, b = backend.new(), backend.new()
        await a.publish(Heartbeat(node="n3", counter=1, digest="d", status=S(n=3)))
        await b.publish(Heartbeat(node="n1", counter=1, digest="d", status=S(n=1)))
        claim = await b.claim("web", "n1")
        assert set((await b.read()).members) == {"n1", "n3"}
        assert await b.forget("n3") is True
        await a.read()  # (another store's write shows by the next read: Store.read)
        for store in (a, b):
            snap = await store.read()
            assert set(snap.members) == {"n1"} and snap.members["n1"].status == S(n=1)
            assert snap.claims == {"web": claim}
        assert await b.forget("n3") is False
        assert set((await backend.new().read()).members) == {"n1"}  # (a fresh reader, no cache)

    backend.run(body)


def test_counter_visible_to_second_instance(backend):
    async def body():
        a, b = backend.new(), backend.new()
        for counter in range(1, 6):
            await a.publish(Heartbeat(node="n1", counter=counter, digest="d"))
            assert (await b.read()).members["n1"].counter == counter

    backend.run(body)


def test_status_rewritten_only_when_changed_is_invisible(backend):
    async def body():
        a, b = backend.new(), backend.new()
        seen = []
        for counter, status in enumerate([S(s=1), S(s=1), S(s=2), S(s=2), S(s=1), EMPTY], 1):
            await a.publish(Heartbeat(node="n1", counter=counter, digest="d", status=status))
            hb = (await b.read()).members["n1"]
            seen.append((hb.counter, hb.status))
        assert seen == [(1, S(s=1)), (2, S(s=1)), (3, S(s=2)), (4, S(s=2)), (5, S(s=1)), (6, EMPTY)]
        # A restarted agent (new instance, empty cache) publishes its status again.
        c = backend.new()
        await c.publish(Heartbeat(node="n1", counter=7, digest="d", status=S(s=3)))
        assert (await b.read()).members["n1"].status == S(s=3)

    backend.run(body)


def test_blocking_publish_and_read_from_another_thread(backend):
    """The pair the agent renews its lease with, from a thread of its own: what
    publish_blocking wrote, read_blocking and read() (of this store and of another) show,
    and read_blocking shows the claims made on the event loop."""

    async def body():
        a, b = backend.new(), backend.new()
        hb = Heartbeat(node="n1", counter=1, digest="d1", wall=1000.5, instance="a" * 16)
        await asyncio.to_thread(a.publish_blocking, hb)
        assert (await asyncio.to_thread(a.read_blocking)).members == {"n1": hb}
        assert (await a.read()).members == {"n1": hb}
        assert (await b.read()).members == {"n1": hb}
        held = await a.claim("web", "n1")
        assert held is not None
        for counter in range(2, 5):
            hb = Heartbeat(node="n1", counter=counter, digest=f"d{counter}", instance="a" * 16)
            await asyncio.to_thread(a.publish_blocking, hb)
            snap = await asyncio.to_thread(a.read_blocking)
            assert snap.members == {"n1": hb} and snap.claims == {"web": held}
            assert (await b.read()).members["n1"] == hb
        await b.publish(Heartbeat(node="n2", counter=1))  # another node's, seen by the blocking read
        assert set((await asyncio.to_thread(a.read_blocking)).members) == {"n1", "n2"}

    backend.run(body)


# --- claims -------------------------------------------------------------------------------


def test_claim_exactly_one_winner_of_ten(backend):
    async def body():
        stores = [backend.new() for _ in range(10)]
        results = await asyncio.gather(*(s.claim("web", f"n{i}") for i, s in enumerate(stores)))
        winners = [c for c in results if c is not None]
        assert len(winners) == 1
        assert (await stores[0].read()).claims == {"web": winners[0]}
        assert await stores[3].claim("web", "n3") is None

    backend.run(body)


def test_generation_strictly_grows(backend):
    async def body():
        a, b = backend.new(), backend.new()
        gens = []
        for i in range(4):
            c = await (a if i % 2 else b).claim("db", f"n{i % 2}")
            assert c is not None
            gens.append(c.generation)
            ended = await a.release(c) if i < 2 else await b.break_claim(c)
            assert ended
        assert gens == sorted(set(gens)) and gens[0] >= 1
        # Another group has its own numbering, and does not disturb this one.
        assert (await a.claim("other", "n0")) is not None
        assert (await a.claim("db", "n0")).generation > gens[-1]

    backend.run(body)


def test_release_by_non_owner_instance_fails(backend):
    async def body():
        a, b = backend.new(), backend.new()
        c = await a.claim("web", "n1")
        other_node = Claim(group="web", node="n2", generation=c.generation, token=c.token)
        later = Claim(group="web", node="n1", generation=c.generation + 1, token=str(int(c.token) + 1))
        for other in (other_node, later):
            assert await b.release(other) is False
            assert await b.break_claim(other) is False
        assert (await b.read()).claims == {"web": c}

    backend.run(body)


# A refused release/break of a claim that is not the current instance must leave no trace:
# the real owner's later release still wins.
@pytest.mark.parametrize("backend", ["dir", "etcd"], indirect=True)
def test_owner_release_wins_after_refused_foreign_attempts(backend):
    async def body():
        a, b = backend.new(), backend.new()
        c = await a.claim("web", "n1")
        assert await b.release(Claim(group="web", node="n2", generation=c.generation, token=c.token)) is False
        assert await a.release(c) is True
        assert await a.release(c) is False
        assert (await b.read()).claims == {}

    backend.run(body)


# Concurrent breakers of one instance: exactly one wins, none fails, none touches more.
@pytest.mark.parametrize("backend", ["dir", "etcd"], indirect=True)
def test_break_claim_five_concurrent_breakers_one_wins(backend):
    async def body():
        owner = backend.new()
        c = await owner.claim("web", "dead")
        breakers = [backend.new() for _ in range(5)]
        results = await asyncio.gather(*(s.break_claim(c) for s in breakers))
        assert sorted(results) == [False] * 4 + [True]
        assert (await owner.read()).claims == {}

    backend.run(body)


def test_stale_instance_never_removes_successor(backend):
    async def body():
        a, b, c = backend.new(), backend.new(), backend.new()
        ca = await a.claim("web", "na")
        assert await c.break_claim(ca) is True
        cb = await b.claim("web", "nb")
        assert cb is not None and cb.generation > ca.generation
        assert await a.release(ca) is False
        assert await c.break_claim(ca) is False
        assert (await c.read()).claims == {"web": cb}

    backend.run(body)


# --- waiting and errors -------------------------------------------------------------------


def test_wait_returns_early_on_claim_change_or_by_timeout(backend):
    async def body():
        a, b = backend.new(), backend.new()
        await b.publish(Heartbeat(node="nb", counter=1))
        await a.read()
        t0 = time.monotonic()
        await a.wait(0.3)  # nothing changed
        assert 0.25 <= time.monotonic() - t0 < 1.5
        if backend.kind == "dir":
            return  # the directory store has no change notification: wait() is a sleep

        async def claim_later():
            await asyncio.sleep(0.3)
            return await b.claim("web", "nb")

        t0 = time.monotonic()
        task = asyncio.create_task(claim_later())
        await a.wait(10)
        assert time.monotonic() - t0 < 2
        assert (await task) is not None
        snap = await a.read()
        assert "web" in snap.claims
        # A pure heartbeat counter change does not wake it; a claim deletion does.
        await b.publish(Heartbeat(node="nb", counter=2))
        await a.read()
        await b.publish(Heartbeat(node="nb", counter=3))
        t0 = time.monotonic()
        await a.wait(0.3)
        assert time.monotonic() - t0 >= 0.25
        release = asyncio.create_task(b.release(snap.claims["web"]))
        await a.wait(10)
        assert time.monotonic() - t0 < 2 and await release

    backend.run(body)


def unreachable(backend: Backend, tmp_path) -> Backend:
    """A backend of the same kind whose store cannot be reached."""
    if backend.kind == "dir":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        return Backend("dir", f"dir:{blocker}", create=False)
    return etcd_backend(f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}", timeout=0.3)


def test_unreachable_store_raises_store_error(backend, tmp_path):
    backend = unreachable(backend, tmp_path)

    async def body():
        s = backend.new()
        fake = Claim(group="web", node="n1", generation=1, token="5")
        calls = [
            s.publish(Heartbeat(node="n1", counter=1)), s.read(), s.claim("web", "n1"),
            s.release(fake), s.break_claim(fake),
        ]
        if backend.kind == "etcd":
            calls.append(s.wait(0.5))
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(StoreError) as info:
                await call
            assert time.monotonic() - t0 < 2
            message = str(info.value)
            assert "\n" not in message and backend.url in message

    backend.run(body)


def test_unreachable_store_blocking_pair_raises_store_error(backend, tmp_path):
    """publish_blocking and read_blocking, from a thread other than the event loop's, raise
    StoreError (and no other exception) naming the store, in one line, when it is unreachable."""
    backend = unreachable(backend, tmp_path)

    async def body():
        s = backend.new()
        for call in (lambda: s.publish_blocking(Heartbeat(node="n1", counter=1)), s.read_blocking) * 2:
            t0 = time.monotonic()
            with pytest.raises(Exception) as info:
                await asyncio.to_thread(call)
            assert isinstance(info.value, StoreError), repr(info.value)
            assert time.monotonic() - t0 < 2
            message = str(info.value)
            assert "\n" not in message and backend.url in message

    backend.run(body)


# --- etcd only ----------------------------------------------------------------------------


def test_etcd_url_and_lease_ttl():
    from reconciler.store.etcd import EtcdStore

    s = EtcdStore("etcd://127.0.0.1:2379,localhost", lease_ttl=2.5)
    assert s.endpoints == ["127.0.0.1:2379", "localhost:2379"] and s.ttl == 4
    assert EtcdStore("etcds://h:1/ha1", lease_ttl=0).prefix == "/ha1"
    assert EtcdStore("etcd://h:1").ttl == 2
    with pytest.raises(StoreError):
        EtcdStore("http://h:1")


def test_etcd_lease_expiry_removes_node_and_claim(etcd_single):
    backend = etcd_backend(etcd_single.url)

    async def body():
        a, b = backend.new(lease_ttl=0.5), backend.new()  # etcd TTL 2 s
        counter = 0
        claim = None
        t_end = time.monotonic() + 2.5  # longer than the TTL: publish() must keep the lease alive
        while time.monotonic() < t_end:
            counter += 1
            await a.publish(Heartbeat(node="na", counter=counter, status=S(x=1)))
            claim = claim or await a.claim("web", "na")
            await asyncio.sleep(0.1)
        snap = await b.read()
        assert snap.claims == {"web": claim} and "na" in snap.members
        t0 = time.monotonic()
        while True:  # a stops renewing: etcd expires the lease
            await b.wait(5)
            snap = await b.read()
            if not snap.claims and not snap.members:
                break
            assert time.monotonic() - t0 < 5
        assert 1.0 < time.monotonic() - t0 < 4.5
        # The node comes back: a new lease, and its unchanged status is written again.
        await a.publish(Heartbeat(node="na", counter=counter + 1, status=S(x=1)))
        snap = await b.read()
        assert snap.members["na"].status == S(x=1)
        assert snap.claims == {}
        assert (await a.claim("web", "na")).generation == claim.generation + 1

    backend.run(body)


def test_etcd_a_claim_that_outlives_its_owner_stays_until_broken(etcd_single):
    """A fenced group's claim (outlive_owner) is not bound to the owner's lease: when the
    owner's heartbeat expires the claim stays, so a successor takes it over (fencing the
    owner first) rather than claiming a vanished claim unfenced."""
    backend = etcd_backend(etcd_single.url)

    async def body():
        a, b = backend.new(lease_ttl=0.5), backend.new()  # etcd TTL 2 s
        await a.publish(Heartbeat(node="na", counter=1, status=S(x=1)))
        fenced = await a.claim("db", "na", outlive_owner=True)
        plain = await a.claim("web", "na")
        t0 = time.monotonic()
        while True:  # a never renews: etcd expires its lease, its heartbeat and the plain claim
            await b.wait(5)
            snap = await b.read()
            if "na" not in snap.members:
                break
            assert time.monotonic() - t0 < 5
        assert snap.claims == {"db": fenced}, (snap.claims, plain)
        assert await b.break_claim(fenced)
        taken = await b.claim("db", "nb", outlive_owner=True)
        assert taken is not None and taken.generation == fenced.generation + 1
        assert (await b.read()).claims == {"db": taken}

    backend.run(body)


def test_etcd_survives_loss_of_connected_leader(etcd_cluster3):
    cluster = etcd_cluster3
    leader = cluster.leader()
    order = [leader] + [i for i in range(3) if i != leader]  # connect to the leader first
    backend = etcd_backend("etcd://" + ",".join(cluster.endpoint(i) for i in order))

    async def body():
        s = backend.new()
        await s.publish(Heartbeat(node="n1", counter=1))
        held = await s.claim("web", "n1")
        cluster.kill(leader)
        t0 = time.monotonic()
        counter = 1
        while True:
            try:
                counter += 1
                await s.publish(Heartbeat(node="n1", counter=counter))
                snap = await s.read()
                break
            except StoreError:
                assert time.monotonic() - t0 < 3
        assert time.monotonic() - t0 < 3
        assert snap.members["n1"].counter == counter and snap.claims == {"web": held}
        assert (await s.claim("db", "n1")) is not None
        assert await s.release(held) is True

    backend.run(body)


def test_etcd_watch_resumes_without_losing_a_claim_deletion(etcd_cluster3):
    cluster = etcd_cluster3
    leader = cluster.leader()
    follower, other = [i for i in range(3) if i != leader]
    # a watches through a follower; b writes through the leader, so b's deletion right after
    # the follower dies is committed before a's watch (which retries after 50 ms) is back.
    backend = etcd_backend("etcd://" + ",".join(cluster.endpoint(i) for i in (follower, other, leader)))

    async def body():
        a = backend.new()
        b = backend.new("etcd://" + cluster.endpoint(leader))
        held = await b.claim("web", "nb")
        await a.read()
        while not a.watch.watching:
            await a.wait(0.05)
        assert a.conn.idx == 0
        cluster.kill(follower)  # a's watch stream breaks
        assert await b.break_claim(held) is True
        t0 = time.monotonic()
        await a.wait(10)  # resumes on another member from the last revision: sees the delete
        assert time.monotonic() - t0 < 3
        assert a.conn.idx != 0 and a.watch.watching
        assert (await a.read()).claims == {}

    backend.run(body)


# --- what a read does with what it cannot use (issue 12, item 7) ---------------------------------


def _plant(backend, store, entries: dict[str, bytes | str]):
    """Write raw store entries, as a hostile or broken writer would: {"claims/junk": value}.
    Directory: a value str is a symlink target, bytes a regular file; etcd: the key's value."""

    async def plant():
        if backend.kind == "dir":
            for path, value in entries.items():
                full = store.root / path
                if isinstance(value, str):
                    os.symlink(value, full)
                else:
                    full.write_bytes(value)
            return
        from reconciler.store.etcd.conn import put_op

        ops = [put_op(store.conn.key(*path.split("/", 1)), value) for path, value in entries.items()]
        await store.conn.txn("plant", [], ops, [], store.conn.deadline())

    return plant()


MALFORMED = {
    "dir": {
        "claims/zz-stray": b"a regular file\n",  # the stray file: every read used to fail
        "claims/bad-target": "nobody",
        "claims/-all": "n1:3",  # a group name that would be an option
        "nodes/bad": "abc:1.0:d",  # a non-numeric counter
        "nodes/old.json": b'{"counter": "abc"}',  # the older format: used to raise at every read
        "nodes/--all": "5::d",
        "status/n1.json": b"not json",
    },
    "etcd": {
        "claims/zz-stray": b"garbage",
        "claims/bad-target": b"nobody:",
        "claims/-all": b"n1:3",
        "nodes/bad": b'{"counter": "abc"}',
        "nodes/--all": b'{"counter": 5}',
        "nodes/weird": b"[1, 2]",
        "status/n1": b"not json",
    },
}


def test_malformed_entries_are_skipped_logged_once_and_counted(backend, caplog):
    async def body():
        a, b = backend.new(), backend.new()
        hb = Heartbeat(node="n1", counter=3, digest="d", status=S(s=1))
        await a.publish(hb)
        good = await a.claim("web", "n1")
        await _plant(backend, a, MALFORMED[backend.kind])
        caplog.clear()
        for _ in range(5):
            snap = await b.read()
        assert snap.claims == {"web": good}
        assert set(snap.members) == {"n1"} and snap.members["n1"].counter == 3
        assert snap.members["n1"].status == EMPTY  # its status is malformed: left out, the heartbeat stays
        skipped = set(snap.skipped)
        assert skipped == {k for k in MALFORMED[backend.kind]}, skipped
        assert b.skipped_total >= 5 * len(skipped)
        for entry in skipped:
            lines = [r for r in caplog.records if entry in r.getMessage()]
            assert len(lines) == 1, (entry, [r.getMessage() for r in lines])  # once, not at every read
            assert lines[0].levelname == "WARNING" and "\n" not in lines[0].getMessage()
        # the store works on around them: failover still possible
        assert await b.break_claim(good) is True
        assert (await b.claim("web", "n2")).generation > good.generation

    backend.run(body)


def test_a_corrupt_generation_is_an_error_never_zero(backend):
    async def body():
        a = backend.new()
        c = await a.claim("db", "n1")
        assert await a.release(c)
        if backend.kind == "dir":
            (a.root / "generations" / "db").write_text("garbage\n")
        else:
            await _plant(backend, a, {"generations/db": b"garbage"})
        b = backend.new()
        with pytest.raises(StoreError) as info:
            await b.claim("db", "n2")
        assert "generations/db" in str(info.value) and "\n" not in str(info.value)
        assert (await b.read()).claims == {}
        assert (await b.claim("other", "n2")) is not None  # other groups are not affected

    backend.run(body)


def test_a_publish_reports_the_record_another_writer_left(backend):
    """Snapshot.displaced: node identity sees another agent under its name at every publish
    (a read after the publish would show the other's record only if it wrote in between)."""

    async def body():
        a, b = backend.new(), backend.new()
        me, other = "a" * 16, "b" * 16
        await a.publish(Heartbeat(node="n1", counter=1, instance=me))
        await a.publish(Heartbeat(node="n1", counter=2, instance=me))
        assert (await a.read()).displaced == {}
        await b.publish(Heartbeat(node="n1", counter=7, instance=other))
        await a.publish(Heartbeat(node="n1", counter=3, instance=me))
        shown = (await a.read()).displaced["n1"]
        assert (shown.instance, shown.counter) == (other, 7)
        assert (await a.read()).members["n1"].instance == me
        await a.publish(Heartbeat(node="n1", counter=4, instance=me))
        assert (await a.read()).displaced == {}  # the last publish replaced its own record

    backend.run(body)
