"""Status documents: what a node publishes about itself, and how `reconcile status` shows
the whole cluster from the store."""

from __future__ import annotations

import time

from reconciler import published
from reconciler import spec as specmod
from reconciler.decide import placement
from reconciler.published import EntryStatus, GroupStatus, MemberStatus, NodeStatus
from reconciler.observe import Observed
from reconciler.decide.plan import Plan
from reconciler.store import ClusterView


# (state, pid, exit_code, message, retry_in) -> its EntryStatus. This runs for every entry on
# every pass and most entries look the same as at the last one: the very same record comes
# back, cheaper to find than to build and to compare (== stops at identity). Bounded.
_ENTRIES: dict[tuple, EntryStatus] = {}


def _entry_status(*fields) -> EntryStatus:
    hit = _ENTRIES.get(fields)
    if hit is None:
        if len(_ENTRIES) >= 65536:
            _ENTRIES.clear()
        hit = _ENTRIES[fields] = EntryStatus(*fields)
    return hit


def node_status(
    spec: specmod.Spec, observed: Observed, view: ClusterView, plan: Plan, now: float, *, spec_error: str = "",
    state_errors: tuple[str, ...] = (),
    digest: str | None = None,
) -> NodeStatus:
    """The status this node publishes with its heartbeat (`digest`: spec.digest(), if known)."""
    pending = {a.group for a in plan.actions} | set(observed.busy)
    groups = {}
    eligible = []
    for g in spec.groups.values():
        claim = view.claims.get(g.name)
        mine = claim is not None and claim.node == view.node
        ok = placement.local_eligibility(g, observed) if placement.allowed(g, view.node) else False
        if ok:
            eligible.append(g.name)
        entries = {}
        running_any = False
        fitness = placement.leading_tags(g)
        for e in g.entries:
            st = observed.get(g.name, e.tag, e.kind)
            running_any = running_any or (st.active and e.tag not in fitness)
            entries[e.tag] = _entry_status(
                st.state, st.pid or None, st.exit_code, st.message,
                round(st.retry_at - now, 3) if st.retry_at is not None and st.retry_at > now else None,
            )
        # A failed test halts its group here: nothing after it starts (plan._advance).
        failed = any(
            e.mode == "test" and e.active_at(g.runlevel) and entries[e.tag].state == "failed" for e in g.entries
        )
        if failed and (mine or not running_any):
            actual = "failed"
        elif mine and g.name not in pending:
            actual = g.runlevel
        elif running_any:
            actual = f"->{g.runlevel}" if mine else "stopping"
        else:
            actual = specmod.STOP
        groups[g.name] = GroupStatus(
            desired=g.runlevel,
            owner=claim.node if claim else None,
            generation=claim.generation if claim else None,
            mine=mine,
            actual=actual,
            eligible=ok,
            active=running_any,  # entries of it run here (peers never claim it meanwhile)
            note=plan.notes.get(g.name, ""),
            entries=entries,
        )
    return NodeStatus(
        digest=spec.digest() if digest is None else digest,
        spec_error=spec_error,
        state_errors=tuple(state_errors),
        store_ok=view.store_ok,
        store_error=view.store_error,
        quorum=view.quorum,
        twin=view.twin,
        store_skipped=tuple(view.skipped),
        members={n: MemberStatus(alive=view.alive(n, now, spec.cluster.timing.dead_after), up=m.up) for n, m in view.members.items()},
        eligible_groups=tuple(sorted(eligible)),
        groups=groups,
    )


def cluster_status(spec: specmod.Spec, snap, *, node: str, dead_after: float, published_groups: bool = False) -> dict:
    """Merge every node's published status into one document (for `reconcile status`).

    `published_groups`: the spec on disk does not load (a bad edit; `spec` holds only its
    [cluster] table): list the groups the nodes publish, with the desired runlevel they run.
    """
    now_wall = time.time()
    nodes = {}
    reporter = snap.members.get(node) or next(iter(snap.members.values()), None)
    seen = reporter.status.members if reporter else {}
    for name, hb in sorted(snap.members.items()):
        # The age is the publisher's wall clock against ours (for people: clocks may differ);
        # "live" is what a running agent concluded from the heartbeat counter, if one reports.
        age = max(0.0, now_wall - hb.wall) if hb.wall is not None else None
        member = seen.get(name)
        nodes[name] = {
            "live": member.alive if member is not None and member.alive is not None else age is not None and age < dead_after,
            "heartbeat_age": round(age, 3) if age is not None else None,
            "digest": hb.digest,
            "spec_differs": not published_groups and hb.digest != spec.digest(),
            "spec_error": hb.status.spec_error,
            "twin": hb.status.twin,
            "state_errors": list(hb.status.state_errors),
            "store_skipped": list(hb.status.store_skipped),
        }
    groups = {}
    names = list(spec.groups)
    if published_groups:
        for _n, hb in sorted(snap.members.items()):
            names.extend(g for g in hb.status.groups if g not in names)
    for name in names:
        g = spec.groups.get(name)
        claim = snap.claims.get(name)
        owner_doc = None
        if claim is not None and claim.node in snap.members:
            owner_doc = snap.members[claim.node].status.groups.get(name)
        reports = {n: hb.status.groups.get(name) for n, hb in snap.members.items()}
        notes = {n: r.note for n, r in reports.items() if r is not None and r.note}
        if g is not None:
            desired = g.runlevel
        else:
            desired = owner_doc.desired if owner_doc is not None and owner_doc.desired else next(
                (r.desired for r in reports.values() if r is not None and r.desired), "unknown")
        groups[name] = {
            "desired": desired,
            "owner": claim.node if claim else None,
            "generation": claim.generation if claim else None,
            "actual": owner_doc.actual if owner_doc is not None else specmod.STOP if claim is None else "unknown",
            "entries": {tag: published.entry_doc(e) for tag, e in owner_doc.entries.items()} if owner_doc is not None else {},
            "notes": notes,
        }
    return {"nodes": nodes, "groups": groups}


def render(doc: dict) -> str:
    lines = ["NODE                 LIVE  HEARTBEAT  SPEC"]
    for name, n in doc["nodes"].items():
        age = "-" if n["heartbeat_age"] is None else f"{n['heartbeat_age']:.2f}s ago"
        spec = n["digest"] + (" (differs)" if n["spec_differs"] else "") + (f" error: {n['spec_error']}" if n["spec_error"] else "")
        lines.append(f"{name:<20} {'yes' if n['live'] else 'NO':<5} {age:<10} {spec}")
        if n.get("twin"):
            lines.append(f"  twin: {n['twin']}")
        for error in n.get("state_errors", []):
            lines.append(f"  local state: {error}")
        if n.get("store_skipped"):
            lines.append(f"  store entries skipped: {', '.join(n['store_skipped'][:10])}")
    lines.append("")
    lines.append("GROUP                DESIRED    ACTUAL     OWNER                GEN")
    for name, g in doc["groups"].items():
        gen = "-" if g["generation"] is None else str(g["generation"])
        lines.append(f"{name:<20} {g['desired']:<10} {g['actual']:<10} {g['owner'] or '-':<20} {gen}")
        for tag, e in g["entries"].items():
            extra = " ".join(
                str(x) for x in (
                    f"pid {e['pid']}" if "pid" in e else "",
                    f"exit {e['exit_code']}" if "exit_code" in e and e["state"] != "running" else "",
                    f"retry in {e['retry_in']}s" if "retry_in" in e else "",
                    e.get("message", "") if e.get("message", "") != f"exit {e.get('exit_code')}" else "",
                ) if x
            )
            lines.append(f"  {tag:<18} {e['state']:<10} {extra}")
        for node, note in g["notes"].items():
            lines.append(f"  [{node}] {note}")
    return "\n".join(lines)
