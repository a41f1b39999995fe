"""/proc, read with the standard library alone: process identities (pid + start time),
children, the processes an agent marked as its own, and this namespace's mounts.

Shared by the keeper (which imports nothing beyond the standard library and this package),
the process supervisor and adoption.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from reconciler.host import cgroups


def start_ticks(pid: int, *, live: bool = False) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, its identity.
    None if there is no such process (or, with `live`, if it is a zombie: it has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if live and fields[0] == b"Z":
        return None
    return int(fields[19])


def proc_stats() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, the fields of /proc/PID/stat after the command name) for every process (from
    /proc: the keeper has no dependencies)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        yield int(name), data[data.rindex(b")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`."""
    return [child for child, fields in proc_stats() if int(fields[1]) == pid]


def agent_pid(node_dir: str) -> int | None:
    try:
        with open(os.path.join(node_dir, "agent.pid")) as fh:
            pid, ticks = (int(x) for x in fh.read().split())
    except (OSError, ValueError):
        return None
    return pid if start_ticks(pid) == ticks else None


MARK_DIR = b"RECONCILER_NODE_DIR="  # every child the agent starts carries both


MARK_ENTRY = b"RECONCILER_ENTRY="


def marked_processes(node_dir: str) -> dict[str, list[int]]:
    """{"GROUP/TAG": pids} of the processes whose environment names this node directory:
    the agent's children and everything they forked (an environment is inherited), found
    without the process table or cgroups. Reads /proc/PID/environ, so only as root (or the
    processes' owner) does it see them all."""
    want = MARK_DIR + os.path.abspath(node_dir).encode()
    me = os.getpid()
    out: dict[str, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if want not in env:
            continue
        entry = next((v[len(MARK_ENTRY) :] for v in env if v.startswith(MARK_ENTRY)), b"?")
        out.setdefault(entry.decode(errors="replace"), []).append(int(name))
    return out


_unescape = cgroups.unescape  # mountinfo's \ooo escapes (one implementation, in cgroups.py)


def mounts() -> list[tuple[str, str]]:
    """(target, filesystem type) of every mount in this mount namespace, in the order of
    /proc/self/mountinfo (later lines are mounted on top of earlier ones); [] if unreadable."""
    try:
        with open("/proc/self/mountinfo") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            out.append((_unescape(fields[4]), right.split()[0]))
    return out


def top_fstype(target: str) -> str | None:
    """The filesystem type of the topmost mount at `target` in this mount namespace, or None."""
    found = None
    for at, fstype in mounts():
        if os.path.normpath(at) == target:
            found = fstype
    return found

