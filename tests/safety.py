"""The safety checker: no group may ever run on two nodes at once.

Reads the records guard.py writes and builds, per process, the interval from its `start` to
its `stop` (or, if it was SIGKILLed, its last `alive` plus the alive period and a margin,
an upper bound of when it died). Any two intervals of one group on different nodes that
overlap are a violation.

A process runs on a *machine*: its node name and, when the record carries it, its pid
namespace. Two agents with the same node name in different pid namespaces (a cloned VM)
are two machines, so their overlapping runs of a group are a violation too.
"""

from __future__ import annotations

from collections import defaultdict

ALIVE_MARGIN = 0.02  # alive period (10 ms) + scheduling slack


def _runs(path: str) -> list[dict]:
    """Every process run in the log. Pids repeat (each node is a fresh pid namespace, so a
    restarted node reuses small pids): a `start` record always begins a new run, and the
    records after it, for that node and pid, belong to that run (the log is appended in order
    under a lock, and a pid is only reused after its previous process died)."""
    runs: list[dict] = []
    current: dict[tuple[str, str, int], dict] = {}
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) < 6 or (len(parts) > 6 and not parts[6].isdigit()):
                continue  # a torn last line of a process killed mid-write
            t, event, node, group, pid = float(parts[0]), parts[1], parts[2], parts[3], int(parts[4])
            ns = parts[6] if len(parts) > 6 else ""  # "": an older record without its pid namespace
            r = current.get((node, ns, pid))
            if event == "start" or r is None or r["group"] != group:
                r = {"group": group, "node": node, "ns": ns, "pid": pid, "start": t, "last": t, "stop": None}
                current[(node, ns, pid)] = r
                runs.append(r)
            r["last"] = max(r["last"], t)
            if event == "stop":
                r["stop"] = t
    return runs


def _end(r: dict) -> float:
    return r["stop"] if r["stop"] is not None else r["last"] + ALIVE_MARGIN


def intervals(path: str) -> dict[str, list[tuple[float, float, str, int]]]:
    """{group: [(start, end, node, pid)]}"""
    out: dict[str, list] = defaultdict(list)
    for r in _runs(path):
        out[r["group"]].append((r["start"], _end(r), r["node"], r["pid"]))
    return out


def violations(path: str) -> list[str]:
    found = []
    by_group: dict[str, list] = defaultdict(list)  # {group: [(start, end, node, pid, pid namespace)]}
    for r in _runs(path):
        by_group[r["group"]].append((r["start"], _end(r), r["node"], r["pid"], r["ns"]))
    for group, runs in by_group.items():
        runs.sort()
        for i, (s1, e1, n1, p1, ns1) in enumerate(runs):
            for s2, e2, n2, p2, ns2 in runs[i + 1 :]:
                if s2 >= e1:
                    break
                if n1 != n2:
                    found.append(f"{group}: {n1} pid {p1} [{s1:.3f}, {e1:.3f}] overlaps {n2} pid {p2} [{s2:.3f}, {e2:.3f}]")
                elif ns1 and ns2 and ns1 != ns2:  # two machines with one node name
                    found.append(f"{group}: {n1} (pidns {ns1}) pid {p1} [{s1:.3f}, {e1:.3f}] overlaps {n2} (pidns {ns2})"
                                 f" pid {p2} [{s2:.3f}, {e2:.3f}]")
    return found


def running_now(path: str, now: float, fresh: float = 0.1) -> dict[str, set[str]]:
    """{group: nodes whose guard reported alive within `fresh` seconds and did not stop}."""
    out: dict[str, set[str]] = defaultdict(set)
    for r in _runs(path):
        if r["stop"] is None and r["last"] >= now - fresh:
            out[r["group"]].add(r["node"])
    return out


def live_runs(path: str, now: float, fresh: float = 0.1) -> dict[str, list[tuple[str, str, int]]]:
    """{group: [(node, pid namespace, pid)] of every run that reported alive within `fresh`
    seconds and did not stop}: unlike running_now, two copies on one node count twice."""
    out: dict[str, list] = defaultdict(list)
    for r in _runs(path):
        if r["stop"] is None and r["last"] >= now - fresh:
            out[r["group"]].append((r["node"], r["ns"], r["pid"]))
    return out
