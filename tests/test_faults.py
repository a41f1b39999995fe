"""Randomized fault runs: at no moment may a group run on two machines, and once the faults
stop every group runs again, exactly once.

The safety checker reads every guard's start, alive and stop records; two agents with one
node name in different pid namespaces are two machines. RECONCILER_FAULT_SEED sets the seed
(printed; written with what was done and when to faults.log next to the guard log) and
RECONCILER_FAULTS the number of faults of either test.

`test_randomized_faults_never_run_a_group_twice` (100 faults by default): kill -9 of nodes,
SIGSTOP/SIGCONT of agents, agent restarts, on plain nodes (the agent is PID 1 of its
namespace and its state directory outlives it).

`test_randomized_local_state_faults_never_run_a_group_twice` (200 faults by default: about
45 % of the kinds above, the rest local-state faults) runs every node in fault mode (see
tests/cluster.py: PID 1 of its namespace is tests/nodeinit.py with the agent as its child,
and STATE/NODE is a tmpfs of its own, which ends with the node):

    crash           kill -9 of the whole node (its namespace), started again 0.2-1.2 s later
    pause           SIGSTOP of the agent for 0.05-0.3 s (shorter than the lease)
    pause-long      SIGSTOP of the agent for 0.5-1.5 s (past dead_after)
    restart         SIGTERM of the agent (a clean stop), started again 0-0.5 s later
    agent-kill      kill -9 of the agent alone (children and keeper run on), restarted
                    0-0.3 s later (systemd, KillMode=process): it adopts
    agent-kill+table-truncate / agent-kill+table-delete
                    the same, with processes.json truncated / deleted while no agent runs
    table-truncate / table-delete
                    processes.json truncated / deleted under a running agent
    lease-delete    STATE/NODE/lease deleted
    fill            the state directory full (ENOSPC) for 0.3-2 s
    twin            a second agent with the same node name (a cloned VM: own namespaces,
                    own state directory) for 0.5-2 s, stopped with SIGTERM or kill -9
    stray           a stray entry in the directory store for 0.3-1.5 s: a regular file or
                    a directory in claims/, a garbage node record in nodes/ (symlink or JSON)

Its schedule (times, kinds, victims, durations) is a pure function of the seed
(`plan_faults`); the run executes it in order, late when an action takes longer than
planned. At the end each group must run exactly once (by the guard log and by /proc), on
the node holding its claim, with no copy left behind. RECONCILER_FAULT_KINDS
(comma-separated, default all) limits it to some kinds, to find out which kind breaks what,
e.g. RECONCILER_FAULT_KINDS=crash,pause,pause-long,restart,lease-delete.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from cluster import Cluster
from helpers import wait_until
from faultrun import CLASSIC, CONVERGE, GROUPS, IMPAIRING, LOCAL, NODES, Run, converged, plan_faults

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare", "mount", "nsenter")]


def test_randomized_faults_never_run_a_group_twice(tmp_path):
    faults = int(os.environ.get("RECONCILER_FAULTS", "100"))
    seed = int(os.environ.get("RECONCILER_FAULT_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    log = str(tmp_path / "guard.log")
    c = Cluster(tmp_path, groups="".join(Cluster.guard_group(g, log) for g in GROUPS))
    c.start()
    history: list[str] = []
    try:
        for g in GROUPS:
            wait_until(lambda: c.runs_on_one(g), 15, what=f"{g} running")
        down: dict[str, float] = {}  # node -> when to bring it back
        paused: dict[str, float] = {}  # node -> when to resume it
        done = 0
        while done < faults:
            now = time.monotonic()
            for n, at in list(down.items()):
                if now >= at:
                    c.nodes[n].start()
                    del down[n]
                    history.append(f"{now:.3f} start {n}")
            for n, at in list(paused.items()):
                if now >= at:
                    c.nodes[n].resume()
                    del paused[n]
                    history.append(f"{now:.3f} resume {n}")
            healthy = [n for n in c.nodes if n not in down and n not in paused]
            if len(healthy) >= 1 and len(down) + len(paused) < 2:
                victim = rng.choice(healthy)
                kind = rng.choice(("crash", "pause", "pause-long", "restart"))
                node = c.nodes[victim]
                if kind == "crash":
                    node.crash()
                    down[victim] = now + rng.uniform(0.2, 1.2)
                elif kind == "pause":
                    node.pause()  # shorter than the lease: must not stop anything
                    paused[victim] = now + rng.uniform(0.05, 0.3)
                elif kind == "pause-long":
                    node.pause()  # past dead_after: keeper stops, a peer takes over
                    paused[victim] = now + rng.uniform(0.5, 1.5)
                else:
                    node.terminate(timeout=15)
                    down[victim] = now + rng.uniform(0.0, 0.5)
                history.append(f"{now:.3f} {kind} {victim}")
                done += 1
            time.sleep(rng.uniform(0.03, 0.3))  # random gaps between faults: the schedule is the test
        for n in paused:
            c.nodes[n].resume()
        for n in down:
            c.nodes[n].start()
        c.each_runs_once(GROUPS, 15)
    finally:
        c.stop()
        (tmp_path / "faults.log").write_text(f"seed {seed}\n" + "\n".join(history) + "\n")
    bad = c.violations()
    assert bad == [], f"seed {seed}:\n" + "\n".join(bad[:20])


def test_randomized_local_state_faults_never_run_a_group_twice(tmp_path):
    faults = int(os.environ.get("RECONCILER_FAULTS", "200"))
    seed = int(os.environ.get("RECONCILER_FAULT_SEED", str(int(time.time()))))
    print(f"RECONCILER_FAULT_SEED={seed} RECONCILER_FAULTS={faults}")
    kinds = {k.strip() for k in os.environ.get("RECONCILER_FAULT_KINDS", "").split(",") if k.strip()} or None
    unknown = (kinds or set()) - set(CLASSIC) - set(LOCAL)
    assert not unknown, f"RECONCILER_FAULT_KINDS: unknown kinds {sorted(unknown)}"
    steps = plan_faults(seed, faults, kinds)
    assert sum(s.action == "do" for s in steps) == faults
    log = str(tmp_path / "guard.log")
    c = Cluster(tmp_path, nodes=NODES, groups="".join(Cluster.guard_group(g, log) for g in GROUPS)).fault_mode()
    run = Run(c)
    problems: list[str] = []
    try:
        for n in NODES:
            run.boot(n)
        for g in GROUPS:
            wait_until(lambda: c.runs_on_one(g), 15, what=f"{g} running")
        start = time.monotonic()
        run.note(f"run starts: {len(steps)} steps")
        ok = False
        try:
            for s in steps:
                run.check_nodes()
                delay = start + s.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the next fault at its scheduled time
                try:
                    run.apply(s)
                except (ProcessLookupError, FileNotFoundError) as exc:  # its node died on its own meanwhile
                    run.note(f"{s.action} #{s.index} {s.kind} {s.node}: skipped ({exc!r})")
            ok = True
        finally:
            if not ok:
                run.cleanup()
        run.note(f"last fault ended ({time.monotonic() - start - steps[-1].at:+.1f} s late)")
        run.check_nodes()
        try:
            wait_until(lambda: not converged(c), CONVERGE, step=0.2, what="every group running exactly once")
            time.sleep(1.0)  # and stays so: the time passing is the test
        except AssertionError:
            pass
        problems = converged(c)
        run.note("converged" if not problems else "NOT converged: " + " | ".join(problems))
    finally:
        try:
            run.stop_all()
        finally:
            problems += run.kill_leftovers()
        bad = c.violations()
        lines = [f"{v}  <- after: {run.blame(float(v.rsplit('[', 1)[1].split(',')[0]))}" for v in bad]
        (tmp_path / "faults.log").write_text(
            f"seed {seed} faults {faults} kinds {','.join(sorted(kinds or ())) or 'all'}\n"
            + "".join(f"{t:.3f} {what}\n" for t, what in run.history)
            + "".join(f"VIOLATION {line}\n" for line in lines))
    report = [f"RECONCILER_FAULT_SEED={seed} ({tmp_path / 'faults.log'}):"]
    if bad:
        report += [f"{len(bad)} double runs (the first 20, each with the faults of the 3 s before it):", *lines[:20]]
    if problems:
        report += ["not converged at the end:", *problems]
    assert not bad and not problems, "\n".join(report)


def test_fault_plan_is_the_seeds_and_keeps_its_limits():
    """The schedule is a pure function of the seed, has the asked number of faults with at
    least 100 crash / pause / restart ones and 100 local-state ones by default, and never
    disables more than two nodes at once nor starts a second twin."""
    steps = plan_faults(5, 240)
    assert steps == plan_faults(5, 240) and steps != plan_faults(6, 240)
    dos = [s for s in steps if s.action == "do"]
    assert len(dos) == 240
    assert sum(s.kind in CLASSIC for s in dos) >= 100 and sum(s.kind in LOCAL for s in dos) >= 100
    assert {s.kind for s in dos} == set(CLASSIC) | set(LOCAL)
    disabled: dict[int, str] = {}  # fault index -> node, while it lasts
    twins = 0
    for s in steps:
        if s.kind in IMPAIRING:
            if s.action == "do":
                assert s.node not in disabled.values() and len(disabled) < 2, s
                disabled[s.index] = s.node
            else:
                del disabled[s.index]
        elif s.kind == "twin":
            twins += 1 if s.action == "do" else -1
            assert twins <= 1, s
    assert not disabled and twins == 0
    assert {s.kind for s in plan_faults(5, 30, {"pause", "twin"}) if s.action == "do"} == {"pause", "twin"}
