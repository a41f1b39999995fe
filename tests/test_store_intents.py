"""The Store contract for operator intents and hand-over (issue 15), on every backend
(directory and a real etcd: the `backend` fixture of test_store_contract.py), plus what only
the directory store's files can show."""

from __future__ import annotations

import asyncio
import os

import pytest

from reconciler import published
from reconciler.published import Intent
from reconciler.store import Claim, Heartbeat, StoreError
from reconciler.store.directory import DirectoryStore

from test_store_contract import Backend, backend  # noqa: F401 (the fixture: dir and etcd)


@pytest.fixture
def dirstore(tmp_path):
    return Backend("dir", f"dir:{tmp_path / 'store'}")


async def plant(b: Backend, store, key: str, name: str, text: str) -> str:
    """A value written under intents/ behind the store's back; returns the entry Snapshot.skipped names."""
    if b.kind == "dir":
        with open(b.url[4:] + f"/intents/{name}", "w") as fh:
            fh.write(text)
        return f"intents/{name}"
    from reconciler.store.etcd.conn import put_op

    await store.conn.txn("plant", [], [put_op(store.conn.key("intents", key), text)], [], store.conn.deadline())
    return f"intents/{key}"


def I(kind="move", id="a1", **kw) -> Intent:
    if kind == "move":
        kw = {"group": "web", "target": "n2", **kw}
    return Intent(kind=kind, id=id, created=kw.pop("created", 100.0), **kw)


def test_put_read_replace_and_a_second_store_follows(backend):
    async def body():
        s, other = backend.new(), backend.new()
        assert (await s.read()).intents == {}
        first = await s.intent_put(I(id="a1"))
        assert (await other.read()).intents == {"move/web": first}
        second = await other.intent_put(I(id="b2", target="n3", created=101.0))
        assert (await s.read()).intents == {"move/web": second}
        sb = await s.intent_put(I("standby", id="c3", node="n1"))
        mt = await s.intent_put(I("maintenance", id="d4", group="web"))
        assert (await other.read()).intents == {"move/web": second, "standby/n1": sb, "maintenance/group/web": mt}
        if backend.kind == "dir":
            assert sorted(os.listdir(backend.url[4:] + "/intents")) == ["maintenance~group~web@d4", "move~web@b2", "standby~n1@c3"]

    backend.run(body)


def test_delete_only_the_instance_read(backend):
    async def body():
        s = backend.new()
        old = await s.intent_put(I(id="a1"))
        new = await s.intent_put(I(id="b2", created=101.0))
        assert not await s.intent_delete(old.key, token=old.id)  # replaced since: never removes the new one
        assert (await s.read()).intents == {"move/web": new}
        assert await s.intent_delete(new.key, token=new.id)
        assert not await s.intent_delete(new.key, token=new.id)  # one winner
        assert (await s.read()).intents == {}

    backend.run(body)


def test_two_instances_of_a_key_read_as_the_newer_and_a_delete_removes_both(dirstore):
    """A putter that died between creating its instance and removing the older one."""
    backend = dirstore

    async def body():
        s = backend.new()
        older = await s.intent_put(I(id="a1"))
        root = backend.url[4:] + "/intents"
        newer = I(id="b2", created=101.0)
        with open(f"{root}/move~web@b2", "w") as fh:
            fh.write(published.intent_dumps(newer))
        assert (await s.read()).intents == {"move/web": newer}
        assert await s.intent_delete(newer.key, token=newer.id)
        assert (await s.read()).intents == {}  # the older one does not come back
        assert older.id not in "".join(os.listdir(root))

    backend.run(body)


@pytest.mark.parametrize("key, name, text, why", [
    ("move/web", "move~web@a1", "{", "not JSON"),
    ("move/web", "move~web@a1", '{"kind": "move", "id": "a1", "group": "web"}', "intent.target: a move intent needs one"),
    ("move/web", "move~web@a1", '{"kind": "dance", "id": "a1"}', "not an intent kind"),
    ("move/api", "move~web@zz", published.intent_dumps(I(id="a1")), "not the one its"),
    ("move/web", "move~web@a1", '{"kind": "move", "id": "a1", "group": "web", "target": "n2", "color": 1}', "intent"),
    ("maintenance", "maintenance@a1", '{"kind": "maintenance", "id": "a1", "group": "g", "node": "n"}', "one scope"),
])
def test_malformed_intents_are_skipped_and_listed(backend, key, name, text, why, caplog):
    async def body():
        s = backend.new()
        good = await s.intent_put(I("standby", id="c3", node="n1"))
        entry = await plant(backend, s, key, name, text)
        snap = await backend.new().read()  # (a full read)
        assert snap.intents == {"standby/n1": good}
        assert snap.skipped == (entry,)
        assert (await s.read()).skipped == (entry,)  # (the delta)
        assert why in caplog.text

    backend.run(body)


def test_a_store_set_up_by_an_older_version_reads_no_intents_and_refuses_a_put(tmp_path):
    async def body():
        s = DirectoryStore(tmp_path / "store")
        s.create()
        os.rmdir(tmp_path / "store" / "intents")
        assert (await s.read()).intents == {}
        with pytest.raises(StoreError, match="no intents/ yet"):
            await s.intent_put(I())
        assert not await s.intent_delete("move/web", token="a1")
        await s.close()

    asyncio.run(body())


def test_intent_round_trip_and_keys():
    for intent in (I(), I("standby", node="n1"), I("maintenance"), I("maintenance", group="g"), I("maintenance", node="n"),
                   I(expires=160.5, who="cli@h")):
        assert published.intent_loads(published.intent_dumps(intent)) == intent
    assert [I(**k).key for k in ({}, {"kind": "standby", "node": "n1"}, {"kind": "maintenance"},
                                  {"kind": "maintenance", "node": "n1"})] == ["move/web", "standby/n1", "maintenance",
                                                                            "maintenance/node/n1"]


# --- hand-over -------------------------------------------------------------------------------


def test_hand_over_replaces_the_instance_with_no_gap_and_one_winner(backend):
    async def body():
        s, peer = backend.new(), backend.new()
        await peer.publish(Heartbeat(node="n2", counter=1))  # (etcd: the claim is bound to n2's lease)
        mine = await s.claim("web", "n1")
        handed = await s.hand_over(mine, "n2")
        assert handed is not None and handed.node == "n2" and handed.generation == mine.generation + 1
        await peer.read()  # (etcd: the read right after its own publish shows that revision)
        assert (await peer.read()).claims == {"web": handed}
        # the old instance is over: no second hand-over, release or break of it
        assert await s.hand_over(mine, "n3") is None
        assert not await s.release(mine)
        assert not await peer.break_claim(mine)
        assert await peer.claim("web", "n3") is None  # claimed all along
        # the new owner's instance behaves as any claim, and generations keep growing
        assert await peer.release(handed)
        again = await s.claim("web", "n1")
        assert again.generation > handed.generation

    backend.run(body)


def test_hand_over_races_a_break_one_winner(backend):
    async def body():
        s = backend.new()
        await backend.new().publish(Heartbeat(node="n2", counter=1))
        mine = await s.claim("web", "n1")
        others = [backend.new() for _ in range(4)]
        results = await asyncio.gather(s.hand_over(mine, "n2"), *(o.break_claim(mine) for o in others))
        won = [r for r in results if r not in (None, False)]
        assert len(won) == 1
        snap = await s.read()
        if results[0] is not None:
            assert snap.claims == {"web": results[0]}
        else:
            assert snap.claims == {}

    backend.run(body)


def test_hand_over_of_an_instance_that_is_not_current(backend):
    async def body():
        s = backend.new()
        assert await s.hand_over(Claim(group="web", node="n1", generation=1, token="1"), "n2") is None
        mine = await s.claim("web", "n1")
        assert await s.hand_over(Claim(group="web", node="n9", generation=mine.generation, token=mine.token), "n2") is None
        assert (await s.read()).claims == {"web": mine}

    backend.run(body)


def test_a_claim_handed_over_on_etcd_goes_with_the_targets_lease(etcd_single):
    """etcd binds the new claim to the lease of the target's heartbeat: it ends with the
    target, as a claim the target made would; without a heartbeat of the target, no hand-over."""
    import uuid

    b = Backend("etcd", etcd_single.url, prefix=f"/test-{uuid.uuid4().hex[:12]}", lease_ttl=1.0)

    async def body():
        s, target = b.new(), b.new()
        mine = await s.claim("web", "n1")
        assert await s.hand_over(mine, "n2") is None  # n2 has no heartbeat
        await target.publish(Heartbeat(node="n2", counter=1))
        handed = await s.hand_over(mine, "n2")
        assert handed is not None and (await s.read()).claims == {"web": handed}
        await target.close()  # its lease is left to expire (TTL 2 s)
        await asyncio.sleep(3.5)
        assert (await s.read()).claims == {}

    b.run(body)
