"""The Store contract for the cluster spec (issue 14): numbered revisions with a
compare-and-swap put, history and pruning, Snapshot.spec_revision, run against every backend
(directory and a real etcd, as tests/test_store_contract.py), plus the directory store's
trust checks on spec/.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from reconciler.published import Event, SpecFile, SpecRevision, revision_dumps
from reconciler.store import KEEP, Heartbeat, SpecConflict, StoreError, StoreRefused
from test_store_contract import Backend, _plant, backend  # noqa: F401 (the fixture)


def R(number: int, *, node: str = "n1", text: str = "") -> SpecRevision:
    """A revision told apart from another by its number (and `node`, `text`)."""
    files = (SpecFile(name="groups.toml", text=text or f"# revision {number}\n[groups.web]\nrunlevel = 3\n"),
             SpecFile(name="main.toml", text="[cluster]\nname = \"c\"\n"))
    return SpecRevision(number=number, digest=f"d{number}", files=files, node=node, wall=1000.0 + number,
                        summary=f"revision {number}")


def test_the_first_put_then_get_and_read(backend):
    async def body():
        a, b = backend.new(), backend.new()
        assert await a.spec_get() is None and await a.spec_get(1) is None
        assert await a.spec_history() == []
        assert (await a.read()).spec_revision == 0
        assert await a.spec_put(R(1)) == R(1)
        assert await a.spec_get() == R(1) and await b.spec_get(1) == R(1)
        assert await b.spec_get(2) is None and await b.spec_get(0) is None
        assert (await a.read()).spec_revision == 1
        assert (await b.read()).spec_revision == 1
        assert await b.spec_history() == [R(1)]

    backend.run(body)


def test_a_put_not_based_on_the_current_revision_conflicts(backend):
    async def body():
        a, b = backend.new(), backend.new()
        with pytest.raises(SpecConflict) as info:
            await a.spec_put(R(2))  # nothing yet: only 1 may come first
        assert info.value.current == 0
        await a.spec_put(R(1))
        for stale in (R(1, node="n2"), R(3)):
            with pytest.raises(SpecConflict) as info:
                await b.spec_put(stale)
            assert info.value.current == 1
            message = str(info.value)
            assert backend.url.split("//")[-1].split(",")[0] in message or a.url in message
            assert "\n" not in message
        assert await b.spec_get() == R(1)  # nothing was written by the losers
        await b.spec_put(R(2, node="n2"))
        assert (await a.read()).spec_revision == 2 and await a.spec_get() == R(2, node="n2")
        with pytest.raises(StoreError) as err:
            await a.spec_put(R(1).__class__(number=0, digest="", files=()))
        assert not isinstance(err.value, SpecConflict)

    backend.run(body)


def test_concurrent_puts_of_one_number_have_one_winner(backend):
    async def body():
        first = backend.new()
        await first.spec_put(R(1))
        stores = [backend.new() for _ in range(8)]
        for round_ in (2, 3):
            results = await asyncio.gather(*(s.spec_put(R(round_, node=f"n{i}")) for i, s in enumerate(stores)),
                                           return_exceptions=True)
            won = [r for r in results if isinstance(r, SpecRevision)]
            lost = [r for r in results if isinstance(r, SpecConflict)]
            assert len(won) == 1 and len(lost) == len(stores) - 1, results
            assert all(e.current == round_ for e in lost)
            assert await first.spec_get() == won[0]
            assert [r.number for r in await first.spec_history()] == list(range(round_, 0, -1))

    backend.run(body)


def test_history_is_newest_first_and_keeps_the_newest_keep(backend):
    async def body():
        a, b = backend.new(), backend.new()
        last = KEEP + 5
        for n in range(1, last + 1):
            await a.spec_put(R(n))
        history = await b.spec_history()
        assert [r.number for r in history] == list(range(last, last - KEEP, -1))
        assert history[0] == R(last) and history[-1] == R(last - KEEP + 1)
        for pruned in (1, last - KEEP):
            assert await b.spec_get(pruned) is None
        assert await b.spec_get(last - KEEP + 1) == R(last - KEEP + 1)
        assert await b.spec_get() == R(last)
        if backend.kind == "dir":
            assert len([n for n in os.listdir(a.root / "spec") if not n.startswith(".")]) == KEEP

    backend.run(body)


def test_a_reader_follows_a_put_from_another_store(backend):
    """Snapshot.spec_revision: a plain read, a read right after a publish (the etcd store's
    mirror), the blocking read, and wait() woken by the put."""

    async def body():
        a, b, c = backend.new(), backend.new(), backend.new()
        await b.publish(Heartbeat(node="nb", counter=1))
        assert (await b.read()).spec_revision == 0
        counter = 1
        for n in (1, 2, 3):
            await a.spec_put(R(n))
            assert (await b.read()).spec_revision == n
            counter += 1
            await b.publish(Heartbeat(node="nb", counter=counter))
            assert (await b.read()).spec_revision == n  # (etcd: from the publish's transaction)
            assert (await asyncio.to_thread(c.read_blocking)).spec_revision == n
        if backend.kind == "etcd":
            await b.read()
            t0 = time.monotonic()
            waiting = asyncio.create_task(b.wait(10))
            await asyncio.sleep(0.3)
            await a.spec_put(R(4))
            await waiting
            assert time.monotonic() - t0 < 3
        else:
            await a.spec_put(R(4))
        assert (await b.read()).spec_revision == 4

    backend.run(body)


def test_a_malformed_revision_is_an_error_naming_it(backend):
    async def body():
        a = backend.new()
        await a.spec_put(R(1))
        await a.spec_put(R(2))
        if backend.kind == "dir":
            path = a.root / "spec" / "0000000003.json"
            path.write_bytes(b"garbage")
            os.chmod(path, 0o644)
            (a.root / "spec" / "0000000004.json").write_text(revision_dumps(R(5)))
            entry, other = "spec/0000000003.json", "spec/0000000004.json"
        else:
            await _plant(backend, a, {"spec/head": b"4", "spec/rev/0000000003": b"garbage",
                                      "spec/rev/0000000004": revision_dumps(R(5)).encode()})
            entry, other = "spec/rev/0000000003", "spec/rev/0000000004"
        b = backend.new()
        for call in (lambda: b.spec_get(3), b.spec_history):
            with pytest.raises(StoreError) as info:
                await call()
            assert entry in str(info.value) or other in str(info.value)
            assert "\n" not in str(info.value) and not isinstance(info.value, SpecConflict)
        with pytest.raises(StoreError) as info:
            await b.spec_get()  # the current one holds another number than its name
        assert other in str(info.value)
        assert await b.spec_get(2) == R(2)  # the others are fine
        snap = await b.read()  # a read never parses a revision
        assert snap.spec_revision == 4
        if backend.kind == "etcd":
            await _plant(backend, a, {"spec/head": b"four"})
            snap = await b.read()
            assert snap.spec_revision == 0 and "spec/head" in snap.skipped
            for call in (b.spec_get, lambda: b.spec_put(R(5))):
                with pytest.raises(StoreError) as info:
                    await call()
                assert "spec/head" in str(info.value) and not isinstance(info.value, SpecConflict)

    backend.run(body)


# --- the directory store: spec/ must be beyond other users' reach -------------------------------


def test_dir_a_store_without_spec_reads_as_none_until_set_up(tmp_path):
    s = Backend("dir", f"dir:{tmp_path / 'store'}")

    async def body():
        a = s.new()
        await a.spec_put(R(1))
        os.rename(a.root / "spec", tmp_path / "spec-away")  # as an older version left it
        tool = Backend("dir", a.url, create=False).new()
        assert (await tool.read()).spec_revision == 0  # a read-only tool, no setup
        assert await tool.spec_get() is None and await tool.spec_history() == []
        with pytest.raises(StoreError):
            await tool.spec_put(R(1))  # only setup() creates anything
        with pytest.raises(StoreError) as info:
            await a.read()  # an agent that set the store up: unreachable, not empty
        assert "spec/" in str(info.value)
        await Backend("dir", a.url, create=False).new().setup()  # the upgraded agent's start
        assert (await a.read()).spec_revision == 0 and await a.spec_get() is None

    s.run(body)


@pytest.mark.parametrize("how", ["group-writable spec/", "world-writable revision", "symlinked revision",
                                 pytest.param("foreign owner", marks=[pytest.mark.integration, pytest.mark.needs("root")])])
def test_dir_a_spec_others_could_write_is_refused(tmp_path, how):
    s = Backend("dir", f"dir:{tmp_path / 'store'}")

    async def body():
        a = s.new()
        await a.spec_put(R(1))
        spec = a.root / "spec"
        rev = spec / "0000000001.json"
        if how == "group-writable spec/":
            os.chmod(spec, 0o775)
            entry = "spec/"
        elif how == "world-writable revision":
            os.chmod(rev, 0o666)
            entry = "spec/0000000001.json"
        elif how == "symlinked revision":
            (tmp_path / "elsewhere.json").write_text(revision_dumps(R(1)))
            rev.unlink()
            os.symlink(tmp_path / "elsewhere.json", rev)
            entry = "spec/0000000001.json"
        else:
            os.chown(rev, 12345, 12345)
            entry = "spec/0000000001.json"
        with pytest.raises(StoreRefused) as info:
            await Backend("dir", a.url, create=False).new().setup()
        assert entry in str(info.value) and "\n" not in str(info.value)
        for call in (a.spec_get, lambda: a.spec_get(1), a.spec_history):
            with pytest.raises(StoreError) as info:
                await call()
            assert entry in str(info.value)
        if entry == "spec/":
            with pytest.raises(StoreError):
                await a.read()
            with pytest.raises(StoreError):
                await a.spec_put(R(2))

    s.run(body)


def test_dir_a_writer_that_died_half_way_wedges_nothing(tmp_path):
    s = Backend("dir", f"dir:{tmp_path / 'store'}")

    async def body():
        a = s.new()
        await a.spec_put(R(1))
        (a.root / "spec" / ".0000000002.json.deadbeef.tmp").write_text("half")
        assert (await a.read()).spec_revision == 1 and await a.spec_get() == R(1)
        await a.spec_put(R(2))
        assert await a.spec_get() == R(2)
        assert [r.number for r in await a.spec_history()] == [2, 1]

    s.run(body)


# --- etcd: what docs/etcd.md ("Production: auth and TLS") advises works -------------------------


@pytest.mark.integration
@pytest.mark.needs("etcd")
def test_etcd_agents_limited_to_read_the_spec_run_and_cannot_publish(tmp_path):
    """A role with readwrite on nodes/, status/, claims/, generations/, intents/, events/ and
    read on spec/ is all an agent needs (heartbeat, reads, full reads, claims, the watch,
    spec_get, the history); a put of a revision is then refused by etcd, and a publisher's
    role on spec/ may."""
    import grpc
    from aetcd import rpc
    from aetcd.utils import prefix_range_end
    from etcd_cluster import EtcdCluster

    prefix = "/rc"

    def perm(kind: str, rw: int):
        key = f"{prefix}/{kind}/".encode()
        return rpc.Permission(permType=rw, key=key, range_end=prefix_range_end(key))

    async def enable_auth(endpoint: str):
        async with grpc.aio.insecure_channel(endpoint) as channel:
            auth = rpc.AuthStub(channel)
            for user, role, perms in (("root", "root", None),
                                      ("agent", "agent", [perm(k, rpc.Permission.READWRITE) for k in
                                                          ("nodes", "status", "claims", "generations", "intents", "events")]
                                       + [perm("spec", rpc.Permission.READ)]),
                                      ("publisher", "publisher", [perm("spec", rpc.Permission.READWRITE)])):
                await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=f"{user}-pw"))
                if perms is not None:
                    await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role))
                    for p in perms:
                        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=role, perm=p))
                await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=role))
            await auth.AuthEnable(rpc.AuthEnableRequest())

    cluster = EtcdCluster(1, tmp_path / "etcd").start()
    try:
        asyncio.run(enable_auth(cluster.endpoint(0)))
        be = Backend("etcd", cluster.url, prefix=prefix)

        async def body():
            agent = be.new(user="agent", password="agent-pw")
            other = be.new(user="agent", password="agent-pw")
            publisher = be.new(user="publisher", password="publisher-pw")
            await agent.publish(Heartbeat(node="n1", counter=1))
            held = await agent.claim("web", "n1")
            assert held is not None
            assert (await other.read()).claims == {"web": held}  # a full read
            assert await agent.spec_get() is None
            with pytest.raises(StoreError) as info:
                await agent.spec_put(R(1))
            assert "permission denied" in str(info.value).lower() and not isinstance(info.value, SpecConflict)
            await publisher.spec_put(R(1))
            assert await agent.spec_get() == R(1) and await agent.spec_history() == [R(1)]
            await agent.publish(Heartbeat(node="n1", counter=2))
            assert (await agent.read()).spec_revision == 1
            assert (await other.read()).spec_revision == 1
            waiting = asyncio.create_task(other.wait(10))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await publisher.spec_put(R(2))
            await waiting
            assert time.monotonic() - t0 < 3
            assert await agent.release(held)
            told = await agent.events_append([Event(wall=1.0, node="n1", kind="claim", group="web")])
            assert [e.seq for e in await other.events_read()] == [e.seq for e in told]

        be.run(body)
    finally:
        cluster.stop()
