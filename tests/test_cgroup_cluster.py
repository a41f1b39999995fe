"""Issue 12's process-table reproductions, with real agents on two nodes (make_cluster: the
double-run checker runs after each test).

Each node's agent runs under a small shell that is PID 1 of the node's pid namespace (not
the agent itself, as under systemd): SIGKILL of the agent then leaves its children and its
keeper running, orphans are re-parented to that shell (not to the agent), and the shell
starts the agent again when the test says so (it touches the node's GO file), as
systemd's Restart= would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cluster import GUARD, Cluster
from helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare", "mount", "cgroup2")]

FAILOVER = 3.0
# Long enough that a restarted agent renews the lease before the keeper acts.
# Every test runs twice: with cgroups, and with RECONCILER_CGROUPS=off, as on a machine
# whose cgroup hierarchy cannot be written (the table and the environment markers).
MODES = pytest.mark.parametrize("cgroups", ["on", "off"])


def env_for(cgroups: str) -> dict[str, str]:
    return {"RECONCILER_CGROUPS": "off"} if cgroups == "off" else {}


LONG_LEASE = '[cluster.timing]\nheartbeat = "100ms"\nlease = "3s"\ndead_after = "4s"\n'


def supervised(go) -> str:
    """The node's PID 1: runs the agent ("$@"), starts it again after it died once `go`
    exists, and stops it on SIGTERM."""
    return (
        "trap 'kill -TERM $a 2>/dev/null; wait $a; exit 0' TERM INT; "
        f'while :; do "$@" & a=$!; wait $a; while [ ! -e {go} ]; do sleep 0.02; done; rm -f {go}; done'
    )


def agent_of(node) -> int | None:
    """The host pid of the node's agent (a child of the supervising shell)."""
    try:
        kids = psutil.Process(node.agent_pid).children()
    except psutil.Error:
        return None
    for k in kids:
        try:
            if "reconciler.cli" in k.cmdline():
                return k.pid
        except psutil.Error:
            pass
    return None


def guards(node: str, group: str) -> set[int]:
    """Host pids of the live guard processes of `group` on `node`."""
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if GUARD in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                env = p.environ()
                if env.get("RECONCILER_NODE") == node and env.get("RECONCILER_GROUP") == group:
                    out.add(p.pid)
        except psutil.Error:
            pass
    return out


def restart_agent(c: Cluster, name: str, go, *, before=None) -> int:
    """SIGKILL the node's agent alone (its children and keeper live on), run `before`, then
    let the supervising shell start it again; the new agent's host pid."""
    node = c.nodes[name]
    old = agent_of(node)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE, 5, what="the agent's death")
    if before is not None:
        before()
    go.touch()
    return wait_until(lambda: (p := agent_of(node)) and p != old and p, 10, what="the agent restarted")


def agent_log(c: Cluster, name: str) -> str:
    return c.nodes[name].log.read_text()


def assert_tracking(c: Cluster, cgroups: str) -> None:
    """The agents track processes the way the test means them to."""
    for name in c.nodes:
        wait_until(lambda: "processes tracked by" in agent_log(c, name), 10, what=f"{name} to start")
        text = agent_log(c, name)
        if cgroups == "on":
            assert f"processes tracked by cgroups under {c.cgroup}/{name}/reconciler-{name}" in text, text
        else:
            assert "processes tracked by the table and environment markers: cgroups disabled" in text, text


@MODES
def test_a_lost_process_table_leaves_no_second_copy(make_cluster, tmp_path, cgroups):
    """(a) The owner's agent SIGKILLed (its children and keeper survive), its processes.json
    truncated, the agent restarted within the lease: the old guard is adopted from its
    cgroup, nothing is started again, and the peer never runs the group."""
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1", "n2"), groups=Cluster.guard_group("g1", log, extra='nodes = ["n1", "n2"]'), cluster_extra=LONG_LEASE, env=env_for(cgroups))
    for n in c.nodes:
        c.pre_exec[n] = supervised(tmp_path / f"go-{n}")
    c.start("n1")
    wait_until(lambda: c.runs_on_one("g1") == "n1", 15, what="g1 on n1")
    c.start("n2")
    assert_tracking(c, cgroups)
    old = wait_until(lambda: guards("n1", "g1"), 5, what="the guard's pid")
    assert len(old) == 1

    def truncate():
        table = tmp_path / "state" / "n1" / "processes.json"
        text = table.read_text()
        table.write_text(text[: len(text) // 2])

    restart_agent(c, "n1", tmp_path / "go-n1", before=truncate)
    time.sleep(3.0)  # the restarted agent's start-up and many reconcile passes: no second copy meanwhile
    assert guards("n1", "g1") == old, "the old guard alone: no second copy"
    assert "adopted g1/g1-svc" in agent_log(c, "n1")
    assert guards("n2", "g1") == set()
    starts = [line for line in open(log) if line.split()[1:2] == ["start"]]
    assert len(starts) == 1, starts  # nothing restarted
    assert c.runs_on_one("g1") == "n1"


@MODES
def test_a_full_state_directory_loses_no_process(make_cluster, tmp_path, cgroups):
    """(b) The state directory is full (a 1 MiB tmpfs in the node's mount namespace): the
    save after a respawn fails. The new guard is still tracked: a restarted agent adopts it
    (no second copy), and the keeper kills it when the lease lapses (the agent paused), so
    the peer's copy never overlaps it."""
    log = str(tmp_path / "guard.log")
    state = tmp_path / "state" / "n1"
    c = make_cluster(nodes=("n1", "n2"), groups=Cluster.guard_group("g1", log, extra='nodes = ["n1", "n2"]'), cluster_extra=LONG_LEASE, env=env_for(cgroups))
    c.pre_exec["n1"] = f"mkdir -p {state} && mount -t tmpfs -o size=1m,mode=0700 tmpfs {state} && " + supervised(tmp_path / "go-n1")
    c.pre_exec["n2"] = supervised(tmp_path / "go-n2")
    c.start("n1")
    wait_until(lambda: c.runs_on_one("g1") == "n1", 15, what="g1 on n1")
    c.start("n2")
    assert_tracking(c, cgroups)
    first = wait_until(lambda: guards("n1", "g1"), 5, what="the guard")

    def in_node(script: str) -> None:
        subprocess.run(["nsenter", "-t", str(c.nodes["n1"].agent_pid), "-m", "/bin/sh", "-c", script], check=False, timeout=30)

    in_node(f"dd if=/dev/zero of={state}/fill bs=64k 2>/dev/null; true")
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    new = wait_until(lambda: (g := guards("n1", "g1")) and g != first and g, 10, what="the respawned guard")

    def state_errors() -> list:
        try:
            return json.loads((c.store / "status" / "n1.json").read_text()).get("state_errors", [])
        except (OSError, ValueError):
            return []

    errors = wait_until(state_errors, 5, what="the failed save shown in n1's status")
    assert any("cannot save" in e and "No space left on device" in e for e in errors), errors
    time.sleep(0.5)  # a few more passes with the disk full: the scenario, not a synchronisation
    # the operator frees the disk and the agent restarts: the table is stale, the cgroup is not
    restart_agent(c, "n1", tmp_path / "go-n1", before=lambda: in_node(f"rm -f {state}/fill"))
    time.sleep(3.0)  # the restarted agent's start-up and many reconcile passes: no second copy meanwhile
    assert guards("n1", "g1") == new, "the respawned guard adopted, no second copy"
    assert "cannot save the process table" in agent_log(c, "n1")
    assert "adopted g1/g1-svc" in agent_log(c, "n1")
    # fill the disk again and pause the agent: the keeper kills the guard at lease expiry
    in_node(f"dd if=/dev/zero of={state}/fill bs=64k 2>/dev/null; true")
    agent = agent_of(c.nodes["n1"])
    os.kill(agent, signal.SIGSTOP)
    try:
        wait_until(lambda: c.runs_on_one("g1") == "n2", 10, what="the takeover by n2")
        assert guards("n1", "g1") == set()
    finally:
        os.kill(agent, signal.SIGCONT)
    time.sleep(1.0)  # the resumed agent runs nothing twice: the time passing is the test
    assert c.violations() == []


DAEMON_GROUPS = """
[groups.{g}]
runlevel = "{level}"
nodes = ["n1", "n2"]
[[groups.{g}.entries]]
tag = "{g}-svc"
mode = "{mode}"
runlevels = ["run"]
command = '(setsid {py} {guard} {log} &); {tail}'
stop_timeout = "2s"
"""


def daemon_groups(log: str, level: str = "run") -> str:
    # d1: a respawn entry whose leader sleeps while its double-forked, setsid() child runs
    # the guard; d2: a once entry whose leader exits at once, leaving the guard behind.
    return "".join(
        DAEMON_GROUPS.format(g=g, mode=mode, tail=tail, py=sys.executable, guard=GUARD, log=log, level=level)
        for g, mode, tail in (("d1", "respawn", "exec sleep 1000"), ("d2", "once", "exit 0"))
    )


@MODES
def test_a_daemon_is_stopped_with_its_group_and_not_left_behind_at_a_failover(make_cluster, tmp_path, cgroups):
    """(c) Daemons that double-fork and call setsid(): the owner's agent is paused past
    dead_after, the peer takes over, and the daemons on the old node are dead before the
    peer's start (the checker); then the groups are stopped and no daemon survives."""
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1", "n2"), groups=daemon_groups(log), env=env_for(cgroups))
    for n in c.nodes:
        c.pre_exec[n] = supervised(tmp_path / f"go-{n}")
    c.start("n1")
    for g in ("d1", "d2"):
        wait_until(lambda: c.runs_on_one(g) == "n1", 15, what=f"{g} on n1")
    c.start("n2")
    wait_until(lambda: "n2" in c.members(), 10, what="n2 publishing")  # a peer to take over
    assert_tracking(c, cgroups)
    agent = agent_of(c.nodes["n1"])
    os.kill(agent, signal.SIGSTOP)
    try:
        for g in ("d1", "d2"):
            wait_until(lambda: c.runs_on_one(g) == "n2", FAILOVER * 2, what=f"{g} taken over by n2")
        time.sleep(1.0)  # nothing of the paused node comes back: the time passing is the test
        assert guards("n1", "d1") == set() and guards("n1", "d2") == set()
    finally:
        os.kill(agent, signal.SIGCONT)
    time.sleep(1.0)  # the resumed agent runs nothing twice: the time passing is the test
    assert c.violations() == []
    for g in ("d1", "d2"):
        assert c.runs_on_one(g) == "n2"
    c.write("groups.toml", daemon_groups(log, level="stop"))
    wait_until(lambda: not guards("n2", "d1") and not guards("n2", "d2"), 10, what="the daemons stopped with their groups")
    time.sleep(0.5)  # and none comes back: the time passing is the test
    assert not (guards("n1", "d1") | guards("n1", "d2") | guards("n2", "d1") | guards("n2", "d2"))
