"""`reconcile --dry-run`: what this node's agent would do now, executing nothing.

It observes exactly what the agent observes (the recorded processes, checked against the
kernel; mounts; addresses), looks at the store as `reconcile status` does to see which
peers are alive (cluster/survey.py), and calls the same pure `plan`. Whose a mount or address is comes from the same rule
as the agent's (decide/ownership.py), given what the running agent's resource book lists
(resources.json; nothing when no agent ran). `--node-down NODE` shows what would happen if
those nodes died: the decentralised counterpart of Pacemaker's crm_simulate.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import attrs

from reconciler import spec as specmod
from reconciler.decide import plan as planmod
from reconciler.act import book as bookmod
from reconciler.act import process, resources
from reconciler.act.ledger import Ledger
from reconciler.model import Probe
from reconciler.decide import ownership
from reconciler.observe import EntryState, Observed
from reconciler.store import Claim, ClusterView, Member
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


def simulate(spec: specmod.Spec, node: str, down: tuple[str, ...] = ()) -> planmod.Plan:
    observed = observe(spec, node)
    view = asyncio.run(cluster_view(spec, node, down))
    observed = owned_here(spec, observed, view, bookmod.listed(Path(spec.state_dir) / node / "resources.json"))
    now = time.monotonic()
    observed = with_health(spec, observed, view, Ledger(path=Path(spec.state_dir) / node / "health.json", readonly=True), now)
    return after_claims(spec, observed, view, now, planmod.plan(spec, observed, view, now))


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


def after_claims(spec: specmod.Spec, observed: Observed, view: ClusterView, now: float, first: planmod.Plan) -> planmod.Plan:
    """Append what this node would do once its claims and takeovers are won.

    Winning a claim is one round and starting the entries the next, milliseconds later;
    showing only the claim would hide every mount, address and process it leads to.
    """
    won = {a.group: a for a in first.actions if a.kind in ("claim", "takeover")}
    if not won:
        return first
    claims = dict(view.claims)
    for g, a in won.items():
        claims[g] = Claim(group=g, node=view.node, generation=a.claim.generation + 1 if a.claim else 1)
    second = planmod.plan(spec, observed, attrs.evolve(view, claims=claims, stale_claims=frozenset()), now)
    then = tuple(
        attrs.evolve(a, reason=f"once {a.group} is claimed: {a.reason}")
        for a in second.actions
        if a.group in won and a.kind not in ("claim", "takeover", "release")
    )
    return attrs.evolve(first, actions=first.actions + then)


def plan_doc(plan: planmod.Plan, node: str) -> dict:
    """The plan as `reconcile --dry-run` shows it: its text and its --json are both made from this."""
    return {
        "node": node,
        "converged": plan.empty,
        "actions": [
            {"kind": a.kind, "group": a.group, "tag": a.tag, "reason": a.reason, "urgent": a.urgent, "describe": a.describe()}
            for a in plan.actions
        ],
        "notes": dict(plan.notes),
    }
