"""The failsafe on real agents (issue 17): a store outage for everyone stops nothing; an owner
cut off from the store alone (or from everything) still demotes by its lease and is taken
over once; a store outage while a member is down stops the groups, and each comes back once.

Every agent runs in a network namespace of its own on one bridge: the peer link (UDP). The
store is the directory store, reached through the filesystem: "the store unreachable for
everyone" is its directory renamed away (every node then finds no store: unreachable, never
empty), and "one node's store link cut" is an empty tmpfs mounted over the store directory
in that node's own mount namespace (it finds no store, its peers still do), so the two links
are cut apart. The etcd variant (every member SIGSTOPped) is at the end. Every test ends
with the double-run checker (make_cluster).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from cluster import Cluster
from helpers import wait_until
from test_etcd_agent import _pause_etcd, records

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare", "ip", "mount", "nsenter")]

NODES = ("n1", "n2", "n3")
GROUPS = tuple(f"g{i}" for i in range(1, 7))
# Short timings that ride out a loaded 2-core machine: the outage below (5 s) is over six
# leases; dead_after > (0.8 + 0.05 + 0.1) x 1.02.
TIMING = """
[cluster.timing]
heartbeat = "100ms"
lease = "800ms"
demote_margin = "200ms"
dead_after = "1.2s"
"""
DEAD_AFTER, LEASE = 1.2, 0.8
OUTAGE = 5.0
SECRET = b"failsafe-test-secret-0123456789abcdef"


def starts_stops(c: Cluster, after: float = 0.0) -> list[tuple[float, str, str, str, int]]:
    return [r for r in records(c.guard_log, "start", "stop") if r[0] > after]


def settled(c: Cluster, timeout: float = 25.0) -> dict[str, str]:
    """Every group running on exactly one node, and nothing started or stopped for a lease."""
    deadline = time.monotonic() + timeout
    for g in GROUPS:
        wait_until(lambda: c.runs_on_one(g), timeout, what=f"{g} on one node")
    while True:
        last = starts_stops(c)
        time.sleep(LEASE + 0.2)
        if starts_stops(c) == last and all(c.runs_on_one(g) for g in GROUPS):
            return {g: c.runs_on_one(g) for g in GROUPS}
        assert time.monotonic() < deadline, "the cluster never settled"


@pytest.fixture
def topology():
    from netns import Topology

    topo = Topology(f"rcf{os.getpid() % 100000}")
    try:
        yield topo
    finally:
        topo.cleanup()


def start_with_failsafe(make_cluster, tmp_path, agents: dict[str, str], **options) -> Cluster:
    """Three agents (in the namespaces `agents`, on 198.51.100.21-23) with the failsafe on,
    six guard groups spread over them, settled (`before`: where each group runs)."""
    secret = tmp_path / "peer.secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    groups = "".join(Cluster.guard_group(g, str(tmp_path / "guard.log")) for g in GROUPS)
    c = make_cluster(netns=agents, own_specs=True, cluster_extra=TIMING, groups=groups, **options)
    for i, n in enumerate(NODES):
        c.write("node.toml", f"""
            [cluster]
            peer_listen = "198.51.100.{21 + i}:7946"
            peer_secret_file = "{secret}"
        """, node=n)
    c.start()
    c.before = settled(c)
    return c


def peer_spaces(topology) -> dict[str, str]:
    return {n: topology.add(n, f"198.51.100.{21 + i}") for i, n in enumerate(NODES)}


@pytest.fixture
def failsafe_cluster(topology, make_cluster, tmp_path):
    return start_with_failsafe(make_cluster, tmp_path, peer_spaces(topology))


def store_away(c: Cluster) -> None:
    os.rename(c.store, c.store.with_name("store.away"))


def store_back(c: Cluster) -> None:
    if c.store.exists():
        # An agent restarted during the outage set up a new, empty store in its place (as one
        # would on an unmounted share): moved aside, the one the others know comes back.
        os.rename(c.store, c.store.with_name(f"store.fresh-{time.monotonic_ns()}"))
    os.rename(c.store.with_name("store.away"), c.store)


def cut_store(c: Cluster, node: str, *, check: bool = True) -> bool:
    """An empty tmpfs over the store directory in `node`'s mount namespace: only it loses the store."""
    out = subprocess.run(["nsenter", "-t", str(c.nodes[node].agent_pid), "-m", "mount", "-t", "tmpfs", "-o", "size=64k",
                          "cut", str(c.store)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 or not check, out.stderr
    return out.returncode == 0


def test_a_store_outage_for_everyone_stops_nothing_and_a_member_down_stops_the_groups_once(failsafe_cluster):
    c = failsafe_cluster
    before_at = time.monotonic()
    store_away(c)
    try:
        time.sleep(OUTAGE)  # the outage: its length is the test
    finally:
        store_back(c)
    time.sleep(DEAD_AFTER + 0.5)
    assert starts_stops(c, before_at) == [], "a store outage for everyone stopped or moved something"
    assert {g: c.runs_on_one(g) for g in GROUPS} == c.before
    assert "running on promises" in "".join(c.nodes[n].log.read_text() for n in NODES)
    # The same outage while a member is down: nobody can vouch for it, so the owners demote
    # by their leases (docs/operations.md), and each group comes back once with the store.
    down = "n3"
    c.nodes[down].crash()
    after = settled(c)
    assert all(n != down for n in after.values())
    crashed_at = time.monotonic()
    store_away(c)
    try:
        wait_until(lambda: not any(c.running(g) for g in GROUPS), LEASE + 3, what="every group to stop")
        time.sleep(1.0)
    finally:
        store_back(c)
    back_at = time.monotonic()
    again = settled(c)
    starts = [r for r in records(c.guard_log, "start") if r[0] > back_at]
    assert sorted(r[3] for r in starts) == sorted(GROUPS), starts
    stops = [r for r in records(c.guard_log, "stop") if r[0] > crashed_at]
    assert sorted(r[3] for r in stops if r[0] < back_at) == sorted(GROUPS)
    assert all(n != down for n in again.values())


@pytest.mark.parametrize("peer_link", ["up", "cut"])
def test_an_owner_cut_off_from_the_store_demotes_by_its_lease_and_is_taken_over_once(failsafe_cluster, topology, peer_link):
    c = failsafe_cluster
    owner = c.before["g1"]
    mine = sorted(g for g, n in c.before.items() if n == owner)
    cut_at = time.monotonic()
    cut_store(c, owner)
    if peer_link == "cut":
        topology.cut(owner)
    for g in mine:
        wait_until(lambda: (n := c.runs_on_one(g)) and n != owner, DEAD_AFTER + LEASE + 6, what=f"{g} taken over")
    stops = {r[3]: r[0] for r in records(c.guard_log, "stop") if r[2] == owner and r[0] > cut_at}
    starts = {r[3]: r[0] for r in records(c.guard_log, "start") if r[2] != owner and r[0] > cut_at}
    for g in mine:
        assert stops[g] - cut_at < LEASE + 0.5, f"{owner} demoted {g} by its lease"
        assert stops[g] < starts[g], f"{g}: the cut-off owner stopped before the takeover started"
    assert "self-demotion" in c.nodes[owner].log.read_text()
    # the others' groups never moved
    assert all(c.runs_on_one(g) == n for g, n in c.before.items() if n != owner)


# --- etcd: the store on a second bridge, every member paused ------------------------------


def etcd_on_a_store_bridge(topology, store_net, base: Path):
    """The agents' namespaces on the peer bridge (`topology`), a 3-member etcd on a bridge of
    its own (`store_net`) that every agent joins with a second link: (etcd started, agents'
    namespaces, an observer's namespace on the store bridge)."""
    from netns import NetnsEtcdCluster

    hosts = [f"192.0.2.{11 + i}" for i in range(3)]
    spaces = [store_net.add(f"m{i + 1}", h) for i, h in enumerate(hosts)]
    agents = peer_spaces(topology)
    for i, n in enumerate(NODES):
        store_net.attach(n, agents[n], f"192.0.2.{21 + i}")
    observer = store_net.add("obs", "192.0.2.30")
    return NetnsEtcdCluster(spaces, hosts, base / "etcd").start(timeout=20), agents, observer


@pytest.mark.needs("etcd")
def test_every_etcd_member_paused_stops_nothing(topology, make_cluster, tmp_path):
    """The agents on the peer bridge; etcd's members and a second link of every agent on a
    bridge of their own (the store link). Every member SIGSTOPped for OUTAGE seconds."""
    from netns import Topology

    store_net = Topology(f"rcs{os.getpid() % 100000}")
    etcd = None
    try:
        etcd, agents, observer = etcd_on_a_store_bridge(topology, store_net, tmp_path)
        c = start_with_failsafe(make_cluster, tmp_path, agents, store=etcd.url, store_netns=observer)
        before = c.before
        paused_at = time.monotonic()
        _pause_etcd(etcd, OUTAGE)  # every member SIGSTOPped: its length is the test
        time.sleep(DEAD_AFTER + 1.0)
        assert starts_stops(c, paused_at) == [], "an etcd outage stopped or moved something"
        assert {g: c.runs_on_one(g) for g in GROUPS} == before
        c.stop()  # while etcd answers: the agents release their claims
    finally:
        if etcd is not None:
            etcd.stop()
        store_net.cleanup()


# --- a randomized run ------------------------------------------------------------------------


def uncut_store(c: Cluster, pid: int) -> None:
    subprocess.run(["nsenter", "-t", str(pid), "-m", "umount", str(c.store)], capture_output=True, timeout=10)


def test_randomized_outages_cuts_kills_and_pauses_never_run_a_group_twice(failsafe_cluster, topology):
    """RECONCILER_FAULTS faults (default 200; RECONCILER_FAULT_SEED) with the failsafe on: the
    store away for everyone, one node's store link cut, one node's peer link cut (each for
    0.05-1.2 s), a node killed (restarted 0.2-1 s later), an agent paused (0.05-1.2 s). At no
    moment does a group run on two nodes (the checker), and once the faults end every group
    runs exactly once."""
    import random

    c = failsafe_cluster
    faults = int(os.environ.get("RECONCILER_FAULTS", "200"))
    seed = int(os.environ.get("RECONCILER_FAULT_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    history: list[str] = []
    undo: dict[str, tuple[float, object]] = {}  # what -> (when, how to undo it)
    last_start = float("-inf")

    def restart(node: str) -> None:
        nonlocal last_start
        c.nodes[node].start()
        last_start = time.monotonic()
    try:
        done = 0
        while done < faults or undo:
            now = time.monotonic()
            for what, (at, fn) in list(undo.items()):
                if now >= at:
                    fn()  # type: ignore[operator]
                    del undo[what]
                    history.append(f"{now:.3f} undo {what}")
            busy = {w.split(":")[1] for w in undo if ":" in w}
            free = [n for n in NODES if n not in busy] if len(busy) < 2 else []  # at most two nodes impaired
            # A rename and a mount over the store exclude each other; an agent started while
            # the store is away would create a new one, and one that finds a tmpfs there
            # refuses to start (Store.setup): neither while an agent restarts.
            cuts = any(w.startswith("store-") for w in undo)
            starting = any(w.startswith("kill:") for w in undo) or now - last_start < 2.0
            kinds = {"store-away": not cuts and not starting, "store-cut": bool(free) and not cuts and not starting,
                     "peer-cut": bool(free), "kill": bool(free) and "store-away" not in undo, "pause": bool(free)}
            allowed = [k for k, ok in kinds.items() if ok]
            if done < faults and allowed:
                kind, victim = rng.choice(allowed), rng.choice(free or NODES)
                span = rng.uniform(0.05, 1.2)  # (up to 1.5 leases: outages the failsafe must ride out, cuts past a lease)
                if kind == "store-away":
                    store_away(c)
                    undo["store-away"] = (now + span, lambda: store_back(c))
                elif kind == "store-cut":
                    pid = c.nodes[victim].agent_pid
                    cut_store(c, victim)
                    undo[f"store-cut:{victim}"] = (now + span, lambda pid=pid: uncut_store(c, pid))
                elif kind == "peer-cut":
                    topology.cut(victim)
                    undo[f"peer-cut:{victim}"] = (now + span, lambda v=victim: topology.restore(v))
                elif kind == "kill":
                    c.nodes[victim].crash()
                    undo[f"kill:{victim}"] = (now + rng.uniform(0.2, 1.0), lambda v=victim: restart(v))
                else:
                    c.nodes[victim].pause()
                    undo[f"pause:{victim}"] = (now + min(span, 1.5), lambda v=victim: c.nodes[v].resume())
                history.append(f"{now:.3f} {kind} {victim} {span:.2f}")
                done += 1
            time.sleep(rng.uniform(0.02, 0.12))  # random gaps between faults: the schedule is the test
        c.each_runs_once(GROUPS, 20)
    finally:
        (c.root / "faults.log").write_text(f"seed {seed}\n" + "\n".join(history) + "\n")
        for _at, fn in undo.values():
            fn()  # type: ignore[operator]
    assert c.violations() == [], f"seed {seed}:\n" + "\n".join(c.violations()[:20])
