"""Operator intents against real agents (issue 15): `reconcile move` (with and without a
target, to an ineligible node), `standby`/`unstandby`, `maintenance on|off`, and `--wait`
(exit 0 done, exit 1 timed out). The double-run checker (tests/safety.py) runs throughout:
make_cluster fails the test on any moment a group ran on two nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster import Cluster
from helpers import wait_until
from test_resources_agent import lab  # noqa: F401 (the fixture: network namespaces, torn down after)

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]


def reconcile(c: Cluster, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`reconcile ARGS` from this machine, which is not a member (as an operator runs it)."""
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args, "--spec", str(c.spec_dir)],
                          capture_output=True, text=True, timeout=timeout)


def pids(c: Cluster) -> dict[str, tuple[str, int]]:
    """group -> (node, pid) of its one live guard."""
    return {p["group"]: (p["node"], p["pid"]) for p in c.guard_processes()}


def shown(c: Cluster, node: str) -> list[str]:
    """The maintenance keys `node` publishes in its status (NodeStatus.maintenance)."""
    try:
        return json.loads((c.store / "status" / f"{node}.json").read_text()).get("maintenance", [])
    except (OSError, ValueError):
        return []


def groups(log: str, *names: str, nodes: str = '["n1", "n2"]') -> str:
    return "".join(Cluster.guard_group(n, log, extra=f"nodes = {nodes}") for n in names)


@pytest.fixture
def two(make_cluster):
    def make(*names: str, nodes=("n1", "n2"), **kw) -> Cluster:
        c = make_cluster(nodes=nodes, **kw)
        c.write("groups.toml", groups(c.guard_log, *names))
        return c
    return make


def test_move_refusals_with_and_without_a_target_and_wait(two):
    c = two("web", nodes=("n1", "n2", "n3"))
    c.start()
    first = wait_until(lambda: c.runs_on_one("web"), 10, what="web running")
    other = "n2" if first == "n1" else "n1"
    before = pids(c)["web"]
    # Refused up front, with the reason, and nothing stops.
    p = reconcile(c, "move", "web", "n3")
    assert p.returncode == 1 and "refused" in p.stderr and "not in the group's nodes" in p.stderr, p.stderr
    p = reconcile(c, "move", "web", first)
    assert p.returncode == 1 and f"already runs on {first}" in p.stderr, p.stderr
    p = reconcile(c, "move", "nosuch")
    assert p.returncode == 2 and "no group" in p.stderr, p.stderr
    time.sleep(0.3)
    assert pids(c)["web"] == before
    # --dry-run: the whole transition, and nothing recorded or changed.
    p = reconcile(c, "move", "web", "--dry-run")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"web: would move to {other} (dry run: nothing recorded)" in p.stdout, p.stdout
    steps = [line.strip() for line in p.stdout.splitlines() if line.strip().startswith(("stop web", "handover web", "start web"))]
    assert steps and steps[0].startswith("stop web") and f"({first}, " in steps[0], p.stdout
    assert any(s.startswith("handover web") and f"({first}, " in s for s in steps), p.stdout
    assert steps[-1].startswith("start web") and f"({other}, " in steps[-1], p.stdout
    assert f"web: runs on {other}" in p.stdout, p.stdout
    assert not list((c.store / "intents").iterdir()) and pids(c)["web"] == before
    # Without a target: the best eligible other node; --wait returns once it runs there.
    p = reconcile(c, "move", "web", "--wait", "--timeout", "20")
    assert p.returncode == 0, p.stderr
    assert f"moving to {other}" in p.stdout and f"runs on {other}" in p.stdout
    assert c.owner("web") == other
    wait_until(lambda: c.runs_on_one("web") == other, 5, what=f"web's guard on {other}")
    wait_until(lambda: not list((c.store / "intents").iterdir()), 5, what="the target removing the intent")
    # With a target, back again.
    p = reconcile(c, "move", "web", first, "--wait", "--timeout", "20")
    assert p.returncode == 0, p.stderr
    assert wait_until(lambda: c.runs_on_one("web") == first, 5, what="web back")
    # The history tells both moves: asked (by the command), handed over (by the owner), done
    # (by the target); the events are appended from a queue: wait for the last one.
    def told():
        p = reconcile(c, "events", "--group", "web", "--json")
        return [(e["node"], e["kind"]) for e in map(json.loads, p.stdout.splitlines()) if e["kind"].startswith("move")]

    want = [("move", None), ("move", first), ("move-ended", other), ("move", None), ("move", other), ("move-ended", first)]
    seen = wait_until(lambda: (lambda t: t if len(t) >= len(want) else None)(told()), 5, what="the moves in the history")
    assert [k for _, k in seen] == [k for k, _ in want], seen
    assert [n for (n, _), (_, w) in zip(seen, want) if w is not None] == [w for _, w in want if w is not None], seen
    assert all(n.startswith("cli@") for (n, _), (_, w) in zip(seen, want) if w is None), seen


def test_standby_hands_every_group_over_and_wait_times_out(make_cluster):
    c = make_cluster(nodes=("n1", "n2"))
    c.write("groups.toml", "".join(Cluster.guard_group(n, c.guard_log, extra='nodes = ["n1", "n2"]\nfailback = true')
                                   for n in "abc"))
    c.start()
    # failback = true: every group ends up on n1, the preferred node
    wait_until(lambda: all(c.runs_on_one(g) == "n1" and c.owner(g) == "n1" for g in "abc"), 15, what="a, b, c on n1")
    p = reconcile(c, "standby", "nosuch")
    assert p.returncode == 2 and "no node" in p.stderr, p.stderr
    p = reconcile(c, "standby", "n1", "--wait", "--timeout", "30")
    assert p.returncode == 0, p.stderr
    # (--wait: n1 owns nothing, so nothing of them runs there: a hand-over follows the stop)
    assert {c.owner(g) for g in "abc"} == {"n2"} and not any("n1" in c.running(g) for g in "abc")
    wait_until(lambda: all(c.runs_on_one(g) == "n2" for g in "abc"), 5, what="a, b, c running on n2")
    assert c.status()["intents"] == {"maintenance": [], "standby": ["n1"], "moves": {}}  # (a look: > 1 s)
    assert {c.owner(g) for g in "abc"} == {"n2"}  # n1 in standby ranks for nothing: failback does not bring them back
    p = reconcile(c, "unstandby", "n1")
    assert p.returncode == 0 and "out of standby" in p.stdout, p.stderr
    wait_until(lambda: all(c.runs_on_one(g) == "n1" for g in "abc"), 15, what="failback to n1 after unstandby")
    back = pids(c)
    # --wait exit 1 on timeout: n1 in maintenance changes nothing, so standby never completes.
    assert reconcile(c, "maintenance", "on", "--node", "n1").returncode == 0
    p = reconcile(c, "standby", "n1", "--wait", "--timeout", "1")
    assert p.returncode == 1 and "not done within 1s" in p.stderr and "n1 still owns" in p.stderr, p.stderr
    assert pids(c) == back
    assert reconcile(c, "unstandby", "n1").returncode == 0
    assert reconcile(c, "maintenance", "off", "--node", "n1", "--wait").returncode == 0
    assert pids(c) == back


def test_maintenance_observes_only_and_off_changes_only_what_differs(two):
    c = two("a", "b", "c")
    c.start()
    wait_until(lambda: all(c.runs_on_one(g) for g in "abc"), 10, what="a, b, c running")
    p = reconcile(c, "maintenance", "on")
    assert p.returncode == 0 and "maintenance on" in p.stdout, p.stderr
    before = pids(c)
    wait_until(lambda: all(shown(c, n) == ["maintenance"] for n in c.nodes), 5, what="every node shows maintenance")
    # kill -9 of a process: not respawned
    os.kill(before["a"][1], signal.SIGKILL)
    # a cluster spec edit: not applied to the groups in maintenance (tell --wait: exit 1, b pending)
    p = reconcile(c, "tell", "b", "stop", "--wait", "--timeout", "1.5")
    assert p.returncode == 1 and "not done within 1.5s: b:" in p.stderr, p.stderr
    now = pids(c)
    assert "a" not in now
    assert now["b"] == before["b"] and now["c"] == before["c"]
    # off: only what differs changes: a is started again, b stops, c runs on untouched
    p = reconcile(c, "maintenance", "off", "--wait", "--timeout", "20")
    assert p.returncode == 0, p.stderr
    after = pids(c)
    assert "a" in after and "b" not in after and after["c"] == before["c"]


def test_a_dead_owner_in_maintenance_keeps_its_groups(two):
    """kill -9 of the owner's whole node in maintenance moves nothing; after `off` a peer still
    does not take over from an owner that never saw the end (no fence hook), until it is back."""
    c = two("a")
    c.start()
    owner = wait_until(lambda: c.runs_on_one("a"), 10, what="a running")
    peer = "n2" if owner == "n1" else "n1"
    assert reconcile(c, "maintenance", "on", "--node", owner).returncode == 0
    wait_until(lambda: shown(c, owner), 5, what=f"{owner} shows maintenance")
    c.nodes[owner].crash()
    time.sleep(1.5)  # > 2 x dead_after
    assert c.owner("a") == owner and not c.running("a")
    assert reconcile(c, "maintenance", "off", "--node", owner).returncode == 0
    time.sleep(1.5)
    assert c.owner("a") == owner and not c.running("a")  # not acknowledged: left where it is
    c.nodes[owner].start()
    assert wait_until(lambda: c.runs_on_one("a"), 15, what="a running again")
    assert peer not in c.running("a") or c.owner("a") == peer


LONG_LEASE = '[cluster.timing]\nheartbeat = "100ms"\nlease = "3s"\ndead_after = "4s"\n'


def test_an_agent_restarted_in_maintenance_restarts_nothing(make_cluster):
    """Its processes run on under the keeper (a lease long enough for the restart); the new
    agent adopts them and changes nothing, during maintenance and after `off`."""
    c = make_cluster(nodes=("n1", "n2"), cluster_extra=LONG_LEASE).fault_mode()
    c.write("groups.toml", groups(c.guard_log, "a"))
    for n in c.nodes.values():
        n.start().follow_init()
    owner = wait_until(lambda: c.runs_on_one("a"), 15, what="a running")
    before = pids(c)["a"]
    assert reconcile(c, "maintenance", "on").returncode == 0
    wait_until(lambda: shown(c, owner) == ["maintenance"], 5, what=f"{owner} shows maintenance")
    c.nodes[owner].restart_agent(down=0.3)
    wait_until(lambda: shown(c, owner) == ["maintenance"] and c.members().get(owner), 10, what="the new agent publishing")
    time.sleep(1.0)
    assert pids(c)["a"] == before
    p = reconcile(c, "maintenance", "off", "--wait", "--timeout", "20")
    assert p.returncode == 0, p.stderr
    time.sleep(0.5)
    assert pids(c)["a"] == before and c.owner("a") == owner


@pytest.mark.needs("etcd")
def test_move_on_etcd(etcd_single, make_cluster):
    """The same hand-over on the etcd store: the claim goes to the target bound to its lease."""
    import uuid

    c = make_cluster(nodes=("n1", "n2"), store=etcd_single.url, cluster_extra=f'etcd_prefix = "/t-{uuid.uuid4().hex[:8]}"')
    c.write("groups.toml", groups(c.guard_log, "web"))
    c.start()
    first = wait_until(lambda: c.runs_on_one("web"), 15, what="web running")
    other = "n2" if first == "n1" else "n1"
    p = reconcile(c, "move", "web", other, "--wait", "--timeout", "20")
    assert p.returncode == 0, p.stderr
    assert c.owner("web") == other
    wait_until(lambda: c.runs_on_one("web") == other, 5, what=f"web's guard on {other}")
    p = reconcile(c, "move", "web", "--wait", "--timeout", "20")  # back: the best eligible other node
    assert p.returncode == 0 and f"runs on {first}" in p.stdout, p.stderr


@pytest.mark.needs("ip", "nsenter", "mount")
def test_move_of_a_group_with_a_mount_and_an_address_never_on_both(lab, tmp_path):
    """A group of a tmpfs mount, an address and a process moves; a poller samples every 10 ms
    which namespaces hold the address: never both."""
    from test_resources_agent import VIP_CIDR, addresses, mounted, polled_vip, vip_cluster

    c, nets, target = vip_cluster(lab, tmp_path)
    owner = c.runs_on_one("vipg")
    other = next(n for n in nets if n != owner)
    poller = polled_vip(lab, nets)
    p = reconcile(c, "move", "vipg", other, "--wait", "--timeout", "20")
    assert p.returncode == 0, p.stderr
    wait_until(lambda: VIP_CIDR in addresses(nets[other]), 3, what="the address on the target")
    time.sleep(0.2)
    poller.stop()
    assert poller.error is None, poller.error
    assert poller.both() == [], "the address was in both namespaces"
    assert poller.last(nets[owner]) < poller.first(nets[other])
    assert c.owner("vipg") == other
    wait_until(lambda: c.runs_on_one("vipg") == other, 5, what=f"the guard on {other}")
    assert mounted(c.nodes[other].agent_pid, target) == ["tmpfs"]
    assert mounted(c.nodes[owner].agent_pid, target) == []
    assert VIP_CIDR not in addresses(nets[owner])


def test_the_keeper_spares_the_groups_in_maintenance(make_cluster):
    """The owner's agent is killed during maintenance of group a: its lease runs out, and its
    keeper kills b (not in maintenance; n2 then takes it over) but leaves a running; nobody
    takes a over. The agent, back, adopts a."""
    c = make_cluster(nodes=("n1", "n2")).fault_mode()
    c.write("groups.toml", groups(c.guard_log, "a", "b"))
    for n in c.nodes.values():
        n.start().follow_init()
    wait_until(lambda: all(c.runs_on_one(g) == "n1" for g in "ab"), 15, what="a and b on n1")
    before = pids(c)
    assert reconcile(c, "maintenance", "on", "--group", "a").returncode == 0
    told = c.nodes["n1"].state_path / "maintenance.json"  # (fault mode: the node's own tmpfs)
    wait_until(lambda: told.exists() and json.loads(told.read_text()) == {"groups": ["a"]}, 5, what="the keeper told to spare a")
    c.nodes["n1"].kill_agent()
    wait_until(lambda: c.runs_on_one("b") == "n2", 10, what="b taken over by n2 once n1's keeper killed it")
    time.sleep(0.5)
    assert pids(c)["a"] == before["a"] and c.owner("a") == "n1"
    c.nodes["n1"].respawn_agent()
    time.sleep(1.0)
    assert pids(c)["a"] == before["a"] and c.owner("a") == "n1"
