#!/usr/bin/env python3
"""How long `reconciler.plan.plan` takes for 1,000 groups x 10 entries (goal: <= 20 ms).

    python3 tests/bench/plan_scale.py [--groups 1000] [--entries 10] [--members 100] [--runs 20]

Three inputs. The first two on one node that owns every group with a valid lease:
  converged    every entry already in its desired state: the plan is empty
  unconverged  nothing runs yet, half the groups change runlevel: stops, starts and resets
and a cluster's cold start, --members live members and nothing claimed yet:
  cold start   each group's leading test passed here; this node claims the groups it ranks
               first for (rendezvous hashing over every member) and waits for the rest
The median (and min/max) of --runs calls of each is printed, wall clock and CPU time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reconciler.observe import EntryState, Observed  # noqa: E402
from reconciler.decide.plan import plan  # noqa: E402
from reconciler.published import GroupStatus, NodeStatus  # noqa: E402
from reconciler.spec import Cluster, Entry, Group, Spec  # noqa: E402
from reconciler.store import Claim, ClusterView, Heartbeat, Member  # noqa: E402

NODE = "n1"
NOW = 10_000.0
# One group's entries: a leading test, a wait, then background entries at two runlevels.
LAYOUT = [("test", ("run", "maint")), ("wait", ("run", "maint"))] + [
    ("respawn" if i % 3 else "once", ("run",) if i % 2 else ("run", "maint")) for i in range(8)
]


def make_groups(n_groups: int, n_entries: int) -> dict[str, Group]:
    """n_groups groups g0000... of n_entries entries each, laid out as LAYOUT (also used by
    tests/bench/scale.py)."""
    groups = {}
    for gi in range(n_groups):
        name = f"g{gi:04d}"
        entries = tuple(
            Entry(tag=f"{name}-e{i}", runlevels=LAYOUT[i % len(LAYOUT)][1], mode=LAYOUT[i % len(LAYOUT)][0], command=("true",))
            for i in range(n_entries)
        )
        groups[name] = Group(name=name, runlevel="run", entries=entries)
    return groups


def build(n_groups: int, n_entries: int) -> tuple[Spec, Observed, Observed, Observed, ClusterView]:
    groups = make_groups(n_groups, n_entries)
    spec = Spec(cluster=Cluster(), groups=groups)
    done = {"test": "passed", "wait": "done", "once": "done", "respawn": "running"}
    converged = {}
    for g in groups.values():
        for i, e in enumerate(g.entries):
            # (a passed test within timing.retest: an owner re-runs its leading tests every retest, issue 16)
            since = NOW - 1 if e.mode == "test" else NOW - 100 + i
            converged[(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, state=done[e.mode], since=since, pid=1000 + i)
    claims = {g: Claim(group=g, node=NODE, generation=1, token="1") for g in groups}
    view = ClusterView(node=NODE, claims=claims, lease_until=float("inf"))
    # Unconverged: every second group moves to "maint" (stops and resets), the others have
    # nothing running yet (starts).
    half = {n: (g if i % 2 else Group(name=n, runlevel="maint", entries=g.entries)) for i, (n, g) in enumerate(groups.items())}
    moving = {k: v for k, v in converged.items() if int(k[0][1:]) % 2 == 0}
    return spec, Observed(node=NODE, entries=converged), Observed(node=NODE, entries=moving), Spec(cluster=Cluster(), groups=half), view


def cold_start(spec: Spec, n_members: int) -> tuple[Observed, ClusterView]:
    """Every member alive and reporting every group eligible, no claims; here only the
    leading tests have run (and passed a second ago)."""
    status = NodeStatus(groups={g: GroupStatus(eligible=True) for g in spec.groups})
    members = {
        f"n{i}": Member(name=f"n{i}", last_change=NOW - 0.05, heartbeat=Heartbeat(node=f"n{i}", counter=1, status=status))
        for i in range(2, n_members + 1)
    }
    entries = {}
    for g in spec.groups.values():
        for e in g.entries:
            if e.mode == "test":
                entries[(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, state="passed", since=NOW - 1)
    view = ClusterView(node=NODE, members=members, lease_until=NOW + 0.3, unclaimed_since={g: NOW - 0.01 for g in spec.groups})
    return Observed(node=NODE, entries=entries), view


def bench(fn, runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this thread) milliseconds of each run. On a busy machine the CPU
    time shows what plan() costs when the wall time also counts waiting for a CPU."""
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--entries", type=int, default=10)
    ap.add_argument("--members", type=int, default=100, help="live members in the cold-start input (this node included)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--goal-ms", type=float, default=20.0)
    args = ap.parse_args()
    spec, converged, moving, spec_moving, view = build(args.groups, args.entries)
    p = plan(spec, converged, view, NOW)
    assert p.empty, [a.describe() for a in p.actions[:5]]
    q = plan(spec_moving, moving, view, NOW)
    kinds: dict[str, int] = {}
    for a in q.actions:
        kinds[a.kind] = kinds.get(a.kind, 0) + 1
    cold_obs, cold_view = cold_start(spec, args.members)
    claims = sum(1 for a in plan(spec, cold_obs, cold_view, NOW).actions if a.kind == "claim")
    print(f"plan() for {args.groups} groups x {args.entries} entries, median of {args.runs} runs (python {sys.version.split()[0]})")
    ok = True
    for label, fn, note in (
        ("converged", lambda: plan(spec, converged, view, NOW), "0 actions"),
        ("unconverged", lambda: plan(spec_moving, moving, view, NOW), ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))),
        ("cold start", lambda: plan(spec, cold_obs, cold_view, NOW), f"{args.members} members: {claims} claim"),
    ):
        fn()  # warm up
        times, cpu = bench(fn, args.runs)
        med = statistics.median(times)
        ok = ok and med <= args.goal_ms
        print(
            f"  {label:<12} median {med:7.2f} ms   min {min(times):7.2f}   max {max(times):7.2f}   "
            f"(cpu median {statistics.median(cpu):6.2f} ms)   {note}"
        )
    load = os.getloadavg()[0]
    print(f"goal <= {args.goal_ms:g} ms (wall-clock median): {'met' if ok else 'NOT met'}   (load average {load:.2f} on {os.cpu_count()} CPUs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
