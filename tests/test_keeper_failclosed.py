"""The keeper and the lease file fail closed (issue 12, item 3 and the keeper half of 4).

The first tests run the keeper alone on a node directory the test writes (a lease record,
a processes.json naming a `sleep` the test started); the others run real agents under
tests/cluster.py, two on one store, with the double-run checker (make_cluster).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster import Cluster
from helpers import wait_until
from reconciler import keeper
from reconciler.host import leaserecord
from reconciler.host import procfs

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare", "mount", "nsenter")]
FAILOVER = 3.0


# --- the keeper alone ------------------------------------------------------------------------


class Node:
    """A node directory with a recorded victim process, and a keeper watching it."""

    def __init__(self, root: Path, lease: bytes | None):
        self.dir = root / "n1"
        self.dir.mkdir()
        if lease is not None:
            (self.dir / "lease").write_bytes(lease)
        self.victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
        (self.dir / "processes.json").write_text(json.dumps({"records": [
            {"pid": self.victim.pid, "pgid": self.victim.pid, "state": "running", "ticks": procfs.start_ticks(self.victim.pid)}]}))
        self.keeper: subprocess.Popen | None = None

    def start_keeper(self, *prefix: str) -> subprocess.Popen:
        self.keeper = subprocess.Popen([*prefix, sys.executable, "-m", "reconciler.keeper", str(self.dir)])
        return self.keeper

    def close(self) -> None:
        for p in (self.keeper, self.victim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)


@pytest.fixture
def node(tmp_path):
    made = []

    def make(lease: bytes | None) -> Node:
        n = Node(tmp_path, lease)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def test_a_deleted_lease_file_is_no_renewal_and_no_exit(node):
    """The old keeper took a missing lease file for a clean shutdown and exited: deleting
    STATE/NODE/lease switched it off. Now the last deadline it read stands."""
    n = node(leaserecord.lease_record(time.monotonic() + 1.5))
    k = n.start_keeper()
    wait_until(lambda: (n.dir / "keeper.pid").exists(), 10, what="the keeper to start")  # written once it has read the lease
    (n.dir / "lease").unlink()
    time.sleep(0.8)  # the old keeper saw the missing file within IDLE_MAX (0.5 s) and exited: the time passing is the test
    assert k.poll() is None, "the keeper exited on a deleted lease file"
    assert n.victim.poll() is None, "killed before the deadline it had read"
    assert n.victim.wait(5) == -signal.SIGKILL  # at that deadline
    time.sleep(0.6)  # the time passing is the test
    assert k.poll() is None, "nothing alive, but no release either: it keeps watch"
    text = (n.dir / "keeper.log").read_text()
    assert "missing or not a valid record" in text and "SIGKILL" in text, text


@pytest.mark.parametrize("content", [None, b"", b"garbage\n", "truncated"])
def test_a_keeper_without_a_valid_lease_record_kills_at_once(node, content):
    """Started while the file is missing, empty, garbage, or a record cut short before its
    checksum (which the old keeper read as a deadline): the lease counts as lapsed."""
    if content == "truncated":
        content = leaserecord.lease_record(time.monotonic() + 1000)[:20]  # the deadline, no checksum
    n = node(content)
    t0 = time.monotonic()
    k = n.start_keeper()
    assert n.victim.wait(5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 3.0
    time.sleep(0.6)  # the time passing is the test
    assert k.poll() is None  # and it keeps watch


def test_released_record_with_a_live_process_kills_it_then_exits(node):
    n = node(leaserecord.lease_record(leaserecord.RELEASED))
    k = n.start_keeper()
    assert n.victim.wait(5) == -signal.SIGKILL
    assert k.wait(5) == 0
    assert "lease released: SIGKILL" in (n.dir / "keeper.log").read_text()


def test_released_and_nothing_alive_exits_and_a_record_brings_it_back_to_work(node):
    """Only a checksummed "released" record ends the keeper, and only with nothing alive;
    a valid deadline written instead (an agent starting again) keeps it at work."""
    n = node(leaserecord.lease_record(time.monotonic() + 30))
    k = n.start_keeper()
    wait_until(lambda: (n.dir / "keeper.pid").exists(), 10, what="the keeper to start")
    (n.dir / "lease").write_bytes(b"            released 00000000\n")  # a bad checksum: not a release
    time.sleep(0.8)  # the time passing is the test
    assert k.poll() is None and n.victim.poll() is None  # the deadline read before still stands
    n.victim.kill()
    n.victim.wait(5)
    (n.dir / "lease").write_bytes(leaserecord.lease_record(leaserecord.RELEASED))
    assert k.wait(5) == 0


def test_unwritable_log_and_pid_file_do_not_stop_the_keeper(node):
    """keeper.pid and keeper.log cannot be written (directories in their place): the old
    keeper died on the pid file; this one still kills at the deadline."""
    n = node(leaserecord.lease_record(time.monotonic() + 1.0))
    (n.dir / "keeper.pid").mkdir()
    (n.dir / "keeper.log").mkdir()
    k = n.start_keeper()
    assert n.victim.wait(5) == -signal.SIGKILL
    time.sleep(0.3)  # the time passing is the test
    assert k.poll() is None


def test_a_full_disk_does_not_stop_the_keeper(node, tmp_path):
    """The node directory on a full tmpfs (in a private mount namespace): no log line, no
    pid file can be written; the keeper still kills at the deadline and keeps watch."""
    n = node(None)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "lease").write_bytes(leaserecord.lease_record(time.monotonic() + 1.5))
    (stage / "processes.json").write_text((n.dir / "processes.json").read_text())
    script = (
        f'mount -t tmpfs -o size=64k tmpfs {n.dir} && cp {stage}/lease {stage}/processes.json {n.dir}/ '
        f'&& : > {n.dir}/keeper.lock && (dd if=/dev/zero of={n.dir}/fill bs=4k 2>/dev/null; true) && exec "$@"'
    )
    k = n.start_keeper("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")
    time.sleep(0.8)  # the keeper outlives the full disk: the time passing is the test
    assert k.poll() is None, "the keeper died on a full disk"
    assert n.victim.poll() is None
    assert n.victim.wait(5) == -signal.SIGKILL
    time.sleep(0.3)  # the time passing is the test
    assert k.poll() is None


# --- real agents --------------------------------------------------------------------------------


def keepers(state: Path, node: str) -> list[psutil.Process]:
    """The live keeper processes of `node` (seen from the host's pid namespace)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"][-2:] == ["reconciler.keeper", str(state / node)] and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, TypeError):
            pass
    return out


def test_deleted_lease_file_then_paused_owner_never_overlaps(make_cluster, tmp_path):
    """The issue's reproduction: delete the owner's STATE/NODE/lease, then SIGSTOP its agent
    past dead_after. The old keeper had exited at the deletion, and the peer took over
    while the owner's copy ran on. Now the keeper kills it before the peer starts one."""
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1", "n2"), groups=Cluster.guard_group("g1", log))
    c.start()
    owner = wait_until(lambda: c.runs_on_one("g1"), 10, what="g1 running")
    lease = tmp_path / "state" / owner / "lease"
    lease.unlink()
    time.sleep(0.8)  # the old keeper has exited by now: the time passing is the test
    assert keepers(tmp_path / "state", owner), "the keeper exited on a deleted lease file"
    assert leaserecord.read_deadline(str(lease)) not in (None, leaserecord.RELEASED), "the agent writes a new lease file"
    c.nodes[owner].pause()
    new = wait_until(lambda: (n := c.runs_on_one("g1")) and n != owner and n, FAILOVER, what="takeover from the paused owner")
    time.sleep(1.0)  # the owner stays paused past the takeover: the scenario
    c.nodes[owner].resume()
    time.sleep(1.5)  # the resumed owner runs nothing: the time passing is the test
    assert c.runs_on_one("g1") == new
    assert c.violations() == []
    assert "SIGKILL" in (tmp_path / "state" / owner / "keeper.log").read_text()


def test_deleted_lease_then_paused_at_once_the_keeper_still_fires(make_cluster, tmp_path):
    """Deleted and paused in the same instant (the agent had no renewal to notice it): the
    keeper fires at the last deadline it read."""
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1", "n2"), groups=Cluster.guard_group("g1", log))
    c.start()
    owner = wait_until(lambda: c.runs_on_one("g1"), 10, what="g1 running")
    c.nodes[owner].pause()
    (tmp_path / "state" / owner / "lease").unlink()
    new = wait_until(lambda: (n := c.runs_on_one("g1")) and n != owner and n, FAILOVER, what="takeover from the paused owner")
    time.sleep(1.0)  # the time passing is the test
    assert c.runs_on_one("g1") == new
    assert c.violations() == []
    c.nodes[owner].resume()
    time.sleep(1.0)  # the resumed owner runs nothing: the time passing is the test
    assert c.runs_on_one("g1") == new
    assert c.violations() == []


def test_keeper_killed_after_the_deletion_is_restarted_and_stays(make_cluster, tmp_path):
    """Every keeper restarted after the deletion exited at once on the old code; now the
    agent's restarted keeper stays, and fires when the agent is paused."""
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1", "n2"), groups=Cluster.guard_group("g1", log))
    c.start()
    owner = wait_until(lambda: c.runs_on_one("g1"), 10, what="g1 running")
    state = tmp_path / "state"
    (state / owner / "lease").unlink()
    time.sleep(0.3)  # the keeper has seen the deletion (renewals go on): the scenario
    old = keepers(state, owner)
    for p in old:
        p.kill()
    restarted = wait_until(lambda: [p for p in keepers(state, owner) if p not in old], 5, what="a new keeper")
    time.sleep(1.5)  # the old code's restarted keepers exited at once, over and over: the time passing is the test
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in restarted), "the restarted keeper exited"
    c.nodes[owner].pause()
    new = wait_until(lambda: (n := c.runs_on_one("g1")) and n != owner and n, FAILOVER, what="takeover from the paused owner")
    time.sleep(1.0)  # the owner stays paused past the takeover: the scenario
    c.nodes[owner].resume()
    assert c.runs_on_one("g1") == new
    assert c.violations() == []


def test_an_unwritable_lease_file_is_no_renewal(make_cluster, tmp_path):
    """The node's state directory is a full tmpfs and its lease file is deleted: the agent
    cannot write a new one, so it does not count its renewals (the keeper would fire at the
    old deadline): its group stops by then, and the error is logged once. Room again: the
    lease file is written anew and the group runs again."""
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1",), groups=Cluster.guard_group("g1", log))
    state = tmp_path / "state" / "n1"
    state.mkdir(parents=True)
    c.pre_exec["n1"] = f"mount -t tmpfs -o size=1m tmpfs {state}"
    node = c.nodes["n1"].start()
    wait_until(lambda: c.runs_on_one("g1") == "n1", 10, what="g1 running")
    inside = Path(f"/proc/{node.agent_pid}/root{state}")
    fill = subprocess.run(["nsenter", "-t", str(node.agent_pid), "-m", "dd", "if=/dev/zero", f"of={state}/fill", "bs=4k"],
                          capture_output=True, timeout=20)
    assert b"No space left" in fill.stderr, fill.stderr
    # Held open, the deleted file keeps its page: the agent finds no room for a new one.
    held = os.open(inside / "lease", os.O_RDONLY)
    try:
        (inside / "lease").unlink()
        wait_until(lambda: c.running("g1") == set(), 3, what="g1 to stop")
        text = node.log.read_text()
        assert text.count("cannot write the lease file") == 1, text
        assert leaserecord.read_deadline(str(inside / "lease")) is None
    finally:
        os.close(held)
    (inside / "fill").unlink()
    wait_until(lambda: c.runs_on_one("g1") == "n1", 10, what="g1 running again")
    assert leaserecord.read_deadline(str(inside / "lease")) not in (None, leaserecord.RELEASED)
    assert "written again" in node.log.read_text()


@pytest.mark.parametrize("how", ["replaced", "appended", "deleted"])
def test_the_agent_repairs_a_replaced_or_altered_lease_file(make_cluster, tmp_path, how):
    """Replaced by another file (rename), grown by junk in place, or deleted: the agent's
    next renewal writes a valid file at the path again (the old agent kept writing to its
    old descriptor), and since the keeper kept the deadline it had read, nothing stops."""
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1",), groups=Cluster.guard_group("g1", log))
    c.start()
    wait_until(lambda: c.runs_on_one("g1") == "n1", 10, what="g1 running")
    lease = tmp_path / "state" / "n1" / "lease"
    before = leaserecord.read_deadline(str(lease))
    if how == "replaced":
        (lease.parent / "junk").write_bytes(b"not a lease\n")
        os.replace(lease.parent / "junk", lease)
    elif how == "appended":
        with open(lease, "ab") as fh:
            fh.write(b"junk\n")
    else:
        lease.unlink()
    wait_until(lambda: (d := leaserecord.read_deadline(str(lease))) not in (None, leaserecord.RELEASED) and d > before, 3,
               what="a valid lease file again")
    time.sleep(1.0)  # nothing stops: the time passing is the test
    assert c.runs_on_one("g1") == "n1"
    assert "SIGKILL" not in ((tmp_path / "state" / "n1" / "keeper.log").read_text()
                             if (tmp_path / "state" / "n1" / "keeper.log").exists() else "")
    assert "was deleted, replaced or altered: writing a new one" in c.nodes["n1"].log.read_text()


def test_anything_alive_sees_the_cgroup_subtree_and_the_markers(tmp_path, monkeypatch):
    """A daemon the table does not know (it double-forked, or the table is lost) still keeps
    the keeper at work: it lives in the node's cgroup subtree, or, without cgroups, carries
    the node's environment marker."""
    from reconciler.host import cgroups

    node_dir = tmp_path / "n9"
    node_dir.mkdir()
    (node_dir / "processes.json").write_text('{"records": []}')
    root = cgroups.node_root("n9")
    assert root is not None, "this machine has a writable cgroup2 hierarchy (see tests/conftest.py)"
    entry = os.path.join(root, "g-x", "e-y")
    os.makedirs(entry)
    daemon = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {entry}/cgroup.procs && exec sleep 60"], start_new_session=True)
    try:
        wait_until(lambda: cgroups.populated(root), 5, what="the daemon in its cgroup")
        assert keeper.anything_alive(str(node_dir))
        daemon.kill()
        daemon.wait(5)
        wait_until(lambda: not cgroups.populated(root), 5, what="the cgroup empty")
        assert not keeper.anything_alive(str(node_dir))
    finally:
        if daemon.poll() is None:
            daemon.kill()
        cgroups.remove(root)
    monkeypatch.setenv(cgroups.SWITCH, "off")
    marked = subprocess.Popen(["sleep", "60"], env={**os.environ, "RECONCILER_NODE_DIR": str(node_dir.resolve()),
                                                     "RECONCILER_ENTRY": "x/y"}, start_new_session=True)
    try:
        wait_until(lambda: keeper.anything_alive(str(node_dir)), 5, what="the marked process seen")
    finally:
        marked.kill()
        marked.wait(5)
    assert not keeper.anything_alive(str(node_dir))


def test_a_released_keeper_stays_for_an_agent_that_started_meanwhile(tmp_path):
    """A new agent that finds the old keeper alive reuses it; the keeper, which read the old
    agent's "released" record, must not exit under it (the randomized fault test once saw a
    restarted node run its groups with no keeper, and a pause then ran them twice). It
    hands over: keeper.pid first, then one more look for an agent."""
    d = tmp_path / "n1"
    d.mkdir()
    (d / "lease").write_bytes(leaserecord.lease_record(leaserecord.RELEASED))
    (d / "keeper.pid").write_text("1 1\n")
    me = os.getpid()
    (d / "agent.pid").write_text(f"{me} {procfs.start_ticks(me)}\n")  # an agent (this test) is alive
    w = keeper.Watch(str(d), str(d / "lease"), keeper.Log(str(d)))
    assert w.step() is not None and (d / "keeper.pid").exists()  # stays, and says so
    (d / "agent.pid").unlink()  # the agent is gone: nothing alive, nobody to guard for
    assert w.step() is None and not (d / "keeper.pid").exists()
