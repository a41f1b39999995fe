"""What the agent's log says happened (issue 18, item 2), read from real agents: the start and
ready lines, a store outage and its end, a peer's death and return, claims won, a membership
file that is missing, a crash loop, and the journald format with systemd's STATUS= lines.
The pure half (which changes, their words): tests/test_logs_lines.py."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time

import pytest

import reconciler
from cluster import Cluster
from helpers import wait_until
from test_directory_store import LONG  # a lease long enough that an outage of a second or two is no lapse

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]


def lines(c: Cluster, node: str, pattern: str) -> list[str]:
    return re.findall(pattern, c.nodes[node].log.read_text(), re.M)


def test_start_ready_claim_and_a_store_outage_are_each_said_once(make_cluster):
    c = make_cluster(nodes=("n1",), cluster_extra=LONG, groups="")
    c.write("groups.toml", Cluster.guard_group("web", c.guard_log))
    c.start()
    wait_until(lambda: c.runs_on_one("web") == "n1", 15, what="web running on n1")
    log = c.nodes["n1"].log
    start = lines(c, "n1", rf"reconciler {re.escape(reconciler.__version__)} starting: node n1, store (\S+), spec (\S+) \(digest (\w+)\)$")
    assert start == [(f"dir:{c.store}", str(c.spec_dir), start[0][2])], log.read_text()[-2000:]
    assert len(lines(c, "n1", r"INFO reconciler.agent: ready: owning 0 groups, 1 member live$")) == 1
    wait_until(lambda: lines(c, "n1", r"claim won: web \(generation \d+\)$"), 5, what="the claim won said")

    os.rename(c.store, c.root / "store-away")
    wait_until(lambda: lines(c, "n1", r"WARNING reconciler.agent: store unreachable: .*$"), 5, what="the outage said")
    time.sleep(1.0)  # the outage lasts a second (the scenario): the recovery line must say so
    os.rename(c.root / "store-away", c.store)
    back = wait_until(lambda: lines(c, "n1", r"INFO reconciler.agent: store reachable again after ([\d.]+)s$"), 5,
                      what="the recovery said")
    assert len(back) == 1 and 1.0 <= float(back[0]) < 5, back
    lost = lines(c, "n1", r"store unreachable: (.*)$")
    assert len(lost) == 1 and str(c.store) in lost[0], lost  # once per transition, naming the store
    assert c.running("web") == {"n1"}
    assert len(lines(c, "n1", r"claim won: web")) == 1 and not lines(c, "n1", r"claim lost")


def test_a_peer_that_dies_and_returns_is_named_with_its_silence(make_cluster):
    c = make_cluster(nodes=("n1", "n2"), cluster_extra=LONG, groups="")
    c.write("groups.toml", Cluster.guard_group("web", c.guard_log, extra='nodes = ["n1", "n2"]'))
    c.start()
    wait_until(lambda: c.runs_on_one("web") == "n1", 15, what="web running on n1")
    wait_until(lambda: c.members().keys() == {"n1", "n2"}, 10, what="both nodes in the store")
    c.nodes["n2"].crash()
    dead = wait_until(lambda: lines(c, "n1", r"WARNING reconciler.agent: peer n2 dead \(heartbeat stopped, silent for ([\d.]+)s\)$"),
                      10, what="n2's death said")
    assert float(dead[0]) >= 4.0, dead  # LONG's dead_after
    c.nodes["n2"].start()
    back = wait_until(lambda: lines(c, "n1", r"INFO reconciler.agent: peer n2 alive again after ([\d.]+)s of silence$"),
                      15, what="n2's return said")
    assert float(back[0]) >= float(dead[0]), (dead, back)
    assert len(lines(c, "n1", r"peer n2 dead")) == 1 and len(back) == 1


def test_a_missing_membership_file_is_named(make_cluster, tmp_path):
    hpc = tmp_path / "hpc"
    (hpc / "nodes" / "1").mkdir(parents=True)
    (hpc / "nodes" / "1" / "status").write_text("3\n")
    (hpc / "admin").mkdir()  # and no admin/mospe in it
    c = make_cluster(nodes=("1",), cluster_extra=f'membership = "hpc:{hpc}"', groups="")
    c.write("groups.toml", Cluster.guard_group("web", c.guard_log))
    c.start()
    said = wait_until(lambda: lines(c, "1", r"ERROR reconciler.agent: membership cannot be read: (.*)$"), 10,
                      what="the membership error said")
    assert said == [f"{hpc}/admin/mospe: No such file or directory"]
    assert not lines(c, "1", r"store unreachable")  # the store is fine: it is not blamed
    assert not c.running("web")
    (hpc / "admin" / "mospe").write_text("1\n")
    wait_until(lambda: lines(c, "1", r"INFO reconciler.agent: membership readable again$"), 10)
    wait_until(lambda: c.runs_on_one("web") == "1", 15, what="web running once the membership is read")
    assert len(lines(c, "1", r"ERROR .*membership cannot be read")) == 1


def test_under_systemd_journal_priorities_status_lines_and_a_quiet_crash_loop(make_cluster):
    c = make_cluster(nodes=("n1",), groups="")
    c.write("groups.toml", Cluster.guard_group("web", c.guard_log) + """
[groups.loop]
runlevel = "run"
[[groups.loop.entries]]
tag = "crash"
mode = "respawn"
runlevels = ["run"]
command = ["false"]
""")
    log = c.nodes["n1"].log
    log.write_bytes(b"")
    st = os.stat(log)
    with tempfile.TemporaryDirectory(prefix="notify") as d:  # sun_path holds 108 bytes
        path = os.path.join(d, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.2)
        messages: list[str] = []
        done = threading.Event()

        def drain() -> None:  # as systemd does: a full socket would block the agent's sends
            while not done.is_set():
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    pass

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            # As systemd starts it: stderr is the journal's stream, and its notification socket.
            c.env.update(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", NOTIFY_SOCKET=path)
            c.start()
            wait_until(lambda: "STATUS=owning 2 groups, 1 member live" in messages, 15, what="the status line for 2 groups")
            # Four backoff steps (0.25 s, 0.5 s, 1 s, 2 s) take under 4 s of crashing.
            wait_until(lambda: len(lines(c, "n1", r"^<4>reconciler.process: loop/crash: .*rapid exits in a row")) >= 4, 15,
                       what="the crash loop's warnings")
            assert c.nodes["n1"].terminate() == 0
        finally:
            done.set()
            reader.join(5)
            sock.close()
    assert messages[0] == "READY=1\nSTATUS=owning 0 groups, 1 member live", messages[:3]
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert "\n" not in "".join(statuses), statuses
    assert all(a != b for a, b in zip(statuses, statuses[1:])), statuses  # sent when it changes, not every pass
    text = log.read_text()
    assert all(re.match(r"<[0-7]>reconciler[.\w]*: ", line) for line in text.splitlines()), text[-3000:]
    assert re.search(rf"^<6>reconciler.agent: reconciler {re.escape(reconciler.__version__)} starting: node n1", text, re.M)
    assert not re.search(r"^<\d>\d{4}-\d\d-\d\d", text, re.M)  # no timestamp of its own
    # The crash loop: its free respawns at info, then one warning per backoff step, and no
    # info line for each respawn.
    warned = lines(c, "n1", r"^<4>reconciler.process: loop/crash: exit 1; respawning too rapidly, next try in ([\d.]+)s")
    assert warned[:4] == ["0.25", "0.50", "1.00", "2.00"], warned
    assert len(lines(c, "n1", r"^<6>reconciler.process: loop/crash exited after")) == 3
    assert not lines(c, "n1", r"^<6>.*start loop/crash: respawn")
