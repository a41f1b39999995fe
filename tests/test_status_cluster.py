"""`reconcile status` against real agents, run from this machine, which is not a member: a
SIGKILLed node, a crash-looping group, a group whose test fails on every node, the summary
line and the exit codes of --check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster import Cluster
from helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]

NOT_AS_DESIRED = 3  # `status --check` (reconciler/cli/)


def status(c: Cluster, *args: str) -> subprocess.CompletedProcess:
    """`reconcile status` as an operator runs it on a machine that is not a member."""
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "status", "--spec", str(c.spec_dir), "--node", "outsider", *args],
        capture_output=True, text=True, timeout=30,
    )


def doc(c: Cluster) -> dict:
    p = status(c, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def group(name: str, *entries: tuple[str, str, str], runlevel: str = "run") -> str:
    out = f'\n[groups.{name}]\nrunlevel = "{runlevel}"\n'
    for tag, mode, command in entries:
        out += f"\n[[groups.{name}.entries]]\ntag = \"{tag}\"\nmode = \"{mode}\"\nrunlevels = [\"run\"]\ncommand = '{command}'\n"
    return out


def test_a_crash_looping_group_is_degraded_and_a_test_failing_everywhere_is_failed(make_cluster, tmp_path):
    log = str(tmp_path / "guard.log")
    c = make_cluster(groups=Cluster.guard_group("steady", log) + group("flap", ("boom", "respawn", "exit 3"))
                     + group("picky", ("fit", "test", "exit 4"), ("svc", "respawn", "sleep 100")))
    c.start()
    wait_until(lambda: c.runs_on_one("steady"), 10, what="steady running")
    d = wait_until(lambda: (d := doc(c))["groups"]["flap"]["state"] == "degraded" and d, 15, what="flap degraded")
    flap = d["groups"]["flap"]
    # its owner holds it and keeps trying; "degraded" while an entry waits out its backoff (issue 16)
    assert flap["actual"] in ("degraded", "run", "->run") and flap["owner"] in c.nodes
    boom = flap["entries"]["boom"]
    assert boom["state"] in ("exited", "running") and boom.get("exit_code") == 3
    d = wait_until(lambda: (d := doc(c))["groups"]["picky"]["state"] == "failed" and len(d["groups"]["picky"]["failures"]) == 3 and d,
                   15, what="picky failed on every node")
    picky = d["groups"]["picky"]
    assert picky["owner"] is None
    assert sorted((f["node"], f["tag"], f["exit_code"]) for f in picky["failures"]) == [("n1", "fit", 4), ("n2", "fit", 4), ("n3", "fit", 4)]
    assert all(isinstance(f["since"], float) for f in picky["failures"])
    assert d["groups"]["steady"]["state"] == "running"
    assert d["summary"] == {"nodes": 3, "live": 3, "groups": 3, "states": {"running": 1, "degraded": 1, "failed": 1}}
    p = status(c, "--check")
    assert p.returncode == NOT_AS_DESIRED, (p.stdout, p.stderr)
    lines = p.stdout.splitlines()
    assert lines[-1] == "3 nodes, 3 live; 3 groups: 1 running, 1 degraded, 1 failed", p.stdout
    for n in ("n1", "n2", "n3"):
        assert any(ln.startswith(f"  fit  failed  on {n} (exit 4), ") and ln.endswith(" ago") for ln in lines), p.stdout
    assert "reconcile: group flap: degraded, desired run" in p.stderr
    assert "reconcile: group picky: failed, desired run (fit failed on n1 (exit 4); " in p.stderr
    # Both stopped as the spec says: as desired, --check is content.
    c.write("groups.toml", Cluster.guard_group("steady", log) + group("flap", ("boom", "respawn", "exit 3"), runlevel="stop")
            + group("picky", ("fit", "test", "exit 4"), ("svc", "respawn", "sleep 100"), runlevel="stop"))
    p = wait_until(lambda: (p := status(c, "--check")).returncode == 0 and p, 15, what="--check content")
    assert p.stdout.splitlines()[-1] == "3 nodes, 3 live; 3 groups: 1 running, 2 stopped", p.stdout
    assert p.stderr == ""


def test_a_killed_node_is_not_live_seen_from_a_machine_that_is_not_a_member(make_cluster, tmp_path):
    log = str(tmp_path / "guard.log")
    c = make_cluster(groups=Cluster.guard_group("g1", log) + Cluster.guard_group("g2", log))
    c.start()
    victim = wait_until(lambda: c.runs_on_one("g1"), 10, what="g1 running")
    wait_until(lambda: c.runs_on_one("g2"), 10, what="g2 running")
    p = wait_until(lambda: (p := status(c, "--check")).returncode == 0 and p, 10, what="all as desired")
    assert p.stdout.splitlines()[-1] == "3 nodes, 3 live; 2 groups: 2 running"
    c.nodes[victim].crash()
    # At once (a look waits out dead_after for a counter that stands still): not live.
    p = status(c, "--check", "--json")
    assert p.returncode == NOT_AS_DESIRED, (p.stdout, p.stderr)
    d = json.loads(p.stdout)
    assert d["nodes"][victim]["live"] is False
    assert sorted(n for n, row in d["nodes"].items() if row["live"]) == sorted(set(c.nodes) - {victim})
    assert f"node {victim}: not live" in d["problems"] and f"reconcile: node {victim}: not live" in p.stderr
    # Once taken over, the groups run again; the dead node stays listed, not live.
    wait_until(lambda: (n := c.runs_on_one("g1")) and n != victim, 5, what="g1 taken over")
    p = wait_until(lambda: (p := status(c, "--check")).stdout.splitlines()[-1] == "3 nodes, 2 live; 2 groups: 2 running" and p,
                   10, what="both groups running again")
    assert p.returncode == NOT_AS_DESIRED and p.stderr == f"reconcile: node {victim}: not live\n"
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith(victim + " "))
    assert row.split()[1] == "NO"
