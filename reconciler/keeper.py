"""The keeper: a tiny per-node process that stops the node's processes when the agent can't.

The agent renews a deadline (CLOCK_MONOTONIC seconds, shared by every process on the
machine) in STATE/NODE/lease each time it renews its lease. If the agent dies, is paused
(SIGSTOP, a frozen VM) or hangs, the deadline passes and the keeper SIGKILLs every process
group the agent recorded as running, so no group outlives its owner's lease. It is kept too
simple to fail: no imports beyond the standard library, no store, no spec.

    python3 -m reconciler.keeper STATE/NODE

It exits when the lease file is removed (the agent shut down cleanly) or after it fired.
"""

from __future__ import annotations

import json
import os
import signal
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


def fire(node_dir: str) -> list[int]:
    """SIGKILL every recorded running process group whose leader is still the same process."""
    try:
        with open(os.path.join(node_dir, "processes.json")) as fh:
            records = json.load(fh).get("records", [])
    except (OSError, ValueError):
        records = []
    killed = []
    for r in records:
        pid, pgid = r.get("pid"), r.get("pgid") or r.get("pid")
        if r.get("state") not in ("running", "stopping") or not pid:
            continue
        if start_ticks(pid) != r.get("ticks"):
            continue  # gone, or the pid was recycled: not ours
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
            killed = fire(node_dir)
            with open(os.path.join(node_dir, "keeper.log"), "a") as fh:
                fh.write(f"{time.time():.3f} lease deadline {deadline:.3f} passed: SIGKILL process groups {killed}\n")
            return 0
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
