"""Node identity (issue 12, item 5): one agent per node name.

The decision (reconciler/identity.py) is a pure function: a decision table here. The lock,
the --node check, the name check before a fence hook, and the reproduction with two agents
under one name on one store (tests/cluster.py) run real agents.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from cluster import Cluster
from helpers import free_port, reconcile, wait_until
from reconciler import spec as specmod
from reconciler.decide import identity
from reconciler.act import fence as fencemod
from reconciler.decide.identity import Foreign, Observations, Verdict, decide, observe, watch_until
from reconciler.model import NAME_RE, Heartbeat, valid_name
from reconciler.store.factory import open_store

D, HB = 0.65, 0.1  # dead_after, heartbeat
ME, OTHER = "5" * 16, "a" * 16  # ME < OTHER: ME resumes first after both yielded


def obs(*, watch_until=0.0, published_at=None, continuous_since=None, yielded=False, foreign=None) -> Observations:
    return Observations(instance=ME, watch_until=watch_until, published_at=published_at,
                        continuous_since=continuous_since, yielded=yielded, foreign=foreign)


def live(first_seen: float, last_change: float, *, known_at_start=False, instance=OTHER) -> Foreign:
    return Foreign(instance=instance, counter=9, first_seen=first_seen, last_change=last_change, advanced=True,
                   known_at_start=known_at_start)


def once(first_seen: float) -> Foreign:
    """Seen once, never advancing: maybe a dead agent's last record."""
    return Foreign(instance=OTHER, counter=9, first_seen=first_seen, last_change=first_seen)


# (name, observations, now, expected state, publish, claim, run)
TABLE = [
    ("newcomer still watching", obs(watch_until=10.65), 10.3, "watch", False, False, True),
    ("newcomer, watch over, nobody there: publishes, claims nothing yet", obs(watch_until=10.65), 10.7, "hold", True, False, True),
    ("newcomer, a record seen once during the watch: it must stand still dead_after",
     obs(watch_until=10.3, foreign=once(10.2)), 10.5, "watch", False, False, True),
    ("newcomer, that record stood still dead_after: a dead agent's", obs(watch_until=10.3, foreign=once(10.2)),
     10.9, "hold", True, False, True),
    ("newcomer, the record advances under another id: yield, never publish",
     obs(watch_until=10.65, foreign=live(10.0, 10.4, known_at_start=True)), 10.5, "yield", False, False, False),
    ("newcomer that yielded: the other keeps advancing", obs(watch_until=10.65, yielded=True,
                                                              foreign=live(10.0, 12.0, known_at_start=True)),
     12.1, "yield", False, False, False),
    ("just published: claims held for HOLD heartbeats", obs(published_at=10.0, continuous_since=10.0), 10.2,
     "hold", True, False, True),
    ("published and settled", obs(published_at=10.0, continuous_since=10.0), 10.31, "ok", True, True, True),
    ("incumbent: renewing without a break since well before the twin appeared",
     obs(published_at=1.0, continuous_since=1.0, foreign=live(20.0, 20.3)), 20.4, "incumbent", True, False, True),
    ("the twin was in the record before this agent started: yield",
     obs(published_at=1.0, continuous_since=1.0, foreign=live(0.5, 20.3, known_at_start=True)), 20.4,
     "yield", False, False, False),
    ("the lease lapsed since (a pause): cannot prove it came first: yield",
     obs(published_at=1.0, continuous_since=19.9, foreign=live(20.0, 20.3)), 20.4, "yield", False, False, False),
    ("the lease is not valid now: yield", obs(published_at=1.0, continuous_since=None, foreign=live(20.0, 20.3)),
     20.4, "yield", False, False, False),
    ("two newcomers published together: neither came first: yield",
     obs(published_at=10.0, continuous_since=10.0, foreign=live(10.1, 10.2)), 10.25, "yield", False, False, False),
    ("the twin stopped advancing dead_after ago (it yielded or died): ok again",
     obs(published_at=1.0, continuous_since=1.0, foreign=live(20.0, 20.3)), 20.96, "ok", True, True, True),
    ("both yielded, the other quiet dead_after: the smaller id resumes", obs(
        published_at=1.0, yielded=True, foreign=live(20.0, 20.3)), 20.96, "ok", True, True, True),
    ("both yielded, the other quiet dead_after: the larger id waits twice that", obs(
        published_at=1.0, yielded=True, foreign=live(20.0, 20.3, instance="0" * 16)), 20.96, "yield", False, False, False),
    ("...and resumes after 2 x dead_after", obs(published_at=1.0, yielded=True, foreign=live(20.0, 20.3, instance="0" * 16)),
     21.61, "ok", True, True, True),
    ("a foreign record seen once after publishing (one stray write): not a twin",
     obs(published_at=1.0, continuous_since=1.0, foreign=once(20.0)), 20.1, "ok", True, True, True),
]


@pytest.mark.parametrize("name, o, now, state, publish, claim, run", TABLE, ids=[row[0] for row in TABLE])
def test_decision_table(name, o, now, state, publish, claim, run):
    v = decide(o, now, dead_after=D, heartbeat=HB)
    assert (v.state, v.publish, v.claim, v.run) == (state, publish, claim, run), v
    assert bool(v.twin) == (state in ("yield", "incumbent")), v.twin
    if v.twin:
        assert "\n" not in v.twin and "another agent" in v.twin


def test_two_agents_under_one_name_are_never_both_incumbents():
    """Two agents A and B, each renewing without a break since its first publish (a0, b0),
    each having watched W before it, each seeing the other's records d after they began
    (or after its own watch began): whatever the times, at most one keeps running."""
    grid = (0.0, 0.1, 0.3, 0.65, 1.0, 5.0)
    for a0 in grid:
        for b0 in grid:
            for wa in (0.3, D):
                for wb in (0.3, D):
                    for da in (0.0, HB, 2 * HB):
                        for db in (0.0, HB, 2 * HB):
                            seen_by_a = max(b0, a0 - wa) + da
                            seen_by_b = max(a0, b0 - wb) + db
                            now = max(seen_by_a, seen_by_b) + 0.05
                            va = decide(obs(published_at=a0, continuous_since=a0,
                                            foreign=live(seen_by_a, now - 0.01, known_at_start=seen_by_a < a0)),
                                        now, dead_after=D, heartbeat=HB)
                            vb = decide(obs(published_at=b0, continuous_since=b0,
                                            foreign=live(seen_by_b, now - 0.01, known_at_start=seen_by_b < b0)),
                                        now, dead_after=D, heartbeat=HB)
                            assert not (va.run and vb.run), (a0, b0, wa, wb, da, db, va, vb)
                            assert not (va.claim or vb.claim)


def test_observe_folds_sightings():
    me, pred = "1" * 16, "2" * 16
    rec = lambda inst, c: Heartbeat(node="n1", counter=c, instance=inst)  # noqa: E731
    f = observe(None, rec(me, 5), me=me, predecessor=pred, now=1.0, published=False)
    assert f is None  # our own record
    f = observe(None, rec(pred, 5), me=me, predecessor=pred, now=1.0, published=False)
    assert f is None  # the dead predecessor's (this agent holds the lock)
    f = observe(None, rec(OTHER, 5), me=me, predecessor=pred, now=1.0, published=False)
    assert f == Foreign(OTHER, 5, 1.0, 1.0, advanced=False, known_at_start=True)
    assert observe(f, rec(OTHER, 5), me=me, predecessor=pred, now=1.5, published=False) is f  # standing still
    g = observe(f, rec(OTHER, 7), me=me, predecessor=pred, now=1.6, published=True)
    assert g.advanced and g.last_change == 1.6 and g.first_seen == 1.0 and g.known_at_start
    h = observe(g, rec("", 3), me=me, predecessor=pred, now=2.0, published=True)  # an older version's record
    assert h.instance == "" and not h.advanced and not h.known_at_start


def test_watch_until():
    pred = "2" * 16
    assert watch_until(5.0, Heartbeat(node="n1", counter=1, instance=pred), pred, dead_after=D, heartbeat=HB) == 5.0
    assert watch_until(5.0, None, pred, dead_after=D, heartbeat=HB) == 5.0  # (claims are held after publishing)
    assert watch_until(5.0, Heartbeat(node="n1", counter=1, instance=OTHER), pred, dead_after=D, heartbeat=HB) == 5.65
    assert watch_until(5.0, Heartbeat(node="n1", counter=1), "", dead_after=D, heartbeat=HB) == 5.65


def test_verdict_is_a_frozen_value():
    v = Verdict("ok", publish=True, claim=True, run=True, twin="")
    with pytest.raises(Exception):
        v.state = "yield"  # type: ignore[misc]


# --- names ---------------------------------------------------------------------------------


def test_one_name_pattern():
    assert NAME_RE.pattern == specmod.NAME_RE.pattern
    for good in ("n1", "db-2", "a.b_c", "X" * 64):
        assert valid_name(good), good
    for bad in ("", "-all", "--all", ".hidden", "n1\n", "a b", "a/b", "x" * 65, "n1:2", None, 3):
        assert not valid_name(bad), bad


def test_fence_refuses_a_name_that_would_be_an_option(tmp_path):
    marker = tmp_path / "ran"
    hook = ("/bin/sh", "-c", f'echo "$1" > {marker}', "sh", "--all")
    out = asyncio.run(fencemod.fence(hook, node="--all", timeout=2))
    assert not out.ok and "refused" in out.message
    assert not marker.exists()
    ok = asyncio.run(fencemod.fence(hook[:-1] + ("n2",), node="n2", timeout=2))
    assert ok.ok and marker.read_text() == "n2\n"


# --- the CLI and the lock -----------------------------------------------------------------------


def small_spec(tmp_path) -> str:
    spec = tmp_path / "spec"
    spec.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    (spec / "cluster.toml").write_text(f'[cluster]\nname = "t"\nstore = "dir:{tmp_path / "store"}"\nstate_dir = "{tmp_path / "state"}"\n')
    os.chmod(spec / "cluster.toml", 0o644)
    return str(spec)


@pytest.mark.parametrize("node", ["", "--all", "-x", ".", "bad name"])
def test_invalid_node_names_are_refused(tmp_path, node):
    spec = small_spec(tmp_path)
    done = reconcile("run", "--spec", spec, f"--node={node}", "--metrics-address", "off", timeout=20)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--node" in lines[0] and "not a valid node name" in lines[0], done.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was created


def test_second_agent_with_the_same_name_and_state_dir_exits_at_once(make_cluster):
    c = make_cluster(nodes=("n1",))
    c.start()
    lock = c.root / "state" / "n1" / "agent.lock"
    wait_until(lambda: lock.exists() and c.members().get("n1"), 10, what="n1 publishing")
    t0 = time.monotonic()
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "reconciler.cli", "run", "--spec",
         str(c.spec_dir), "--node", "n1", "--metrics-address", "off"],
        capture_output=True, text=True, timeout=20,
    )
    assert done.returncode == 1
    assert time.monotonic() - t0 < 10
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "node n1" in lines[0] and str(lock) in lines[0], done.stderr
    assert c.nodes["n1"].running


# --- two agents under one name on one store (the reproduction) ------------------------------

TWO_GROUPS = "".join(
    Cluster.guard_group(g, "{log}", extra='nodes = ["n1", "n2"]') for g in ("web", "db")
)


def guard_starts(c, node: str) -> int:
    return sum(1 for line in open(c.guard_log) if line.split()[1:3] == ["start", node])


def guard_pids(c, group: str) -> list[psutil.Process]:
    """The guard processes of `group` (seen from here, outside the nodes' pid namespaces)."""
    out = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if p.info["cmdline"] and c.guard_log in p.info["cmdline"] and (p.info["environ"] or {}).get("RECONCILER_GROUP") == group:
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_a_second_agent_under_the_same_name_on_another_machine_runs_nothing(make_cluster):
    c = make_cluster(nodes=("n1", "n2"))
    c.write("groups.toml", TWO_GROUPS.replace("{log}", c.guard_log))
    c.start("n1")
    wait_until(lambda: c.runs_on_one("web") == "n1" and c.runs_on_one("db") == "n1", 15, what="both groups on n1")
    c.start("n2")
    twin = c.add_twin("n1")
    twin.start()
    wait_until(lambda: "node name n1: another agent publishes under this node's name" in twin.log.read_text(), 10,
               what="the twin reported")
    line = next(ln for ln in twin.log.read_text().splitlines() if "another agent publishes" in ln)
    assert "WARNING" in line and "claiming nothing" in line
    time.sleep(2.0)  # three dead_after: it never publishes, claims or starts anything
    assert c.running("web") == c.running("db") == {"n1"}
    assert guard_starts(c, "n1@b") == 0
    assert twin.running and c.nodes["n1"].running
    # nobody double-respawns: the incumbent respawns its process once, the twin not at all
    starts = guard_starts(c, "n1")
    (victim,) = guard_pids(c, "web")
    victim.kill()
    wait_until(lambda: guard_starts(c, "n1") == starts + 1, 10, what="web respawned on n1")
    time.sleep(1.0)  # and only once: the time passing is the test
    assert guard_starts(c, "n1") == starts + 1 and guard_starts(c, "n1@b") == 0
    assert len(guard_pids(c, "web")) == 1
    # the incumbent's machine dies: its groups come back exactly once (n2, or the agent that
    # takes the name over); the checker (make_cluster) proves they never ran twice
    c.nodes["n1"].crash()
    wait_until(lambda: c.runs_on_one("web") and c.runs_on_one("db"), 20, what="both groups running again")
    time.sleep(1.0)  # and only once: the time passing is the test
    assert len(c.running("web")) == 1 and len(c.running("db")) == 1


def test_an_incumbent_that_sees_a_twin_keeps_running_claims_nothing_and_says_so(make_cluster):
    """A writer that breaks the newcomer's rule (an older version, a stale read): the agent
    that was there first keeps its group, claims nothing, and reports the twin in its log,
    its status and its metrics until the other stops."""
    port = free_port()
    c = make_cluster(nodes=("n1",), metrics={"n1": f"127.0.0.1:{port}"})
    c.write("groups.toml", Cluster.guard_group("web", c.guard_log))
    c.start()
    wait_until(lambda: c.runs_on_one("web") == "n1", 15, what="web on n1")
    time.sleep(1.0)  # renewing for longer than dead_after before the intruder appears
    stop = threading.Event()

    def intruder():
        async def go():
            store = open_store(f"dir:{c.store}")
            counter = 10**15
            while not stop.is_set():
                counter += 1
                await store.publish(Heartbeat(node="n1", counter=counter, instance="f" * 16))
                await asyncio.sleep(0.05)  # the intruder's heartbeat period
            await store.close()

        asyncio.run(go())

    t = threading.Thread(target=intruder, daemon=True)
    t.start()
    try:
        wait_until(lambda: "keeping what runs here, claiming nothing" in c.nodes["n1"].log.read_text(), 10, what="twin logged")
        c.write("more.toml", Cluster.guard_group("api", c.guard_log))  # a group it would claim at once
        scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: E731
        wait_until(lambda: 'reconciler_node_twin{node="n1"} 1.0' in scrape(), 10, what="twin metric")
        doc = c.nodes["n1"].run("status", "--spec", str(c.spec_dir), "--node", "n1")
        assert "twin: another agent publishes under this node's name" in doc.stdout, doc.stdout + doc.stderr
        time.sleep(1.5)  # the time passing is the test
        assert c.running("web") == {"n1"} and c.running("api") == set()  # keeps web, claims nothing
        assert c.owner("api") is None
    finally:
        stop.set()
        t.join(5)
    wait_until(lambda: c.runs_on_one("api") == "n1", 15, what="api claimed once the twin is gone")
    assert 'reconciler_node_twin{node="n1"} 0.0' in scrape()
    assert c.running("web") == {"n1"}


@pytest.mark.parametrize("state", ["watch", "hold", "ok", "incumbent", "yield"])
@pytest.mark.parametrize("published", [False, True])
def test_a_clean_shutdown_releases_the_names_claims_only_when_they_are_this_agents(state, published):
    v = Verdict(state, publish=True, claim=True, run=True, twin="")
    assert identity.may_release(v, published=published) == (published and state != "yield")
