"""A randomized fault run: kill -9 of nodes, SIGSTOP/SIGCONT of agents, agent restarts.

At no moment may a group run on two nodes (the safety checker reads every guard's start,
alive and stop records), and once the faults stop every group runs again, exactly once.
RECONCILER_FAULTS sets the number of faults (default 100); RECONCILER_FAULT_SEED the seed.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from cluster import Cluster, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for unshare")

GROUPS = ("a", "b", "c", "d")


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
            time.sleep(rng.uniform(0.05, 0.4))
        for n in paused:
            c.nodes[n].resume()
        for n in down:
            c.nodes[n].start()
        for g in GROUPS:
            wait_until(lambda: c.runs_on_one(g), 15, what=f"{g} running exactly once after the faults")
        time.sleep(1.0)
        for g in GROUPS:
            assert len(c.running(g)) == 1, (g, c.running(g))
    finally:
        c.stop()
        (tmp_path / "faults.log").write_text(f"seed {seed}\n" + "\n".join(history) + "\n")
    bad = c.violations()
    assert bad == [], f"seed {seed}:\n" + "\n".join(bad[:20])
