"""Issue 16 on a 2-node cluster, the double-run checker watching throughout (make_cluster):
a group that crash-loops on n1 only (max_failures = 3) moves to n2, which runs it, and n1
is banned until `reconcile clear`; a group that crash-loops everywhere bans both nodes,
stays stopped and says so, until its ban expires; a leading test failing on the owner
moves its group."""

from __future__ import annotations

import sys
import time

import pytest

from cluster import GUARD, Cluster
from helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]


def group(name: str, command: str, *, extra: str = "", entries: str = "") -> str:
    return f"""
[groups.{name}]
runlevel = "run"
nodes = ["n1", "n2"]
{extra}
{entries}
[[groups.{name}.entries]]
tag = "{name}-svc"
runlevels = ["run"]
stop_timeout = "2s"
min_uptime = "1s"
command = ["/bin/sh", "-c", '{command}']
"""


def published(c: Cluster, node: str, name: str):
    from reconciler import published as pub

    try:
        return pub.loads((c.store / "status" / f"{node}.json").read_text()).groups.get(name)
    except (OSError, pub.StatusError):
        return None


def test_crash_loops_move_the_group_ban_the_node_and_clear_lifts_it(make_cluster, tmp_path):
    log = str(tmp_path / "guard.log")
    guard = f"exec {sys.executable} {GUARD} {log}"
    flags = tmp_path / "fit"
    flags.mkdir()
    (flags / "n1").touch()
    (flags / "n2").touch()
    groups = (
        # crash-loops on n1 only (a bad local disk): moves to n2
        group("crash", f'if [ "$RECONCILER_NODE" = n1 ]; then exit 1; fi; {guard}', extra='max_failures = 3\nban = "1h"')
        # crash-loops everywhere: both banned, stopped, reported; the ban expires
        + group("doomed", "exit 1", extra='max_failures = 2\nban = "6s"')
        # a leading test that starts failing on its owner
        + group("fit", guard, entries=f"""
[[groups.fit.entries]]
tag = "fit-test"
mode = "test"
runlevels = ["run"]
command = ["/bin/sh", "-c", 'test -e {flags}/$RECONCILER_NODE']
""")
    )
    c = make_cluster(nodes=("n1", "n2"), groups=groups, cluster_extra='[cluster.timing]\nretest = "1s"')
    c.start()

    # crash: n1 (preferred) fails 3 times, gives it up, is banned; n2 claims it at once and runs it
    wait_until(lambda: c.runs_on_one("crash") == "n2", 20, what="crash to run on n2")
    n1 = wait_until(lambda: (g := published(c, "n1", "crash")) and g.banned and g, 5, what="n1 banned from crash")
    assert n1.failures >= 3 and n1.banned_until is not None and n1.banned_until > time.time() + 3000
    assert n1.note.startswith("banned here: 3 failures within 10m")
    st = c.status()["groups"]["crash"]
    assert st["state"] == "running" and st["owner"] == "n2" and "n1" in st["bans"]

    # fit: runs on n1 (preferred); its test starts failing there: the owner re-runs it and gives the group up
    wait_until(lambda: c.runs_on_one("fit") == "n1", 10, what="fit on n1")
    (flags / "n1").unlink()
    wait_until(lambda: c.runs_on_one("fit") == "n2", 10, what="fit to move to n2")

    # doomed: both banned; stays stopped and says so
    st = wait_until(lambda: (s := c.status()["groups"]["doomed"]) and s["banned_everywhere"] and s, 20,
                    what="doomed banned on both nodes")
    assert st["state"] == "failed" and st["owner"] is None and set(st["bans"]) == {"n1", "n2"}
    out = c.nodes["n1"].run("status", "--check", "--spec", str(c.spec_dir))
    assert out.returncode == 3 and "group doomed: failed, desired run (banned on every node that may run it: n1, n2)" in out.stderr, out.stderr
    # ... until a ban expires: a node claims it again (and fails again)
    wait_until(lambda: published(c, "n1", "doomed").failures > 2 or published(c, "n2", "doomed").failures > 2, 15,
               what="doomed tried again after its ban")

    # clear: n1's ban and count are gone; crash stays on n2 (no failback)
    out = c.nodes["n1"].run("clear", "crash", "--spec", str(c.spec_dir), "--node", "n1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "crash: failures and ban cleared on n1"
    g = published(c, "n1", "crash")
    assert not g.banned and g.failures == 0 and g.cleared
    assert c.runs_on_one("crash") == "n2"
    # a node whose agent does not answer: exit 1 after the timeout
    c.nodes["n2"].pause()
    try:
        out = c.nodes["n1"].run("clear", "crash", "--spec", str(c.spec_dir), "--node", "n2", "--timeout", "0.5")
    finally:
        c.nodes["n2"].resume()
    assert out.returncode == 1 and "n2 has not shown the clear within 0.5s" in out.stderr, out.stderr
