"""The Store contract for the cluster's history (issue 15): events_append / events_read, run
against every backend (directory and a real etcd, as tests/test_store_contract.py): seqs
assigned by the store, increasing across appenders, reads after a cursor, bounded retention
by count and by age, malformed entries skipped; and the directory store's layout."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from reconciler.published import Event, StatusError, event_dumps, event_loads
from reconciler.store import PRUNE_EVERY, StoreError
from test_store_contract import Backend, backend, unreachable  # noqa: F401 (the fixture)


def E(i: int, *, node: str = "n1", wall: float | None = None, **kw) -> Event:
    return Event(wall=time.time() if wall is None else wall, node=node, kind=kw.pop("kind", "claim"), group=f"g{i}",
                 reason=f"event {i}", **kw)


def test_event_round_trip_and_strict_parse():
    ev = Event(wall=1.5, node="n1", kind="takeover", group="web", reason="owner n2 silent",
               phases={"detect": 1.25, "fence": 0.1}, seq=7)
    assert event_loads(event_dumps(ev)) == ev
    assert event_loads('{"wall": 1, "node": "n", "kind": "claim"}') == Event(wall=1.0, node="n", kind="claim")
    with pytest.raises(StatusError, match=r"^event.phases.fence: must be a number"):
        event_loads('{"wall": 1, "node": "n", "kind": "k", "phases": {"fence": "x"}}')
    with pytest.raises(StatusError, match="bogus"):
        event_loads('{"wall": 1, "node": "n", "kind": "k", "bogus": 1}')


def test_append_assigns_increasing_seqs_and_read_after(backend):
    async def body():
        a, b = backend.new(), backend.new()
        assert await a.events_read() == []
        first = await a.events_append([E(1), E(2, phases={"detect": 1.5})])
        assert [e.seq for e in first] == [1, 2] and first[1].phases == {"detect": 1.5}
        assert [e.seq for e in await b.events_append([E(3, node="n2")])] == [3]
        assert [e.seq for e in await a.events_append([E(4)])] == [4]  # a's hint is stale: it finds 4
        got = await b.events_read()
        assert [(e.seq, e.group, e.node) for e in got] == [(1, "g1", "n1"), (2, "g2", "n1"), (3, "g3", "n2"), (4, "g4", "n1")]
        assert got[:2] == first
        assert [e.seq for e in await b.events_read(after=2)] == [3, 4]
        assert [e.seq for e in await b.events_read(after=1, limit=2)] == [2, 3]
        assert await b.events_read(after=4) == []

    backend.run(body)


def test_concurrent_appenders_get_distinct_dense_seqs(backend):
    async def body():
        stores = [backend.new() for _ in range(4)]
        results = await asyncio.gather(*(s.events_append([E(i * 10 + j, node=f"n{i}") for j in range(3)])
                                         for i, s in enumerate(stores)))
        seqs = sorted(e.seq for r in results for e in r)
        assert seqs == list(range(1, 13))
        for r in results:  # each appender's own events in its order
            assert [e.seq for e in r] == sorted(e.seq for e in r)
        assert [e.seq for e in await stores[0].events_read()] == seqs

    backend.run(body)


def test_retention_by_count_and_age(backend):
    async def body():
        a = backend.new()
        old = time.time() - 3600
        await a.events_append([E(i, wall=old) for i in range(5)], keep=1000, max_age=86400)
        if backend.kind == "dir":  # the directory store ages files by their mtime
            for name in os.listdir(a.root / "events"):
                if name.endswith(".json"):
                    os.utime(a.root / "events" / name, (old, old))
        # Up to seq PRUNE_EVERY: pruning runs then, keeping the newest 30 (count) and
        # dropping what is older than 600 s (the first five).
        await a.events_append([E(i) for i in range(5, PRUNE_EVERY)], keep=1000, max_age=600)
        kept = await a.events_read(limit=10_000)
        assert [e.seq for e in kept] == list(range(6, PRUNE_EVERY + 1))
        for i in range(PRUNE_EVERY, 2 * PRUNE_EVERY, 10):  # batches of 10 (as the agent's are small)
            await a.events_append([E(j) for j in range(i, i + 10)], keep=30, max_age=600)
        kept = await a.events_read(limit=10_000)
        assert [e.seq for e in kept] == list(range(2 * PRUNE_EVERY - 29, 2 * PRUNE_EVERY + 1))
        # Appending goes on after a prune, with seqs still increasing.
        assert [e.seq for e in await backend.new().events_append([E(0)])] == [2 * PRUNE_EVERY + 1]

    backend.run(body)


def test_a_malformed_event_is_skipped_and_counted(backend):
    async def body():
        a = backend.new()
        await a.events_append([E(1), E(2), E(3)])
        if backend.kind == "dir":
            (a.root / "events" / "000000000002.json").write_text("{not json")
        else:
            await a.conn.call("t", lambda s, t, md: s.kv.Put(_put(a._events._key(2), b"{not json"), timeout=t, metadata=md),
                              a.conn.deadline())
        before = a.skipped_total
        assert [e.seq for e in await a.events_read()] == [1, 3]
        assert a.skipped_total == before + 1

    backend.run(body)


def _put(key: bytes, value: bytes):
    from aetcd import rpc

    return rpc.PutRequest(key=key, value=value)


def test_unreachable_store_raises_store_error_for_events(backend, tmp_path):
    bad = unreachable(backend, tmp_path)

    async def body():
        s = bad.new()
        with pytest.raises(StoreError):
            await s.events_append([E(1)])
        with pytest.raises(StoreError):
            await s.events_read()

    bad.run(body)


def test_directory_store_of_an_older_version_reads_no_history(tmp_path):
    """A store made before events/ existed: a read-only tool reads none; setup() adds it."""
    from reconciler.store.directory import DirectoryStore

    root = tmp_path / "store"
    for sub in ("nodes", "status", "claims", "ends", "generations", "spec"):
        (root / sub).mkdir(parents=True)
    os.chmod(root, 0o755)

    async def body():
        s = DirectoryStore(root)
        assert await s.events_read() == []
        with pytest.raises(StoreError, match="events/ is missing"):
            await s.events_append([E(1)])
        await s.setup()
        assert [e.seq for e in await s.events_append([E(1)])] == [1]
        os.rename(root / "events", root / "events.gone")
        with pytest.raises(StoreError, match="events/ is missing: unreachable"):
            await s.events_read()
        await s.close()

    asyncio.run(body())
