"""What changed between two specs, said in a few words: for a revision's summary in the store
(`reconcile history`) and for the log line of a node that takes a new revision.

Only the cluster-wide part counts (the local keys are each node's own; see local.py), and
only what the digest covers: a group moved from one file to another is no change.
"""

from __future__ import annotations

import attrs

from reconciler.spec.model import Entry, Group, Spec, Timing, format_duration

__all__ = ["changes", "one_line"]

ONE_LINE_MAX = 100


def _dur(value: float) -> str:
    return format_duration(value)


def _names(nodes: tuple[str, ...]) -> str:
    return ", ".join(nodes) if nodes else "any"


def _entries(group: str, old: tuple[Entry, ...], new: tuple[Entry, ...]) -> list[str]:
    before = {e.tag: e for e in old}
    after = {e.tag: e for e in new}
    out = [f"group {group}: entry {t} added" for t in after if t not in before]
    out += [f"group {group}: entry {t} removed" for t in before if t not in after]
    out += [f"group {group}: entry {t} changed" for t in after if t in before and after[t] != before[t]]
    if not out and [e.tag for e in old] != [e.tag for e in new]:
        out.append(f"group {group}: entries reordered")
    return out


def _group(name: str, old: Group, new: Group) -> list[str]:
    out = []
    if old.runlevel != new.runlevel:
        out.append(f"group {name}: runlevel {old.runlevel} -> {new.runlevel}")
    out += _entries(name, old.entries, new.entries)
    if old.nodes != new.nodes:
        out.append(f"group {name}: nodes {_names(old.nodes)} -> {_names(new.nodes)}")
    if old.failback != new.failback:
        out.append(f"group {name}: failback {str(old.failback).lower()} -> {str(new.failback).lower()}")
    if old.fence != new.fence:
        out.append(f"group {name}: fence {'set' if not old.fence else 'removed' if not new.fence else 'changed'}")
    if old.fence_timeout != new.fence_timeout:
        out.append(f"group {name}: fence_timeout {_dur(old.fence_timeout)} -> {_dur(new.fence_timeout)}")
    return out


def _timing(old: Timing, new: Timing) -> list[str]:
    out = []
    for a in attrs.fields(Timing):
        x, y = getattr(old, a.name), getattr(new, a.name)
        if x != y:
            shown = (str(x), str(y)) if a.name == "clock_slack" else (_dur(x), _dur(y))
            out.append(f"timing.{a.name} {shown[0]} -> {shown[1]}")
    return out


def changes(old: Spec | None, new: Spec) -> list[str]:
    """What `new` changes against `old` (None: there was none), one short line each: groups
    added or removed, a group's runlevel, entries, nodes, failback or fence, each timing key,
    the cluster's name and stop_all. The local keys are not compared."""
    if old is None:
        groups = ", ".join(new.groups) or "no groups"
        return [f"first spec: {groups}"]
    out = []
    a, b = old.cluster, new.cluster
    if a.name != b.name:
        out.append(f"cluster name {a.name} -> {b.name}")
    if a.stop_all != b.stop_all:
        out.append(f"stop_all {str(a.stop_all).lower()} -> {str(b.stop_all).lower()}")
    out += _timing(a.timing, b.timing)  # (the rest of [cluster] is the local keys: not compared)
    for name, g in new.groups.items():
        if name not in old.groups:
            out.append(f"group {name} added ({g.runlevel})")
    for name in old.groups:
        if name not in new.groups:
            out.append(f"group {name} removed")
    for name, g in new.groups.items():
        if name in old.groups:
            out += _group(name, old.groups[name], g)
    return out


def one_line(old: Spec | None, new: Spec, *, limit: int = ONE_LINE_MAX) -> str:
    """`changes` in one line of at most `limit` characters ("; " between them, the rest
    counted: "(+3 more)"); "no change" if there is none."""
    lines = changes(old, new)
    if not lines:
        return "no change"
    shown: list[str] = []
    for i, line in enumerate(lines):
        rest = len(lines) - i - 1
        more = f" (+{rest} more)" if rest else ""
        candidate = "; ".join([*shown, line]) + more
        if len(candidate) > limit:
            if not shown:  # the first line alone is too long: cut it
                more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
                return line[: limit - len(more) - 3] + "..." + more
            return "; ".join(shown) + f" (+{len(lines) - i} more)"
        shown.append(line)
    return "; ".join(shown)
