"""The keeper: a tiny per-node process that stops the node's processes when the agent can't.

The agent renews a deadline (CLOCK_MONOTONIC seconds, shared by every process on the
machine) in STATE/NODE/lease each time it renews its lease. If the agent dies, is paused
(SIGSTOP, a frozen VM) or hangs, the deadline passes and the keeper SIGKILLs every process
group the agent recorded as running, so no group outlives its owner's lease. Then it takes
away the virtual IPs (`ip addr del`) and lazily unmounts the mounts (`umount -l`) the agent
listed in STATE/NODE/resources.json, so that a peer taking the group over never finds the
address still answered for here. It is kept too simple to fail: no imports beyond the
standard library, no store, no spec.

    python3 -m reconciler.keeper STATE/NODE

It exits only when the lease file is removed (the agent shut down cleanly).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

POLL = 0.01


def read_deadline(path: str) -> float | None:
    try:
        with open(path) as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc: the keeper has no dependencies)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if int(data[data.rindex(b")") + 2 :].split()[1]) == pid:
            out.append(int(name))
    return out


def agent_pid(node_dir: str) -> int | None:
    try:
        with open(os.path.join(node_dir, "agent.pid")) as fh:
            pid, ticks = (int(x) for x in fh.read().split())
    except (OSError, ValueError):
        return None
    return pid if start_ticks(pid) == ticks else None


def fire(node_dir: str) -> list[int]:
    """SIGKILL every process group the agent runs: the recorded ones, and (for a process
    spawned a moment before the agent froze, not yet recorded) the agent's own children."""
    try:
        with open(os.path.join(node_dir, "processes.json")) as fh:
            records = json.load(fh).get("records", [])
    except (OSError, ValueError):
        records = []
    groups = set()
    for r in records:
        pid, pgid = r.get("pid"), r.get("pgid") or r.get("pid")
        if r.get("state") not in ("running", "stopping") or not pid:
            continue
        if start_ticks(pid) != r.get("ticks"):
            continue  # gone, or the pid was recycled: not ours
        groups.add(pgid)
    agent = agent_pid(node_dir)
    if agent is not None:
        groups.update(p for p in children_of(agent) if p != os.getpid())
    killed = []
    for pgid in sorted(groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed.append(pgid)
        except OSError:
            pass
    return killed


def main(argv: list[str]) -> int:
    node_dir = argv[1]
    lease = os.path.join(node_dir, "lease")
    with open(os.path.join(node_dir, "keeper.pid"), "w") as fh:
        fh.write(f"{os.getpid()} {start_ticks(os.getpid())}\n")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the lease file decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        deadline = read_deadline(lease)
        if deadline is None and not os.path.exists(lease):
            return 0
        if deadline is not None and time.monotonic() >= deadline:
            # Expired: kill, and keep killing whatever still or newly runs until the agent
            # renews (a paused agent may resume mid-spawn). Never exit while a lease exists.
            killed = fire(node_dir)
            if killed:
                with open(os.path.join(node_dir, "keeper.log"), "a") as fh:
                    fh.write(f"{time.time():.3f} lease deadline {deadline:.3f} passed: SIGKILL process groups {killed}\n")
            time.sleep(POLL * 5)
            continue
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
