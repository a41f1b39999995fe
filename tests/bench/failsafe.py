#!/usr/bin/env python3
"""The failsafe's figures (issue 17): the longest store outage survived with zero stops, the
added failover time when an owner is cut off from the store alone, and the idle CPU cost.

    python3 tests/bench/failsafe.py [--outages 30,120] [--trials 5] [--idle 30] [--only outage,etcd,cut-off,idle]

Three agents from the multi-node harness (tests/cluster.py), each in a network namespace on
one bridge (the peer link), on a directory store, with six guard groups and the timing of
tests/test_failsafe_cluster.py (heartbeat 100 ms, lease 800 ms, dead_after 1.2 s). Root.

  outage    the store directory renamed away for each of --outages seconds (every node
            loses it); counts the guards' starts and stops meanwhile and after (goal: 0).
  etcd      the same on a 3-member etcd on a bridge of its own (every agent has a second
            link to it), every member SIGSTOPped for each of --outages seconds.
  cut-off   one owner's store link cut (an empty tmpfs over the store in its mount
            namespace; its peer link stays up), timed from the cut to its group's start on
            another node, --trials times with the failsafe on and off (goal: no difference
            beyond noise: the owner's peers refuse at once, it demotes by its lease).
  idle CPU  the agents' CPU seconds (user + system, /proc) over --idle seconds of a healthy
            store, with the failsafe on and off (goal: no change).
Exit status 0 when every outage stopped nothing and the checker found no double run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import psutil  # noqa: E402

import safety  # noqa: E402
from cluster import Cluster  # noqa: E402
from helpers import wait_until  # noqa: E402
from netns import Topology  # noqa: E402
from test_etcd_agent import _pause_etcd  # noqa: E402
from test_failsafe_cluster import (  # noqa: E402
    GROUPS, NODES, SECRET, TIMING, cut_store, etcd_on_a_store_bridge, settled, starts_stops, store_away, store_back,
    uncut_store,
)


def make(root: Path, topo: Topology, *, failsafe: bool, spaces: dict[str, str] | None = None, **options) -> Cluster:
    secret = root / "peer.secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    spaces = spaces or {n: topo.add(n, f"198.51.100.{21 + i}") for i, n in enumerate(NODES)}
    groups = "".join(Cluster.guard_group(g, str(root / "guard.log")) for g in GROUPS)
    c = Cluster(root, netns=spaces, own_specs=True, cluster_extra=TIMING, groups=groups, **options)
    for i, n in enumerate(NODES):
        keys = f'peer_listen = "198.51.100.{21 + i}:7946"\npeer_secret_file = "{secret}"\n' if failsafe else ""
        c.write("node.toml", f"[cluster]\n{keys}", node=n)
    c.start()
    c.before = settled(c)
    return c


def cluster_run(tag: str, failsafe: bool, body):
    root = Path(tempfile.mkdtemp(prefix=f"bench-failsafe-{tag}-"))
    os.chmod(root, 0o755)
    topo = Topology(f"rcb{os.getpid() % 10000}{tag[:2]}")
    c = None
    try:
        c = make(root, topo, failsafe=failsafe)
        return body(c, topo)
    finally:
        if c is not None:
            c.stop()
            bad = safety.violations(c.guard_log)
            if bad:
                print(f"{tag}: DOUBLE RUN: {bad[:3]}")
                raise SystemExit(1)
        topo.cleanup()


def outage(seconds: float):
    def body(c: Cluster, _topo) -> int:
        before = time.monotonic()
        store_away(c)
        try:
            time.sleep(seconds)
        finally:
            store_back(c)
        time.sleep(2.5)
        changed = starts_stops(c, before)
        print(f"outage {seconds:.0f} s, store away for every node: {len(changed)} starts/stops"
              f"{' ' + str(changed[:4]) if changed else ''}")
        return len(changed)
    return body


def etcd_outage(seconds: float) -> int:
    """Every etcd member (3, on a store bridge of their own) SIGSTOPped for `seconds`."""
    root = Path(tempfile.mkdtemp(prefix="bench-failsafe-etcd-"))
    os.chmod(root, 0o755)
    topo, store_net = Topology(f"rcb{os.getpid() % 10000}e"), Topology(f"rcb{os.getpid() % 10000}s")
    etcd = c = None
    try:
        etcd, agents, observer = etcd_on_a_store_bridge(topo, store_net, root)
        c = make(root, topo, failsafe=True, spaces=agents, store=etcd.url, store_netns=observer)
        before = time.monotonic()
        _pause_etcd(etcd, seconds)
        time.sleep(2.5)
        changed = starts_stops(c, before)
        print(f"outage {seconds:.0f} s, every etcd member SIGSTOPped: {len(changed)} starts/stops"
              f"{' ' + str(changed[:4]) if changed else ''}")
        c.stop()
        bad = safety.violations(c.guard_log)
        if bad:
            print(f"etcd: DOUBLE RUN: {bad[:3]}")
            raise SystemExit(1)
        return len(changed)
    finally:
        if c is not None:
            c.stop()
        if etcd is not None:
            etcd.stop()
        store_net.cleanup()
        topo.cleanup()


def cut_off(trials: int):
    def body(c: Cluster, _topo) -> list[float]:
        times = []
        for _ in range(trials):
            where = settled(c)
            owner = where["g1"]
            pid = c.nodes[owner].agent_pid
            cut_at = time.monotonic()
            cut_store(c, owner)
            new = wait_until(lambda: (n := c.runs_on_one("g1")) and n != owner and n, 15, what="g1 taken over")
            started = [r[0] for r in starts_stops(c, cut_at) if r[1] == "start" and r[2] == new and r[3] == "g1"]
            times.append(started[0] - cut_at)
            uncut_store(c, pid)
            time.sleep(2.0)
        return times
    return body


def idle_cpu(seconds: float):
    def body(c: Cluster, _topo) -> float:
        procs = [psutil.Process(c.nodes[n].agent_pid) for n in NODES]
        t0 = [p.cpu_times() for p in procs]
        time.sleep(seconds)
        t1 = [p.cpu_times() for p in procs]
        return sum((b.user + b.system) - (a.user + a.system) for a, b in zip(t0, t1)) / len(procs) / seconds
    return body


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outages", default="30,120")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--only", default="", help="run only these parts: outage, etcd, cut-off, idle (comma-separated)")
    args = ap.parse_args()
    parts = set(args.only.split(",")) if args.only else {"outage", "etcd", "cut-off", "idle"}
    print(f"load average before: {os.getloadavg()}")
    failed = 0
    for s in (float(x) for x in args.outages.split(",") if x):
        if "outage" in parts:
            failed += cluster_run(f"o{int(s)}", True, outage(s)) != 0
        if "etcd" in parts:
            failed += etcd_outage(s) != 0
    for on in (True, False) if "cut-off" in parts else ():
        times = cluster_run("c" + ("on" if on else "off"), on, cut_off(args.trials))
        print(f"cut-off owner, failsafe {'on ' if on else 'off'}: cut -> start elsewhere median {statistics.median(times):.2f} s,"
              f" max {max(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})")
    for on in (True, False) if "idle" in parts else ():
        cpu = cluster_run("i" + ("on" if on else "off"), on, idle_cpu(args.idle))
        print(f"idle, store healthy, failsafe {'on ' if on else 'off'}: {cpu * 100:.2f} % of a core per agent")
    print(f"load average after: {os.getloadavg()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
