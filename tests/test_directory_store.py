"""The directory store verifies what it reads (issue 12, item 7): a missing store is
unreachable, never empty; nothing planted in it is followed; it must be owned by root (or
us) and not writable by others. The contract parts (malformed entries, corrupt
generations) are in test_store_contract.py, for every backend.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from cluster import Cluster, wait_until
from reconciler.published import EMPTY, NodeStatus
from reconciler.store import Heartbeat, StoreError, StoreRefused
from reconciler.store.factory import open_store


def S(**marks) -> NodeStatus:
    """A status record told apart from another by `marks` (these tests compare whole records)."""
    return NodeStatus(spec_error=",".join(f"{k}={v}" for k, v in sorted(marks.items())))


def run(coro):
    return asyncio.run(coro)


def new_store(tmp_path, *, create=True):
    store = open_store(f"dir:{tmp_path / 'store'}")
    if create:
        store.create()
    return store


def test_first_start_creates_the_store_and_nothing_else_does(tmp_path):
    bare = new_store(tmp_path, create=False)
    with pytest.raises(StoreError) as info:
        run(bare.publish(Heartbeat(node="n1", counter=1)))
    assert "missing" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "store").exists()  # a publish never creates the store
    with pytest.raises(StoreError):
        run(bare.read())  # absent: unreachable, not empty
    run(bare.setup())  # what the agent does once at start-up
    assert sorted(os.listdir(tmp_path / "store")) == ["claims", "ends", "events", "generations", "intents", "nodes", "spec", "status"]
    assert os.stat(tmp_path / "store").st_mode & 0o022 == 0
    run(bare.publish(Heartbeat(node="n1", counter=1)))
    assert run(bare.read()).members["n1"].counter == 1


@pytest.mark.parametrize("missing", ["", "claims", "nodes", "status", "spec"])
def test_a_store_that_disappears_is_unreachable_not_empty(tmp_path, missing):
    s = new_store(tmp_path)
    run(s.publish(Heartbeat(node="n1", counter=1)))
    assert run(s.claim("web", "n1")) is not None
    victim = tmp_path / "store" / missing if missing else tmp_path / "store"
    os.rename(victim, tmp_path / "away")
    calls = [s.read]  # every read needs the whole layout; publish and claim the parts they use
    if missing in ("", "nodes", "status"):
        calls.append(lambda: s.publish(Heartbeat(node="n1", counter=2)))
    if missing in ("", "claims"):
        calls.append(lambda: s.claim("db", "n1"))
    for call in calls:
        with pytest.raises(StoreError) as info:
            run(call())
        assert "missing" in str(info.value) and "\n" not in str(info.value)
    assert not victim.exists()  # nothing was created in its place
    os.rename(tmp_path / "away", victim)
    assert set(run(s.read()).claims) == {"web"}


@pytest.mark.parametrize("how", ["world-writable", "group-writable",
                                 pytest.param("foreign owner", marks=[pytest.mark.integration, pytest.mark.needs("root")])])
def test_a_store_others_could_write_to_is_refused(tmp_path, how):
    s = new_store(tmp_path)
    root = tmp_path / "store"
    if how == "foreign owner":
        os.chown(root, 12345, 12345)
    else:
        os.chmod(root, 0o777 if how == "world-writable" else 0o775)
    with pytest.raises(StoreRefused) as info:
        run(new_store(tmp_path, create=False).setup())
    assert str(root) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StoreError):
        run(s.read())
    with pytest.raises(StoreError):
        run(s.claim("web", "n1"))


@pytest.mark.parametrize("sub", ["status", "nodes", "claims", "ends", "generations"])
def test_a_subdirectory_replaced_by_a_symlink_is_never_written_through(tmp_path, sub):
    s = new_store(tmp_path)
    run(s.publish(Heartbeat(node="n1", counter=1, status=S(a=1))))
    claim = run(s.claim("web", "n1"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = tmp_path / "store" / sub
    os.rename(path, tmp_path / f"old-{sub}")
    os.symlink(elsewhere, path)
    calls = [s.publish(Heartbeat(node="n1", counter=2, status=S(a=2))), s.claim("db", "n1"), s.release(claim), s.read()]
    for call in calls:
        try:
            run(call)
        except StoreError as exc:
            assert "\n" not in str(exc)
    assert os.listdir(elsewhere) == []  # nothing written, no probe, no temporary file
    with pytest.raises(StoreRefused):
        run(new_store(tmp_path, create=False).setup())


def test_planted_files_are_replaced_or_refused_never_followed(tmp_path):
    s = new_store(tmp_path)
    root = tmp_path / "store"
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    os.symlink(target, root / "status" / "n1.json")
    run(s.publish(Heartbeat(node="n1", counter=1, status=S(a=1))))
    assert target.read_text() == "keep me\n"
    assert not (root / "status" / "n1.json").is_symlink()
    # generations/GROUP planted as a symlink: claiming it is refused, the target untouched
    os.symlink(target, root / "generations" / "web")
    with pytest.raises(StoreError) as info:
        run(s.claim("web", "n1"))
    assert "generations/web" in str(info.value)
    assert target.read_text() == "keep me\n"
    # ending a claim over a planted counter replaces it (the generation only grows)
    c = run(s.claim("db", "n1"))
    os.symlink(target, root / "generations" / "db")
    assert run(s.release(c)) is True
    assert target.read_text() == "keep me\n"
    assert (root / "generations" / "db").read_text() == str(c.generation)
    assert run(s.claim("db", "n1")).generation == c.generation + 1


def test_a_fifo_in_the_store_does_not_hang_a_read(tmp_path):
    s = new_store(tmp_path)
    run(s.publish(Heartbeat(node="n1", counter=1)))
    os.unlink(tmp_path / "store" / "status" / "n1.json")
    os.mkfifo(tmp_path / "store" / "status" / "n1.json")
    os.mkfifo(tmp_path / "store" / "generations" / "web")
    t0 = time.monotonic()
    snap = run(s.read())
    assert snap.members["n1"].status == EMPTY and "status/n1.json" in snap.skipped
    with pytest.raises(StoreError):
        run(s.claim("web", "n1"))
    assert time.monotonic() - t0 < 2


# --- with agents -----------------------------------------------------------------------------

LONG = """
[cluster.timing]
heartbeat = "100ms"
lease = "3s"
demote_margin = "500ms"
dead_after = "4s"
"""


def test_renaming_the_store_away_stops_nothing_within_the_lease(make_cluster):
    """The issue: renaming the store away for 1.5 s made the owner stop its group after
    23 ms ("runs here without a claim"). Within the lease it is an outage, not an empty store."""
    c = make_cluster(nodes=("n1",), cluster_extra=LONG, groups="")
    c.write("groups.toml", Cluster.guard_group("web", c.guard_log))
    c.start()
    wait_until(lambda: c.runs_on_one("web") == "n1", 15, what="web running on n1")
    time.sleep(0.5)
    before = set(c.running("web"))
    stops_before = open(c.guard_log).read().count(" stop ")
    os.rename(c.store, c.root / "store-away")
    time.sleep(1.5)
    os.rename(c.root / "store-away", c.store)
    time.sleep(1.0)
    assert c.running("web") == before == {"n1"}
    assert open(c.guard_log).read().count(" stop ") == stops_before  # never stopped
    log = c.nodes["n1"].log.read_text()
    assert "runs here without a claim" not in log
    assert "Traceback" not in log


def test_a_stray_file_in_claims_does_not_stop_failover(make_cluster):
    c = make_cluster(nodes=("n1", "n2"), groups="")
    c.write("groups.toml", Cluster.guard_group("web", c.guard_log, extra='nodes = ["n1", "n2"]'))
    c.start()
    wait_until(lambda: c.runs_on_one("web") == "n1", 15, what="web running on n1")
    (c.store / "claims" / "zz-stray").write_text("a stray file\n")
    time.sleep(0.5)
    c.nodes["n1"].crash()
    wait_until(lambda: c.runs_on_one("web") == "n2", 10, what="web taken over by n2")
    log = c.nodes["n2"].log.read_text()
    assert log.count("skipping claims/zz-stray") == 1, log[-2000:]
    assert "Traceback" not in log


def test_the_agent_refuses_a_store_others_can_write_to(tmp_path):
    c = Cluster(tmp_path, nodes=("n1",))
    c.store.mkdir(mode=0o755)
    os.chmod(c.store, 0o777)
    done = subprocess.run([sys.executable, "-m", "reconciler.cli", "run", "--spec", str(c.spec_dir), "--node", "n1",
                           "--metrics-address", "off"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(c.store) in lines[0] and "writable" in lines[0], done.stderr
