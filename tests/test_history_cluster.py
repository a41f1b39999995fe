"""The cluster's history on a real 2-node cluster (issue 15): a failover by kill -9 shows in
`reconcile events` with its phases, read from the surviving node; the --group, --node and
--since filters; --follow prints an event that happens after it started; `status --watch`
refreshes (a pty and a pipe); `apply --dry-run` of an edit shows the transition. The
double-run checker (make_cluster) runs through all of it."""

from __future__ import annotations

import json
import math
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from cluster import Cluster
from helpers import reconcile, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]


def _lines(proc: subprocess.Popen, into: list[str]) -> threading.Thread:
    def pump():
        for line in proc.stdout:
            into.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def test_a_failover_shows_in_the_history_with_its_phases(make_cluster, tmp_path):
    fence = 'fence = ["/bin/true", "{node}"]\nfence_timeout = "2s"\nnodes = ["n1", "n2"]'
    c = make_cluster(nodes=("n1", "n2"), groups=Cluster.guard_group("web", str(tmp_path / "guard.log"), extra=fence))
    c.start()
    victim = wait_until(lambda: c.runs_on_one("web"), 10, what="web on one node")
    survivor = "n2" if victim == "n1" else "n1"
    spec = str(c.spec_dir)
    claimed = wait_until(lambda: [e for e in _events(c, survivor) if e["kind"] == "claim"], 5, what="the claim in the history")
    assert claimed[0]["node"] == victim and claimed[0]["group"] == "web", claimed
    assert "candidate 1 of 2" in claimed[0]["reason"] and "generation 1" in claimed[0]["reason"]

    # --follow, started before the failover, prints the takeover as it happens (from this
    # machine, which reaches the store: nsenter would not pass the Ctrl-C on).
    follow = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "events", "--follow", "--json", "--group", "web",
                               "--spec", spec], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    followed: list[str] = []
    pump = _lines(follow, followed)
    wait_until(lambda: any('"claim"' in ln for ln in followed), 5, what="--follow to print the history so far")
    time.sleep(0.5)  # (a gap before the takeover: --since below tells them apart)
    c.nodes[victim].crash()
    wait_until(lambda: c.runs_on_one("web") == survivor, 5, what="web to fail over")
    takeover = wait_until(lambda: [json.loads(ln) for ln in followed if '"takeover"' in ln], 5, what="--follow: the takeover")[0]
    follow.send_signal(signal.SIGINT)
    try:
        assert follow.wait(5) == 0  # Ctrl-C ends a follow: exit 0
    finally:
        follow.kill()
    pump.join(2)
    assert takeover["node"] == survivor and takeover["group"] == "web"
    assert set(takeover["phases"]) == {"detect", "fence", "claim", "start"}, takeover
    assert all(0 <= v < 5 for v in takeover["phases"].values()), takeover
    assert f"owner {victim} is " in takeover["reason"] and "generation 2, started" in takeover["reason"], takeover
    kinds = [json.loads(ln)["kind"] for ln in followed]
    assert kinds.index("fence") < kinds.index("fence-result") < kinds.index("takeover"), kinds

    # The text, from the survivor: one line an event, with the phases.
    out = c.nodes[survivor].run("events", "--spec", spec)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if " takeover: " in ln)
    assert f"  {survivor}  web  takeover: owner {victim}" in line and "  [detect " in line and ", start " in line, line
    # Filters: by node, by group, by age.
    by_victim = _events(c, survivor, "--node", victim)
    assert by_victim and {e["node"] for e in by_victim} == {victim}
    assert _events(c, survivor, "--group", "nothing") == []
    recent = _events(c, survivor, "--since", f"{math.ceil(time.time() - takeover['wall'] + 0.2)}s")
    assert "takeover" in [e["kind"] for e in recent] and "claim" not in [e["kind"] for e in recent], recent

    # apply --dry-run of an edit: the transition it would make, the survivor's steps.
    edit = tmp_path / "edit"
    shutil.copytree(c.spec_dir, edit)
    (edit / "groups.toml").write_text((edit / "groups.toml").read_text() + """
[[groups.web.entries]]
tag = "extra"
mode = "respawn"
runlevels = ["run"]
command = ["sleep", "1000"]
""")
    p = reconcile("apply", "--dry-run", str(edit), "--spec", spec)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"  start web/extra: runlevel run includes it, not running  ({survivor}, +0.00s)" in p.stdout, p.stdout
    assert f"    web: runs on {survivor}" in p.stdout and "(dry run: nothing applied)" in p.stdout, p.stdout


def _events(c: Cluster, node: str, *args: str) -> list[dict]:
    out = c.nodes[node].run("events", "--json", "--spec", str(c.spec_dir), *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(ln) for ln in out.stdout.splitlines()]


def test_status_watch_refreshes_in_place_on_a_terminal_and_repeats_on_a_pipe(make_cluster, tmp_path):
    c = make_cluster(nodes=("n1",), groups=Cluster.guard_group("web", str(tmp_path / "guard.log")))
    c.start()
    wait_until(lambda: c.runs_on_one("web"), 10, what="web running")
    argv = [sys.executable, "-m", "reconciler.cli", "status", "--watch", "--interval", "0.3", "--spec", str(c.spec_dir)]
    piped = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    primary, secondary = pty.openpty()
    tty = subprocess.Popen(argv, stdout=secondary, stderr=secondary, stdin=subprocess.DEVNULL)
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + 10
    while screen.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
        screen += os.read(primary, 65536)
    for p in (piped, tty):
        p.send_signal(signal.SIGINT)
    assert tty.wait(5) == 0 and piped.wait(5) == 0
    out = piped.stdout.read()
    os.close(primary)
    assert screen.count(b"\x1b[H\x1b[2J") >= 3, screen
    assert b"every 0.3s: reconcile status" in screen and b"web" in screen
    frames = [f for f in out.split("--- ") if f.strip()]
    assert len(frames) >= 2 and all("1 node, 1 live; 1 group: 1 running" in f for f in frames[:2]), out
    assert "\x1b[" not in out  # not a terminal: plain repeated output
    p = reconcile("status", "--interval", "1", "--spec", str(c.spec_dir))
    assert p.returncode == 64 and "--interval needs --watch" in p.stderr
