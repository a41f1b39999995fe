"""Issue 14: one spec for the whole cluster, held in the store and edited from any node.

Real agents, each in its own pid namespace with a spec directory of its own (as on machines
of their own: Cluster(own_specs=True)), on both stores: the directory store and a real etcd.
Every test ends with the double-run checker over the guard log (make_cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from cluster import Cluster
from helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]

CONVERGE = 5.0  # seconds: an edit on one node seen on another (goal ~1 s; a loaded 2-core machine)


@pytest.fixture(params=["dir", "etcd"])
def store(request):
    """(store URL, [cluster] lines for it): the directory store, or a fresh prefix on etcd."""
    if request.param == "dir":
        return None, ""
    etcd = request.getfixturevalue("etcd_single")
    return etcd.url, f'etcd_prefix = "/t-{uuid.uuid4().hex[:8]}"'


def two_nodes(make_cluster, store, tmp_path, *groups: str) -> Cluster:
    url, extra = store
    log = str(tmp_path / "guard.log")
    c = make_cluster(nodes=("n1", "n2"), store=url, cluster_extra=extra, own_specs=True,
                     groups="".join(Cluster.guard_group(g, log, extra='nodes = ["n1", "n2"]') for g in groups))
    c.start()
    for g in groups:
        wait_until(lambda: c.runs_on_one(g) == "n1", 15, what=f"{g} on n1")
    return c


def status(c: Cluster) -> dict:
    return c.status()


def revisions(c: Cluster) -> dict[str, int]:
    """node -> the cluster spec revision it publishes that it runs."""
    return {n: row.get("revision", 0) for n, row in status(c)["nodes"].items()}


def reconcile(c: Cluster, *args: str, spec: str | os.PathLike, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args, "--spec", str(spec)],
                          capture_output=True, text=True, timeout=timeout)


def guard_pids(c: Cluster, group: str) -> set[int]:
    return {p["pid"] for p in c.guard_processes() if p["group"] == group}


def history(c: Cluster) -> list[str]:
    p = reconcile(c, "history", spec=c.nodes["n1"].spec_dir)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_an_edit_on_any_node_converges_everywhere_and_bad_edits_lose_nothing(make_cluster, store, tmp_path):
    c = two_nodes(make_cluster, store, tmp_path, "web", "db")
    wait_until(lambda: set(revisions(c).values()) == {1}, 10, what="both nodes on revision 1 (the seed)")

    # 1. An edit saved on the node that does not own `web` stops it on its owner, and the
    #    owner's file shows the edit.
    text = c.read("groups.toml", node="n2")
    c.write("groups.toml", text.replace('runlevel = "run"', 'runlevel = "stop"', 1), node="n2")
    t0 = time.monotonic()
    wait_until(lambda: not c.running("web"), CONVERGE, what="web stopped on its owner n1")
    assert time.monotonic() - t0 < CONVERGE
    wait_until(lambda: c.read("groups.toml", node="n1") == c.read("groups.toml", node="n2"), CONVERGE,
               what="n1's file written back")
    assert c.running("db") == {"n1"}
    wait_until(lambda: set(revisions(c).values()) == {2}, 10, what="both nodes on revision 2")

    # 2. `tell` from the node that does not own it, and from a machine that has only a node file.
    p = reconcile(c, "tell", "web", "run", spec=c.nodes["n2"].spec_dir)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: c.runs_on_one("web") == "n1", CONVERGE, what="web running again on n1")
    lonely = tmp_path / "cli-only"
    lonely.mkdir(mode=0o755)
    node_lines = [f'store = "{c.store_url}"', f'state_dir = "{tmp_path / "state-cli"}"']
    if store[1]:
        node_lines.append(store[1])
    (lonely / "node.toml").write_text("[cluster]\n" + "\n".join(node_lines) + "\n")
    os.chmod(lonely / "node.toml", 0o644)
    p = reconcile(c, "tell", "db", "stop", spec=lonely)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: not c.running("db"), CONVERGE, what="db stopped by a tell from a machine with only a node file")
    wait_until(lambda: 'runlevel = "stop"' in c.read("groups.toml", node="n1").split("[groups.db]")[1], CONVERGE,
               what="the tell written into n1's file, comments and all")
    head = max(revisions(c).values())

    # 3. A bad edit is refused everywhere; nothing restarts; the file is left as written.
    running_web = guard_pids(c, "web")
    bad = c.read("groups.toml", node="n2").replace('mode = "respawn"', 'mode = "bogus"', 1)
    c.write("groups.toml", bad, node="n2")
    wait_until(lambda: "mode" in status(c)["nodes"]["n2"]["spec_error"], 10, what="n2 reports its refused edit")
    time.sleep(1.0)  # the time passing is the test: nothing restarts, nothing is published
    assert guard_pids(c, "web") == running_web
    assert c.read("groups.toml", node="n2") == bad
    assert max(revisions(c).values()) == head and "bogus" not in c.read("groups.toml", node="n1")

    # 4. Two nodes edit at once: one revision wins, the other node's edit is refused as a
    #    conflict and its file stays as its operator wrote it.
    c.write("groups.toml", c.read("groups.toml", node="n1"), node="n2")  # n2 back in step (its bad edit undone)
    wait_until(lambda: status(c)["nodes"]["n2"]["spec_error"] == "", 10, what="n2 in step again")
    one = c.read("groups.toml", node="n1").replace("stop_timeout = \"2s\"", "stop_timeout = \"3s\"", 1)
    two = c.read("groups.toml", node="n2").replace("stop_timeout = \"2s\"", "stop_timeout = \"4s\"", 1)
    c.write("groups.toml", one, node="n1")
    c.write("groups.toml", two, node="n2")
    wait_until(lambda: max(revisions(c).values()) == head + 1, 10, what="one of the two edits published")
    time.sleep(1.0)  # both agents have looked at their files: the time passing is the test
    rows = status(c)["nodes"]
    won = "n1" if "3s" in history(c)[0] or rows["n2"]["spec_error"] else "n2"
    lost = "n2" if won == "n1" else "n1"
    assert "edit made on revision" in rows[lost]["spec_error"] and "refused" in rows[lost]["spec_error"], rows
    assert c.read("groups.toml", node=lost) == (two if lost == "n2" else one)  # left as written
    assert max(revisions(c).values()) == head + 1


def test_a_node_that_was_down_comes_back_on_the_latest_revision(make_cluster, store, tmp_path):
    c = two_nodes(make_cluster, store, tmp_path, "web")
    wait_until(lambda: set(revisions(c).values()) == {1}, 10, what="both nodes on revision 1")
    c.nodes["n2"].terminate()
    for level in ("stop", "run", "stop"):
        p = reconcile(c, "tell", "web", level, spec=c.nodes["n1"].spec_dir)
        assert p.returncode == 0, p.stderr
    assert history(c)[0].split()[0] == "4"
    c.nodes["n2"].start()
    wait_until(lambda: revisions(c).get("n2") == 4, 15, what="n2 runs revision 4")
    assert c.read("groups.toml", node="n2") == c.read("groups.toml", node="n1")
    assert c.running("web") == set()


def test_apply_with_the_store_unreachable_changes_nothing(make_cluster, store, tmp_path):
    c = two_nodes(make_cluster, store, tmp_path, "web")
    wait_until(lambda: set(revisions(c).values()) == {1}, 10, what="both nodes on revision 1")
    elsewhere = tmp_path / "unreachable"
    elsewhere.mkdir(mode=0o755)
    for f in c.nodes["n1"].spec_dir.glob("*.toml"):
        text = f.read_text().replace(f'store = "{c.store_url}"', 'store = "etcd://127.0.0.1:9"')
        (elsewhere / f.name).write_text(text.replace('runlevel = "run"', 'runlevel = "stop"'))
        os.chmod(elsewhere / f.name, 0o644)
    p = reconcile(c, "apply", str(elsewhere), spec=elsewhere, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("reconcile: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "127.0.0.1:9" in p.stderr
    time.sleep(0.5)
    assert history(c)[0].split()[0] == "1" and c.runs_on_one("web") == "n1"
    # and the same directory applied to the real store: a summary first, then applied
    for f in elsewhere.glob("*.toml"):
        f.write_text(f.read_text().replace('store = "etcd://127.0.0.1:9"', f'store = "{c.store_url}"'))
    p = reconcile(c, "diff", str(elsewhere), spec=elsewhere)
    assert p.returncode == 1 and "web: runlevel run -> stop" in p.stdout, p.stdout + p.stderr
    p = reconcile(c, "apply", str(elsewhere), spec=elsewhere)
    assert p.returncode == 0 and "applied: revision 2" in p.stdout, p.stdout + p.stderr
    wait_until(lambda: not c.running("web"), CONVERGE, what="web stopped by the applied revision")
    p = reconcile(c, "rollback", "1", spec=c.nodes["n2"].spec_dir)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: c.runs_on_one("web") == "n1", CONVERGE, what="web back after the rollback")
    assert json.loads(json.dumps(history(c)))[0].split()[0] == "3"


def test_a_revision_that_does_not_load_is_never_run_and_commands_read_the_store(make_cluster, tmp_path):
    """A revision written into the store behind the agents' backs (not through an agent or a
    command, which validate first) that does not load is refused by every agent: nothing
    restarts, nothing is written into their files. `check` and `--dry-run` without --spec
    read the store's spec (here from a machine with only a node file)."""
    c = two_nodes(make_cluster, (None, ""), tmp_path, "web")
    wait_until(lambda: set(revisions(c).values()) == {1}, 10, what="both nodes on revision 1")
    running = guard_pids(c, "web")
    rev1 = json.loads((c.store / "spec" / f"{1:010d}.json").read_text())
    forged = dict(rev1, number=2, files=[{"name": "groups.toml", "text": "[groups.web]\nrunlevel = 'run'\nbogus = 1\n"}])
    tmp = c.store / "spec" / ".forged"
    tmp.write_text(json.dumps(forged))
    os.chmod(tmp, 0o644)
    os.rename(tmp, c.store / "spec" / f"{2:010d}.json")
    def published(n: str) -> dict:  # (status exits 1 while the store's revision does not load: read the store)
        try:
            return json.loads((c.store / "status" / f"{n}.json").read_text())
        except (OSError, ValueError):
            return {}

    for n in ("n1", "n2"):
        wait_until(lambda: "revision 2 does not load here" in published(n).get("spec_error", ""), 10,
                   what=f"{n} refuses revision 2")
    time.sleep(0.5)  # the time passing is the test
    assert guard_pids(c, "web") == running and [published(n).get("spec_revision") for n in ("n1", "n2")] == [1, 1]
    assert "bogus" not in c.read("groups.toml", node="n1")
    # a machine with only a node file: check and --dry-run read the store's spec
    lonely = tmp_path / "cli-only"
    lonely.mkdir(mode=0o755)
    (lonely / "node.toml").write_text(f'[cluster]\nstore = "{c.store_url}"\nstate_dir = "{tmp_path / "state-cli"}"\n')
    os.chmod(lonely / "node.toml", 0o644)
    env = {**os.environ, "RECONCILER_SPEC": str(lonely)}
    os.unlink(c.store / "spec" / f"{2:010d}.json")  # (the forged revision gone: revision 1 is current again)
    p = subprocess.run([sys.executable, "-m", "reconciler.cli", "check"], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0 and "web" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "reconciler.cli", "check", "--spec", str(lonely)], capture_output=True,
                       text=True, env=env, timeout=30)
    assert "web" not in p.stdout, p.stdout  # an explicit --spec: those files (no groups)
