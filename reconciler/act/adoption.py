"""Adoption after an agent restart: which entries still run, read from the kernel.

The process table (processes.json) is only a hint here: it may be missing, truncated or
stale (a full disk made its last save fail). What runs is what the entries' cgroups hold
or, where cgroups cannot be used, the processes whose environment carries this node's
marker (RECONCILER_NODE_DIR and RECONCILER_ENTRY, read from /proc/PID/environ as root).
The table still gives what the kernel does not know: the mode, the level, the backoff.
"""

from __future__ import annotations

import json
import logging
import time

from reconciler.host import cgroups
from reconciler.act.records import _SAVED, Record
from reconciler.act.syscalls import pgid_of, start_ticks
from reconciler.host import procfs

log = logging.getLogger("reconciler.process")


def read_table(path) -> tuple[list[dict], str]:
    """The table's records, and "" or why it cannot be trusted."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        records = data.get("records", [])
        if not isinstance(records, list):
            raise ValueError("records is not a list")
        return [r for r in records if isinstance(r, dict) and isinstance(r.get("group"), str) and isinstance(r.get("tag"), str)], ""
    except FileNotFoundError:
        return [], "missing"
    except (OSError, ValueError, AttributeError) as exc:
        return [], f"unreadable ({exc})"


def choose_leader(pids: list[int]) -> int | None:
    """The entry's process among those alive in its cgroup: a process-group leader (what
    the agent spawned, or a daemon's setsid()) before others, then the oldest."""
    alive = [(p, t) for p in pids if (t := start_ticks(p)) is not None]
    if not alive:
        return None
    return min(alive, key=lambda pt: (pgid_of(pt[0]) != pt[0], pt[1], pt[0]))[0]


def live_processes(sup) -> dict[tuple[str, str], list[int]]:
    """(group, tag) -> pids that the kernel says belong to the entry. Removes empty entry
    cgroups left by a dead agent (not when only observing: --dry-run)."""
    found: dict[tuple[str, str], list[int]] = {}
    if sup.tree is not None:
        for group, tag, path in sup.tree.entries():
            pids = cgroups.procs(path, recursive=True)
            if pids:
                found[(group, tag)] = pids
            elif sup.create:
                sup.tree.remove(group, tag)
    # The markers too (one pass over /proc, at start only): what a previous agent started
    # where it could not use cgroups is found the same way.
    for entry, pids in procfs.marked_processes(str(sup.dir)).items():
        group, _, tag = entry.partition("/")
        known = found.setdefault((group, tag), [])
        known.extend(p for p in pids if p not in known)
    return found


def adopt(sup) -> list[Record]:
    raws, problem = read_table(sup.state_file)
    if problem and problem != "missing":
        log.warning("process table %s %s: finding the processes from the %s", sup.state_file, problem,
                    "cgroups" if sup.tree is not None else "environment markers in /proc")
    found = live_processes(sup)
    now = time.monotonic()
    adopted = []
    table = {}
    for raw in raws:
        rec = Record(**{k: raw[k] for k in _SAVED if k in raw})
        table[(rec.group, rec.tag)] = rec
    for key in [*table, *(k for k in found if k not in table)]:
        rec = table.get(key) or Record(group=key[0], tag=key[1], state="running", message="")
        pids = found.get(key, [])
        leader = None
        if rec.state in ("running", "stopping") and rec.pid and rec.ticks is not None and start_ticks(rec.pid) == rec.ticks:
            leader = rec.pid  # the table's leader, alive (its identity checked)
        elif pids:
            leader = choose_leader(pids)
        if leader is not None:
            if leader != rec.pid:
                rec.pid, rec.ticks = leader, start_ticks(leader)
                rec.pgid = pgid_of(leader) or leader
            rec.state = "running"
            rec.message = "adopted after agent restart" + ("" if key in table else " (found in its cgroup, not in the table)"
                                                          if sup.tree is not None else " (found by its marker, not in the table)")
            adopted.append(rec)
        elif rec.state in ("running", "stopping"):
            rec.state, rec.pid, rec.since = "exited", None, now
            rec.message = "exited while the agent was down"
            if rec.mode == "test":
                rec.state = "stopped"
            elif rec.mode in ("once", "wait"):
                rec.state = "done"
        rec.since = min(rec.since, now) if rec.since else now
        sup.records[key] = rec
    return adopted
