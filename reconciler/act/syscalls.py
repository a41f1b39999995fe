"""The system calls of process supervision, in one class: the seam tests subclass to observe
them or inject faults (Supervisor(sys=...)), and /proc parsing that goes with them."""

from __future__ import annotations

import os
import subprocess

from reconciler import keeper


class Sys:
    """Every system call the supervisor makes. Subclass to observe or fault-inject in tests."""

    def spawn(self, argv, *, env, cwd, user, log_path) -> subprocess.Popen:
        with open(log_path, "ab", buffering=0) as log:
            return subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                user=user,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop signals reach the whole tree
                close_fds=True,
            )

    def killpg(self, pgid: int, sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def reap(self, pids=()) -> list[tuple[int, int]]:
        """Collect the exits of `pids` (children we spawned): [(pid, status)].

        Never waitpid(-1): other parts of the agent run children of their own and wait for
        them (mount(8)/umount(8) through subprocess, fence hooks through asyncio); reaping
        one of those here steals its exit status (subprocess then reports 0, asyncio 255).
        """
        out = []
        for pid in pids:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid:
                out.append((pid, os.waitstatus_to_exitcode(status)))
        return out

    def zombies(self) -> set[int]:
        """Children of this process that have exited and are not reaped yet (from /proc)."""
        me = os.getpid()
        return {pid for pid, fields in keeper.proc_stats() if fields[0] == b"Z" and int(fields[1]) == me}

    def reap_any(self, pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def pidfd(self, pid: int) -> int | None:
        try:
            return os.pidfd_open(pid)
        except OSError:
            return None


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (its identity, with the pid); None
    once it has exited, even while it is a zombie."""
    return keeper.start_ticks(pid, live=True)
