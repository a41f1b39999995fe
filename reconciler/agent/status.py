"""Status documents: what a node publishes about itself, and the overview `reconcile status`
shows of the whole cluster (agent/overview.py) from what the nodes publish."""

from __future__ import annotations

import time
from collections.abc import Mapping

from reconciler.agent import overview
from reconciler.cluster.survey import Look
from reconciler import spec as specmod
from reconciler.decide import health, intents, placement
from reconciler.model import Probe
from reconciler.published import EntryStatus, GroupStatus, Intent, MemberStatus, NodeStatus
from reconciler.observe import Observed
from reconciler.decide.plan import Plan
from reconciler.store import ClusterView


# Monotonic -> wall time, fixed once: a failure's time is published as the same number for as
# long as it lasts (a fresh offset on every pass would jitter it, and rewrite the record).
_WALL_OFFSET = time.time() - time.monotonic()
FAILURES = frozenset({"failed", "exited", "error"})  # states whose time is published

# (state, pid, exit_code, message, retry_in, since) -> its EntryStatus. This runs for every entry on
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
    spec_revision: int = 0,
    restarts: Mapping[tuple[str, str], str] = {},
    cleared: Mapping[str, str] = {},
    events_dropped: int = 0,
    maintenance: tuple[str, ...] | None = None,
) -> NodeStatus:
    """The status this node publishes with its heartbeat (`digest`: spec.digest(), if known;
    `restarts`: why the executor last restarted each entry; `cleared`: the id of the last
    `reconcile clear` applied to each group)."""
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
        running_any = degraded = False
        fitness = placement.leading_tags(g)
        for e in g.entries:
            st = observed.get(g.name, e.tag, e.kind)
            running_any = running_any or (st.active and e.tag not in fitness)
            entries[e.tag] = _entry_status(
                st.state, st.pid or None, st.exit_code, st.message,
                round(st.retry_at - now, 3) if st.retry_at is not None and st.retry_at > now else None,
                round(st.since + _WALL_OFFSET, 3) if st.state in FAILURES and st.since else None,
                *_health(e, observed.probes.get((g.name, e.tag)) if e.health is not None else None),
                restarts.get((g.name, e.tag), ""),
            )
            degraded = degraded or entries[e.tag].health in ("failing", "unhealthy") or (
                st.state == "exited" and st.retry_at is not None) or st.state == "error"
        # A failed test halts its group here: nothing after it starts (plan._advance).
        failed = any(
            e.mode == "test" and e.active_at(g.runlevel) and entries[e.tag].state == "failed" for e in g.entries
        )
        if failed and (mine or not running_any):
            actual = "failed"
        elif mine and g.name not in pending:
            actual = "degraded" if degraded else g.runlevel
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
            failures=health.recent(g, observed.failures.get(g.name, ()), now),
            banned=g.name in observed.bans and observed.bans[g.name] > now,
            banned_until=round(observed.bans[g.name] + _WALL_OFFSET, 3) if observed.bans.get(g.name, 0) > now else None,
            cleared=cleared.get(g.name, ""),
        )
    return NodeStatus(
        digest=spec.digest() if digest is None else digest,
        spec_error=spec_error,
        state_errors=tuple(state_errors),
        store_ok=view.store_ok,
        store_error=view.store_error,
        quorum=view.quorum,
        twin=view.twin,
        spec_revision=spec_revision,
        store_skipped=tuple(view.skipped),
        members={n: MemberStatus(alive=view.alive(n, now, spec.cluster.timing.dead_after), up=m.up) for n, m in view.members.items()},
        eligible_groups=tuple(sorted(eligible)),
        groups=groups,
        events_dropped=events_dropped,
        # What this node saw (None: the view's): peers wait for it to see the end.
        maintenance=intents.maintenance(view) if maintenance is None else maintenance,
    )


def _health(e: specmod.Entry, probe: Probe | None) -> tuple[str, int, str, float | None]:
    """(health, probe_failures, probe_message, probe_since) of a probed entry, as published."""
    if e.health is None or probe is None or not probe.result:
        return ("", 0, "", None)
    if probe.result == "ok":
        word = "ok"
    elif probe.failures >= e.health.failures:
        word = "unhealthy"
    else:
        word = "failing" if probe.failures else "starting"
    return (word, probe.failures, probe.message, round(probe.since + _WALL_OFFSET, 3))


def cluster_status(spec: specmod.Spec, look: Look, *, now: float, published_groups: bool = False) -> overview.Overview:
    """Every node's published status, with which nodes are alive (`look`, cluster/survey.py),
    as one overview for `reconcile status`. `now`: this machine's wall time.

    `published_groups`: the spec on disk does not load (a bad edit; `spec` holds only its
    [cluster] table): list the groups the nodes publish, with the desired runlevel they run.
    """
    snap = look.snapshot
    nodes = {}
    for name, hb in sorted(snap.members.items()):
        # Alive: its heartbeat counter moved while we looked, as the agents judge it. The age
        # is the publisher's wall clock against ours: for people (clocks may differ).
        age = max(0.0, now - hb.wall) if hb.wall is not None else None
        nodes[name] = overview.NodeRow(
            live=name in look.advanced,
            heartbeat_age=round(age, 3) if age is not None else None,
            digest=hb.digest,
            spec_differs=not published_groups and hb.digest != spec.digest(),
            spec_error=hb.status.spec_error,
            twin=hb.status.twin,
            state_errors=hb.status.state_errors,
            store_skipped=hb.status.store_skipped,
            revision=hb.status.spec_revision,
            behind=name in look.advanced and hb.status.spec_revision < snap.spec_revision,
            events_dropped=hb.status.events_dropped,
        )
    live = [n for n, row in nodes.items() if row.live]
    names = list(spec.groups)
    if published_groups:
        for _n, hb in sorted(snap.members.items()):
            names.extend(g for g in hb.status.groups if g not in names)
    groups = {}
    for name in names:
        g = spec.groups.get(name)
        claim = snap.claims.get(name)
        reports = {n: hb.status.groups.get(name) for n, hb in sorted(snap.members.items())}
        owner_doc = reports.get(claim.node) if claim is not None else None
        if g is not None:
            desired = g.runlevel
        else:
            desired = owner_doc.desired if owner_doc is not None and owner_doc.desired else next(
                (r.desired for r in reports.values() if r is not None and r.desired), "unknown")
        failures = tuple(
            overview.Failure(node=n, tag=tag, exit_code=e.exit_code, since=e.since)
            for n in live if (r := reports.get(n)) is not None
            for tag, e in r.entries.items() if e.state == "failed"
        )
        # Its tests failed on every live node that may run it (the others publish "not
        # eligible" too: not allowed there).
        may_run = [n for n in live if g is None or placement.allowed(g, n)]
        failed_everywhere = bool(failures) and bool(may_run) and all(
            (r := reports.get(n)) is not None and r.eligible is False for n in may_run)
        # Issue 16: failures and bans as the live nodes publish them.
        group_failures = {n: r.failures for n in live if (r := reports.get(n)) is not None and r.failures}
        bans = {n: r.banned_until for n in live if (r := reports.get(n)) is not None and r.banned}
        banned_everywhere = bool(may_run) and all(n in bans for n in may_run)
        owner_live = claim is not None and claim.node in live
        if claim is not None and not owner_live:
            # A dead owner's last word is stale: its keeper has stopped what it ran (dead_after
            # outlasts its lease), so nothing of the group runs.
            owner_doc = None
        entries = owner_doc.entries if owner_doc is not None else {}
        groups[name] = overview.GroupRow(
            desired=desired,
            owner=claim.node if claim else None,
            generation=claim.generation if claim else None,
            actual=owner_doc.actual if owner_doc is not None else specmod.STOP if claim is None or not owner_live else "unknown",
            state=overview.group_state(
                desired=desired, owner=claim.node if claim else None, owner_live=owner_live,
                actual=owner_doc.actual if owner_doc is not None else None, entries=entries.values(),
                failed_everywhere=failed_everywhere, banned_everywhere=banned_everywhere,
            ),
            entries=dict(entries),
            failures=failures,
            notes={n: r.note for n, r in reports.items() if r is not None and r.note and n in live},
            group_failures=group_failures,
            bans=bans,
            banned_everywhere=banned_everywhere,
        )
    return overview.Overview(nodes=nodes, groups=groups, summary=overview.summary(nodes, groups),
                             problems=overview.problems(nodes, groups), intents=intent_rows(snap.intents))


def intent_rows(found: Mapping[str, Intent]) -> overview.Intents:
    """The operator's intents for `reconcile status` (issue 15)."""
    scopes = []
    for key in sorted(k for k, i in found.items() if i.kind == "maintenance"):
        i = found[key]
        scopes.append(f"group {i.group}" if i.group else f"node {i.node}" if i.node else "cluster")
    return overview.Intents(
        maintenance=tuple(scopes),
        standby=tuple(sorted(i.node for i in found.values() if i.kind == "standby")),
        moves={i.group: i.target for _, i in sorted(found.items()) if i.kind == "move"},
    )
