"""`reconcile --dry-run`: what the cluster would do from now on, executing nothing.

It observes exactly what the agent observes (the recorded processes, checked against the
kernel; mounts; addresses), looks at the store as `reconcile status` does to see which
peers are alive and what they run (cluster/survey.py), and hands that to the pure simulator
(decide/simulate.py), which calls the same `plan` for every node until nothing is left to do,
each action taken as succeeding. Whose a mount or address is comes from the same rule as the
agent's (decide/ownership.py), given what the running agent's resource book lists
(resources.json; nothing when no agent ran). `--node-down NODE` shows what would happen if
those nodes died: the decentralised counterpart of Pacemaker's crm_simulate -S.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import attrs

from reconciler import spec as specmod
from reconciler.act import book as bookmod
from reconciler.act import process, resources
from reconciler.act.ledger import Ledger
from reconciler.model import Probe
from reconciler.decide import ownership
from reconciler.decide import simulate as simulation
from reconciler.observe import EntryState, Observed
from reconciler.store import ClusterView, Member
from reconciler.cluster import hpc as hpcmod
from reconciler.cluster import liveness, survey


def observe(spec: specmod.Spec, node: str) -> Observed:
    sup = process.Supervisor(node=node, state_dir=spec.state_dir, on_change=lambda: None, create=False)
    sup.adopt()
    entries = sup.snapshot()
    res = [e for g in spec.groups.values() for e in g.entries if e.kind != "process"]
    if res:
        try:
            kernel = resources.observe(res)
        except Exception as exc:  # show the plan anyway; the state says why
            kernel = {e.tag: ("error", f"cannot observe: {exc}") for e in res}
        for g in spec.groups.values():
            for e in g.entries:
                if e.kind != "process":
                    state, msg = kernel.get(e.tag, ("stopped", ""))
                    entries[(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, kind=e.kind, state=state, message=msg)
    return Observed(node=node, entries=entries)


async def cluster_view(spec: specmod.Spec, node: str, down: tuple[str, ...]) -> ClusterView:
    t = spec.cluster.timing
    look = await survey.look_at(spec)
    now = look.ended
    hpc = None
    if spec.cluster.membership.startswith("hpc:"):
        hpc = hpcmod.read(spec.path(spec.cluster.membership[4:]))
    view = liveness.Liveness(node).update(look.snapshot, now, groups=list(spec.groups), lease_until=now + t.lease, hpc=hpc)
    members = dict(view.members)
    for n, silent in look.silent.items():
        if n in members:
            # Silent throughout the look: for at least that long (survey.py).
            members[n] = attrs.evolve(members[n], last_change=now - silent)
    if node in look.advanced:
        view = attrs.evolve(view, lease_until=float("inf"))  # an agent runs here and renews
    for n in down:
        # "Just died": silent for exactly dead_after. (Longer would also let the fallback
        # candidates act, which only happens when the best one does not.)
        m = members.get(n) or Member(name=n, last_change=now)
        members[n] = attrs.evolve(m, last_change=now - t.dead_after, up=False)
    # Unclaimed groups: show what the best candidate would do (others wait for it).
    return attrs.evolve(view, members=members, unclaimed_since={g: now for g in view.unclaimed_since},
                        intents=look.snapshot.intents, wall=time.time())


def with_health(spec: specmod.Spec, observed: Observed, view: ClusterView, ledger: Ledger, now: float) -> Observed:
    """What the agent's observer adds for health (issue 16): the failures and bans in the
    node's ledger, and its probes as the node last published them (the running agent holds
    them in memory), for the processes that still run."""
    probes = {}
    hb = view.members[view.node].heartbeat if view.node in view.members else None
    if hb is not None:
        for gname, gs in hb.status.groups.items():
            for tag, es in gs.entries.items():
                st = observed.entries.get((gname, tag))
                if es.health and st is not None and st.pid is not None and st.pid == es.pid:
                    probes[(gname, tag)] = Probe(pid=st.pid, failures=es.probe_failures, result="ok" if es.health == "ok" else "fail",
                                                 message=es.probe_message)
    return attrs.evolve(observed, probes=probes, failures=dict(ledger.failures), bans=ledger.bans(spec, now))


def owned_here(spec: specmod.Spec, observed: Observed, view: ClusterView, held: dict[tuple[str, str], ownership.Held]) -> Observed:
    """What the agent's observer shows for the mounts and addresses (decide/ownership.py):
    those of groups this node does not run are not its to remove (shown as stopped, with
    the kernel's message) unless its book (`held`) lists them."""
    entries = dict(observed.entries)
    claimed = {g for g, c in view.claims.items() if c.node == view.node}
    for (group, tag), st in observed.entries.items():
        e = spec.entry(group, tag)
        if e is None or e.kind == "process":
            continue
        decision = ownership.decide(group, e, spec.groups.get(group), kernel=(st.state, st.message),
                                    claimed=group in claimed, held=held.get((group, tag), ownership.NOTHING_HELD))
        entries[(group, tag)] = decision.state
    return attrs.evolve(observed, entries=entries)


# --- the whole transition (decide/simulate.py) ------------------------------------------------


async def start_state(spec: specmod.Spec, node: str, down: tuple[str, ...] = (), *,
                      member_only: bool = False) -> tuple[simulation.ClusterState, float]:
    """(the cluster as it stands, now): this node as the agent would observe it, every live
    peer as its published status says (what runs there, its tests, its bans), the claims;
    the nodes in `down` and those already dead run nothing (their keepers stopped it).
    `member_only`: this node takes part only if an agent runs here (`apply --dry-run` from
    a machine that may be no member); else it is taken as about to run one."""
    # (in a thread: observing addresses uses pyroute2, which runs an event loop of its own)
    observed = await asyncio.to_thread(observe, spec, node)
    view = await cluster_view(spec, node, down)
    observed = owned_here(spec, observed, view, bookmod.listed(Path(spec.state_dir) / node / "resources.json"))
    now = time.monotonic()
    observed = with_health(spec, observed, view, Ledger(path=Path(spec.state_dir) / node / "health.json", readonly=True), now)
    t = spec.cluster.timing
    here = view.lease_until == float("inf")  # cluster_view: an agent runs here and renews
    nodes = {} if node in down or (member_only and not here) else {node: observed}
    for n, m in view.members.items():
        if n == node or n in down or not view.alive(n, now, t.dead_after) or m.heartbeat is None:
            continue
        nodes[n] = peer_observed(spec, n, m.heartbeat.status)
    return simulation.ClusterState(observed=nodes, claims=dict(view.claims), down=frozenset(down),
                                   unclaimed_since=dict(view.unclaimed_since), intents=dict(view.intents),
                                   wall=time.time()), now


def peer_observed(spec: specmod.Spec, node: str, status) -> Observed:
    """A peer's entries and bans as its published status tells them."""
    entries = {}
    bans = {}
    for gname, gs in status.groups.items():
        for tag, es in gs.entries.items():
            e = spec.entry(gname, tag)
            if es.state != "stopped":
                entries[(gname, tag)] = EntryState(group=gname, tag=tag, kind=e.kind if e is not None else "process",
                                                   state=es.state, pid=es.pid)
        if gs.banned:
            bans[gname] = float("inf")
    return Observed(node=node, entries=entries, bans=bans)


def transition(spec: specmod.Spec, node: str, down: tuple[str, ...] = ()) -> simulation.Transition:
    """The whole transition from the cluster as it stands to `spec`, every node's plan
    simulated to convergence (`reconcile --dry-run`)."""
    cluster, now = asyncio.run(start_state(spec, node, down))
    return simulation.simulate(spec, cluster, now)


async def edit_transition(new: specmod.Spec, old: specmod.Spec | None, node: str) -> list[str]:
    """What `reconcile apply --dry-run` adds: the transition the cluster would make from how
    it runs `old` (the store's revision; None: none yet) to `new`, as text."""
    cluster, now = await start_state(old or new, node, member_only=True)
    if not cluster.observed:
        return ["no agent runs: nothing happens until one starts"]
    return render_transition(transition_doc(simulation.simulate(new, cluster, now), node))


def transition_doc(tr: simulation.Transition, node: str) -> dict:
    """The transition as `reconcile --dry-run` shows it: its text and its --json are both made from this."""
    return {
        "node": node,
        "converged": not tr.steps,  # nothing to do now anywhere
        "steps": [
            {"node": s.node, "at": round(s.at, 3), "kind": s.action.kind, "group": s.action.group, "tag": s.action.tag,
             "reason": s.action.reason, "urgent": s.action.urgent, "describe": s.action.describe()}
            for s in tr.steps
        ],
        "notes": dict(tr.first_notes.get(node, {})),  # why this node does nothing yet about these groups
        # why each group that ends up running nowhere does: every node's last word on it
        "pending": {g: {n: notes[g] for n, notes in sorted(tr.notes.items()) if g in notes}
                    for g, nodes in tr.placement.items() if not nodes},
        "state": {g: {"runs_on": list(nodes), "owner": tr.final.claims[g].node if g in tr.final.claims else None}
                  for g, nodes in tr.placement.items()},
        "stopped": tr.stopped,
    }


def render_transition(doc: dict) -> list[str]:
    """The text of `reconcile --dry-run`: every step (with its node and simulated time), this
    node's notes, then the resulting state."""
    lines = []
    if doc["converged"]:
        lines.append(f"{doc['node']}: converged, nothing to do")
    for s in doc["steps"]:
        lines.append(("URGENT " if s["urgent"] else "") + f"{s['describe']}  ({s['node']}, +{s['at']:.2f}s)")
    for g, note in doc["notes"].items():
        lines.append(f"  ({g}, now: {note})" if doc["steps"] else f"  ({g}: {note})")
    if doc["steps"]:
        lines.append("then:" if not doc["stopped"] else f"then (cut short: {doc['stopped']}):")
        for g, st in doc["state"].items():
            where = f"runs on {', '.join(st['runs_on'])}" if st["runs_on"] else "runs nowhere"
            owner = f" (claimed by {st['owner']})" if st["owner"] and st["owner"] not in st["runs_on"] else ""
            lines.append(f"  {g}: {where}{owner}")
            for n, note in doc["pending"].get(g, {}).items():
                lines.append(f"    {n}: {note}")
    return lines
