#!/usr/bin/env python3
"""Respawn latency: SIGKILL a respawn process, time until its successor runs the command.

    python3 tests/bench/respawn.py [--trials 50]

Runs, in the same run and on the same machine, our agent (`reconcile run`, one respawn entry
with min_uptime = "0s" so that kills never trigger the backoff) and supervisord
(startsecs=0, autorestart=true) supervising the same program, `sleep 86400`. Trials
alternate between the two. Each trial SIGKILLs the supervised process and polls, every
0.2 ms, the supervisor's children (/proc/PID/task/PID/children) until a child with another
pid has exec'd the same command line. Prints median, p90 and p99 for both and the ratio of
the medians (ours / supervisord); the goal is a ratio <= 1.

supervisord restarts an exited program on the pass of its main loop *after* the one that
reaped it, and that loop sleeps in poll() for up to 1 s: a lone quiet program waits ~1 s,
while a supervisord that is woken often (here: a second program writing output every 10 ms)
restarts in milliseconds. Both are measured and printed ("supervisord" and
"supervisord-busy"), and the ratio is given against each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = ["sleep", "86400"]
POLL = 0.0002

SPEC = """\
[cluster]
name = "bench"
store = "dir:store"
state_dir = "state"

[groups.bench]
runlevel = "run"

[[groups.bench.entries]]
tag = "sleeper"
mode = "respawn"
runlevels = ["run"]
command = {command}
min_uptime = "0s"
stop_timeout = "2s"
"""

SUPERVISORD = """\
[supervisord]
nodaemon = true
logfile = {dir}/supervisord.log
pidfile = {dir}/supervisord.pid
childlogdir = {dir}
loglevel = warn

[program:sleeper]
command = {command}
startsecs = 0
autorestart = true
startretries = 1000000
stopasgroup = true
killasgroup = true
stdout_logfile = {dir}/sleeper.log
redirect_stderr = true
"""

TICKER = """
[program:ticker]
command = sh -c 'while :; do echo tick; sleep 0.01; done'
startsecs = 0
autorestart = true
stdout_logfile = {dir}/ticker.log
stdout_logfile_maxbytes = 1MB
"""


def children(ppid: int) -> list[int]:
    try:
        with open(f"/proc/{ppid}/task/{ppid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def supervised(ppid: int, other_than: int | None = None) -> int | None:
    """The child of `ppid` that runs COMMAND (after exec), other than `other_than`."""
    for pid in children(ppid):
        if pid != other_than and cmdline(pid) == COMMAND:
            return pid
    return None


def wait_supervised(ppid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = supervised(ppid)
        if pid is not None:
            return pid
        time.sleep(0.01)
    raise SystemExit(f"no {' '.join(COMMAND)} under pid {ppid} after {timeout}s")


def trial(ppid: int) -> tuple[float, int]:
    """SIGKILL the current process; seconds until a successor runs COMMAND, and its pid."""
    old = wait_supervised(ppid)
    t0 = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    while True:
        new = supervised(ppid, other_than=old)
        if new is not None:
            return time.perf_counter() - t0, new
        if time.perf_counter() - t0 > 10:
            raise SystemExit(f"pid {ppid}: no respawn within 10s")
        time.sleep(POLL)


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def summary(name: str, xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return (
        f"{name:<16} n={len(ms):<4} median {statistics.median(ms):7.2f} ms   p90 {pct(ms, 90):7.2f} ms   "
        f"p99 {pct(ms, 99):7.2f} ms   min {min(ms):6.2f}   max {max(ms):7.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50, help="kills per supervisor (>= 50)")
    ap.add_argument("--settle", type=float, default=0.05, help="seconds between trials")
    args = ap.parse_args()
    if shutil.which("supervisord") is None or shutil.which("reconcile") is None:
        print("needs `reconcile` and `supervisord` on PATH (pip install -e '.[test]')", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="respawn-bench-"))
    os.chmod(work, 0o755)
    spec_dir = work / "spec"
    spec_dir.mkdir(mode=0o755)
    spec_file = spec_dir / "bench.toml"
    spec_file.write_text(SPEC.format(command="[" + ", ".join(f'"{a}"' for a in COMMAND) + "]"))
    os.chmod(spec_file, 0o644)
    conf = work / "supervisord.conf"
    conf.write_text(SUPERVISORD.format(dir=work, command=" ".join(COMMAND)))
    busy_dir = work / "busy"
    busy_dir.mkdir()
    busy_conf = busy_dir / "supervisord.conf"
    busy_conf.write_text(SUPERVISORD.format(dir=busy_dir, command=" ".join(COMMAND)) + TICKER.format(dir=busy_dir))
    procs: list[subprocess.Popen] = []
    try:
        ours = subprocess.Popen(
            ["reconcile", "run", "--spec", str(spec_dir), "--node", "bench", "--metrics-address", "off"],
            stdout=open(work / "agent.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=work,
        )
        procs.append(ours)
        sup = subprocess.Popen(
            ["supervisord", "-n", "-c", str(conf)],
            stdout=open(work / "supervisord.out", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=work,
        )
        procs.append(sup)
        busy = subprocess.Popen(
            ["supervisord", "-n", "-c", str(busy_conf)],
            stdout=open(busy_dir / "supervisord.out", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=work,
        )
        procs.append(busy)
        wait_supervised(ours.pid)
        wait_supervised(sup.pid)
        wait_supervised(busy.pid)
        time.sleep(0.5)
        results: dict[str, list[float]] = {"reconciler": [], "supervisord": [], "supervisord-busy": []}
        for _ in range(args.trials):
            for name, p in (("reconciler", ours), ("supervisord", sup), ("supervisord-busy", busy)):
                took, _new = trial(p.pid)
                results[name].append(took)
                time.sleep(args.settle)
        v = sys.version.split()[0]
        sup_version = subprocess.run(["supervisord", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"respawn latency: SIGKILL -> successor running `{' '.join(COMMAND)}`, {args.trials} trials each, "
              f"polled every {POLL * 1000:g} ms (python {v}, supervisord {sup_version}, {os.cpu_count()} CPUs)")
        print(summary("reconciler", results["reconciler"]))
        print(summary("supervisord", results["supervisord"]))
        print(summary("supervisord-busy", results["supervisord-busy"]))
        for peer in ("supervisord", "supervisord-busy"):
            ratio = statistics.median(results["reconciler"]) / statistics.median(results[peer])
            print(f"ratio (median ours / median {peer}): {ratio:.2f}  (goal <= 1: {'met' if ratio <= 1 else 'NOT met'})")
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # whatever either supervisor left behind (the agent's keeper exits on a clean stop)
        for pid in (int(x) for x in os.listdir("/proc") if x.isdigit()):
            if cmdline(pid) == COMMAND:
                try:
                    if os.readlink(f"/proc/{pid}/cwd") == str(work):
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
