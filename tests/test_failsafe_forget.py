"""`reconcile forget NODE` (issue 17) on a directory store, and the failsafe's keys in the spec:
a dead node without claims is forgotten; a live one, a claim holder and an unknown name are
refused with one line (exit 1, 1, 2)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from reconciler import spec as specmod
from reconciler.model import Heartbeat
from reconciler.store.factory import open_store

from helpers import reconcile, write_file


@pytest.fixture
def cluster(tmp_path: Path):
    """A spec on a directory store holding n1 (kept alive by a thread), n2 (dead, claims web)
    and n3 (dead, nothing)."""
    os.chmod(tmp_path, 0o755)
    store_url = f"dir:{tmp_path / 'store'}"
    # (short timings: a look at a dead member lasts dead_after)
    write_file(tmp_path / "cluster.toml", f'[cluster]\nname = "t"\nstore = "{store_url}"\nstate_dir = "{tmp_path / "state"}"\n'
                                          '[cluster.timing]\nheartbeat = "50ms"\nlease = "200ms"\ndemote_margin = "50ms"\n'
                                          'dead_after = "400ms"\n')
    store = open_store(store_url)
    store.create()
    stop = threading.Event()

    async def seed():
        for n in ("n2", "n3"):
            await store.publish(Heartbeat(node=n, counter=1))
        await store.claim("web", "n2")

    asyncio.run(seed())

    def beat():
        counter = 0
        while not stop.wait(0.05):
            counter += 1
            store.publish_blocking(Heartbeat(node="n1", counter=counter))

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    yield tmp_path, store
    stop.set()
    t.join()


def members(store) -> set[str]:
    return set(store.read_blocking().members)


def test_forget_removes_a_dead_node_and_refuses_the_rest(cluster):
    root, store = cluster
    spec = str(root / "cluster.toml")
    out = reconcile("forget", "n9", "--spec", spec)
    assert out.returncode == 2 and "n9: no such node in the store (known: n1, n2, n3)" in out.stderr
    out = reconcile("forget", "n1", "--spec", spec)
    assert out.returncode == 1 and "n1: alive" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = reconcile("forget", "n2", "--spec", spec)
    assert out.returncode == 1 and "holds the claims of web" in out.stderr
    assert members(store) == {"n1", "n2", "n3"}
    out = reconcile("forget", "n3", "--spec", spec)
    assert out.returncode == 0, out.stderr
    assert "n3: forgotten" in out.stdout
    assert members(store) == {"n1", "n2"}


SPEC = '[cluster]\nname = "t"\n'


@pytest.mark.parametrize("keys, field, says", [
    ({"peer_listen": '"10.0.0.1:7946"'}, "cluster.peer_secret_file", "peer_secret_file is not set"),
    ({"peer_secret_file": '"/etc/reconciler/peer.secret"'}, "cluster.peer_listen", "peer_listen is not set"),
    ({"peer_listen": '"node1:7946"', "peer_secret_file": '"s"'}, "cluster.peer_listen", "IP:PORT"),
    ({"peer_listen": '"10.0.0.1:99999"', "peer_secret_file": '"s"'}, "cluster.peer_listen", "IP:PORT"),
    ({"peer_listen": '"0.0.0.0:7946"', "peer_secret_file": '"s"'}, "cluster.peer_advertise", "set peer_advertise"),
    ({"peer_listen": '"0.0.0.0:7946"', "peer_secret_file": '"s"', "peer_advertise": '"x"'}, "cluster.peer_advertise",
     "HOST:PORT"),
    ({"peer_advertise": '"n1:7946"'}, "cluster.peer_advertise", "only together"),
])
def test_the_failsafe_keys_are_checked(tmp_path, keys, field, says):
    os.chmod(tmp_path, 0o755)
    text = SPEC + "".join(f"{k} = {v}\n" for k, v in keys.items())
    write_file(tmp_path / "cluster.toml", text)
    with pytest.raises(specmod.SpecError) as exc:
        specmod.load(str(tmp_path / "cluster.toml"))
    assert exc.value.field == field and says in str(exc.value)


def test_the_failsafe_keys_are_local_and_load(tmp_path):
    os.chmod(tmp_path, 0o755)
    write_file(tmp_path / "cluster.toml", SPEC + 'peer_listen = "[::]:7946"\npeer_advertise = "n1.example:7946"\n'
                                                 'peer_secret_file = "peer.secret"\n')
    spec = specmod.load(str(tmp_path / "cluster.toml"))
    assert (spec.cluster.peer_listen, spec.cluster.peer_advertise) == ("[::]:7946", "n1.example:7946")
    assert {"peer_listen", "peer_advertise", "peer_secret_file"} <= set(specmod.LOCAL_KEYS)
    plain = specmod.load(str(tmp_path / "cluster.toml"))
    assert plain.digest() == specmod.load(str(write_file(tmp_path / "b" / "cluster.toml", SPEC))).digest()
