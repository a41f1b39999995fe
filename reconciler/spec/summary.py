"""`reconcile check`: what a spec declares, with each group's worst-case failover time and the
commands that cannot be found. Its text and its --json are both made from `summary`."""

from __future__ import annotations

import os
import shutil
from typing import Any

from reconciler.spec.loader import load
from reconciler.spec.model import Spec, format_duration


def _found(exe: str) -> bool:
    return os.access(exe, os.X_OK) if "/" in exe else shutil.which(exe) is not None


def summary(spec: Spec, spec_path: str) -> dict[str, Any]:
    t = spec.cluster.timing
    problems, warnings, groups = [], [], []
    for g in spec.groups.values():
        for i, e in enumerate(g.entries):
            if e.command and e.mode != "off" and not _found(e.command[0]):
                problems.append(f"{g.source}: groups.{g.name}.entries[{i}].command: {e.command[0]}: command not found")
        if g.fence and not _found(g.fence[0]):
            problems.append(f"{g.source}: groups.{g.name}.fence: {g.fence[0]}: command not found")
        detect = t.worst_failover()
        fence = g.fence_timeout if g.fence else None
        fg = [e for e in g.entries if e.foreground and e.active_at(g.runlevel)]
        bounded = all(e.timeout is not None for e in fg)
        start = sum(e.timeout or 0 for e in fg)
        groups.append({
            "name": g.name, "runlevel": g.runlevel, "entries": len(g.entries), "nodes": list(g.nodes),
            "detect": detect, "fence": fence, "start": start if bounded else None,
            "worst_failover": detect + (fence or 0) + start, "bounded": bounded,
        })
    # What a running agent does with an empty spec (loader.check_replacement), said beforehand.
    if spec.cluster.stop_all:
        warnings.append(f"{spec_path}: cluster.stop_all: true: agents apply this spec even where it stops every group")
    elif not spec.groups:
        warnings.append(
            f"{spec_path}: groups: no groups: a running agent refuses this spec, which would stop every"
            " group that runs, and keeps its last good one; set stop_all = true in [cluster] to stop them all"
        )
    return {
        "spec": spec_path, "digest": spec.digest(), "store": spec.shown_store_url,
        "timing": {"heartbeat": t.heartbeat, "lease": t.lease, "dead_after": t.dead_after, "minimum_dead_after": t.minimum_dead_after()},
        "groups": groups, "warnings": warnings, "problems": problems,
    }


def render(doc: dict[str, Any]) -> list[str]:
    t = doc["timing"]
    out = [
        f"spec {doc['spec']}: {len(doc['groups'])} groups, digest {doc['digest']}, store {doc['store']}",
        f"timing: heartbeat {format_duration(t['heartbeat'])}, lease {format_duration(t['lease'])}, "
        f"dead_after {format_duration(t['dead_after'])} (safe: must exceed {t['minimum_dead_after'] * 1000:.0f}ms)",
    ]
    for g in doc["groups"]:
        parts = [f"detect <= {g['detect']:.2f}s"]
        if g["fence"] is not None:
            parts.append(f"fence <= {format_duration(g['fence'])}")
        parts.append(f"start <= {g['start']:.2f}s + spawn" if g["bounded"] else "start: foreground entries without timeout")
        where = ", ".join(g["nodes"]) if g["nodes"] else "any node"
        out.append(
            f"  {g['name']}: runlevel {g['runlevel']}, {g['entries']} entries, on {where}; "
            f"worst-case failover {g['worst_failover']:.2f}s{'' if g['bounded'] else '+'} ({'; '.join(parts)})"
        )
    return out


def names(path: str) -> dict[str, list[str]]:
    """The spec's group names, node names (those its groups' `nodes` lists give) and entries
    (GROUP/TAG), for shell completion: never raises (a spec that does not load has none)."""
    try:
        spec = load(path)
    except Exception:
        return {"groups": [], "nodes": [], "entries": []}
    return {
        "groups": list(spec.groups),
        "nodes": sorted({n for g in spec.groups.values() for n in g.nodes}),
        "entries": [f"{g.name}/{e.tag}" for g in spec.groups.values() for e in g.entries],
    }
