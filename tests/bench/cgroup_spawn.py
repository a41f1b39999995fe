"""The cost of an entry cgroup at spawn: Supervisor.start() until the command runs.

    python3 tests/bench/cgroup_spawn.py [--trials 200] [--gap 0.05] [--ballast-mb 60]

One Supervisor (as the agent has) starts `sleep 86400` as a respawn entry, `--trials` times
for each way, alternating: with the entry's cgroup (the child joins it through a shell
before exec), without cgroups (RECONCILER_CGROUPS=off: the plain Popen, as before issue 12),
and, for comparison, with a preexec_fn that joins the cgroup (Python then forks instead of
vforking: the cost grows with the agent's memory, hence --ballast-mb). Each trial times
start() (the call the event loop waits for) and the time until /proc/PID/cmdline shows
the command (the command really runs), then kills the entry. Prints median and p90. Root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from reconciler.host import cgroups  # noqa: E402
from reconciler import spec as specmod  # noqa: E402
from reconciler.act import process, syscalls  # noqa: E402


class PreexecSys(process.Sys):
    """Joins the cgroup in a preexec_fn instead of the shell (the alternative not taken)."""

    def spawn(self, argv, *, env, cwd, user, log_path, creds=None, cgroup_fd=None, cgroup_path=""):
        import subprocess

        fd = cgroup_fd
        log = syscalls.open_log(log_path)
        try:
            return subprocess.Popen(
                list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, preexec_fn=lambda: os.write(fd, b"0"),
            )
        finally:
            os.close(log)


def runs(pid: int, argv: list[str]) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[:-1] == [a.encode() for a in argv]
    except OSError:
        return False


async def trial(sup: process.Supervisor, entry: specmod.Entry) -> tuple[float, float]:
    t0 = time.perf_counter()
    pid = await sup.start("bench", entry, level="run", env={})
    t1 = time.perf_counter()
    while not runs(pid, list(entry.command)):
        await asyncio.sleep(0)
    t2 = time.perf_counter()
    await sup.stop("bench", entry.tag, sig=signal.SIGKILL, timeout=1)
    sup.reset("bench", entry.tag)
    return t1 - t0, t2 - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between spawns (isolated spawns, as respawns are)")
    ap.add_argument("--ballast-mb", type=int, default=60, help="memory the process holds, as an agent does")
    args = ap.parse_args()
    ballast = bytearray(args.ballast_mb * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    state = tempfile.mkdtemp(prefix="cgroup-spawn-")
    node = f"bench-{os.getpid()}"
    # One supervisor (it owns SIGCHLD), its tree and Sys switched between the ways.
    sup = process.Supervisor(node=node, state_dir=state, on_change=lambda: None)
    tree, plain = sup.tree, process.Sys()
    ways = {"cgroup (shell joins)": (tree, plain), "no cgroup": (None, plain), "cgroup (preexec_fn)": (tree, PreexecSys())}
    sup.attach(asyncio.get_running_loop())
    got: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    for _ in range(args.trials):
        for i, (way, (sup.tree, sup.sys)) in enumerate(ways.items()):
            entry = specmod.Entry(tag=f"e{i}", mode="respawn", command=("sleep", "86400"), runlevels=("run",))
            got[way].append(await trial(sup, entry))
            await asyncio.sleep(args.gap)
    print(f"spawn cost, {args.trials} trials each, {args.gap:g} s apart, agent-sized process ({args.ballast_mb} MB ballast), "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for way, vals in got.items():
        call = sorted(v[0] * 1000 for v in vals)
        ran = sorted(v[1] * 1000 for v in vals)
        p90 = lambda xs: xs[int(len(xs) * 0.9)]  # noqa: E731
        print(f"{way:22s} start() median {statistics.median(call):5.2f} ms p90 {p90(call):5.2f}   "
              f"command running median {statistics.median(ran):5.2f} ms p90 {p90(ran):5.2f}")
    sup.detach()
    cgroups.kill(tree.root)
    time.sleep(0.2)
    cgroups.remove(tree.root)

if __name__ == "__main__":
    asyncio.run(main())
