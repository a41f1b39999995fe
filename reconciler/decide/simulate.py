"""The whole transition: `plan` simulated to convergence on every node, assuming each action
succeeds (as crm_simulate -S does) -- what `reconcile --dry-run`, `--node-down` and
`reconcile apply --dry-run` show.

Pure, like plan(): the caller hands in the spec, what each node runs (`ClusterState.observed`: this
node's from its own observation, the peers' from their published statuses), the claims, the
nodes taken as dead, and `now`. Then, round by round, every live node (sorted by name) plans
with the cluster as it stands -- its view built from the others' simulated published statuses,
as a real peer would read them -- and each of its actions is applied as if it succeeded: a
start makes the entry running (a test passed, a `wait` done), a stop stops it, a claim or a
takeover is granted with the next generation, a release frees the group. When no node plans
anything now, time moves on to the earliest moment a plan said it would change by itself (a
candidate's turn, dead_after of a silent owner, a backoff), within HORIZON; a test that passed
in the simulation is not re-run (its retest is routine, not part of the transition). It stops
when no node plans anything and no wait is left (converged), or at the step limit.

One place builds a node's view from the simulated cluster (`_view`): where more cluster-wide
state (operator intents) will join the view, it joins there.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from reconciler import spec as specmod
from reconciler.decide import entries, placement
from reconciler.decide import plan as planmod
from reconciler.decide.intent import Action
from reconciler.model import Claim, ClusterView, EntryState, Heartbeat, Member, Observed
from reconciler.published import GroupStatus, Intent, NodeStatus

STEPS = 100_000  # actions at most; a transition longer than that is cut short (said in `stopped`)
HORIZON = 86400.0  # seconds: a wait longer than this is not simulated (said in `stopped`)
IDLE_WAKES = 100  # waits in a row that change nothing: the simulation stops (said in `stopped`)
_FOREVER = float("inf")
_PASSED_FOR_GOOD = _FOREVER  # a simulated test's `since`: no retest falls due


@attrs.frozen
class ClusterState:
    """The cluster as the simulation starts from (and as each step leaves it)."""

    observed: Mapping[str, Observed]  # every live node the simulation runs: what runs there
    claims: Mapping[str, Claim] = attrs.field(factory=dict)
    down: frozenset[str] = frozenset()  # nodes taken as dead (silent for dead_after at the start)
    # Groups without a claim and since when (unclaimed_since: a candidate's turn counts from it)
    unclaimed_since: Mapping[str, float] = attrs.field(factory=dict)
    # The operator's intents (move, standby, maintenance): every simulated node sees each at
    # once, and acknowledges the end of maintenance at once.
    intents: Mapping[str, Intent] = attrs.field(factory=dict)
    wall: float = 0.0  # the wall clock at the start (a move's deadline is wall time)


@attrs.frozen
class Step:
    node: str
    action: Action
    at: float  # seconds after the start of the simulation


@attrs.frozen
class Transition:
    steps: tuple[Step, ...]
    final: ClusterState
    placement: dict[str, tuple[str, ...]]  # group -> the nodes it runs on at the end (sorted)
    converged: bool  # no node plans anything at the end, and no wait is left
    ended: float = 0.0  # the simulated `now` at the end
    stopped: str = ""  # why it stopped short of convergence ("" if it converged)
    notes: dict[str, dict[str, str]] = attrs.field(factory=dict)  # node -> its plan's notes at the end
    first_notes: dict[str, dict[str, str]] = attrs.field(factory=dict)  # node -> its first plan's notes
    # (group, nodes) for every moment a group ran on two nodes at once: none, unless a bug
    overlaps: tuple[tuple[str, tuple[str, ...]], ...] = ()


def simulate(spec: specmod.Spec, start: ClusterState, now: float, *, limit: int = STEPS, horizon: float = HORIZON) -> Transition:
    t0 = now
    observed = {n: attrs.evolve(obs, entries={k: _settled(spec, st) for k, st in obs.entries.items()})
                for n, obs in start.observed.items()}
    cluster = attrs.evolve(start, observed=observed, unclaimed_since={
        **{g: now for g in spec.groups if g not in start.claims}, **start.unclaimed_since})
    steps: list[Step] = []
    overlaps: list[tuple[str, tuple[str, ...]]] = []
    stopped = ""
    first_notes: dict[str, dict[str, str]] | None = None
    idle = 0  # waits in a row after which nothing acted
    beats: dict[str, tuple[Observed, Heartbeat]] = {}  # node -> (what it runs, its heartbeat as published for that)
    while True:
        acted = False
        wake: float | None = None
        notes: dict[str, dict[str, str]] = {}
        for node in sorted(cluster.observed):
            p = planmod.plan(spec, cluster.observed[node], _view(spec, cluster, node, now, t0, beats), now)
            notes[node] = dict(p.notes)
            if p.wake_at is not None and (wake is None or p.wake_at < wake):
                wake = p.wake_at
            for a in p.actions:
                if len(steps) >= limit:
                    stopped = f"step limit {limit} reached"
                    break
                cluster = _apply(spec, cluster, node, a, now)
                steps.append(Step(node=node, action=a, at=now - t0))
                acted = True
                overlaps.extend(_overlaps(spec, cluster, a.group))
            if stopped:
                break
        if first_notes is None:
            first_notes = notes
        if stopped:
            break
        if acted:
            idle = 0
            continue
        if wake is None or wake == _FOREVER:
            break  # converged: nothing to do, no wait left
        if wake - t0 > horizon:
            stopped = f"the next change is more than {horizon:g}s away"
            break
        idle += 1
        if idle > IDLE_WAKES:
            stopped = f"{IDLE_WAKES} waits in a row changed nothing"
            break
        # (A wake-up due now that acted on nothing: a time computed as a sum lands a hair
        # before the moment it stands for. Move on by a microsecond.)
        now = wake if wake > now else now + 1e-6
    where = _placement(spec, cluster)
    return Transition(steps=tuple(steps), final=cluster, placement=where, converged=not stopped, stopped=stopped, ended=now,
                      notes=notes, first_notes=first_notes or {}, overlaps=tuple(dict.fromkeys(overlaps)))


def _settled(spec: specmod.Spec, st: EntryState) -> EntryState:
    """An entry as the simulation starts from it: what is under way is taken as done (a
    stop as stopped, a test that runs as passed, a `wait` that runs as done), and a test that
    passed stays passed (its periodic re-run is routine, not part of the transition)."""
    e = spec.entry(st.group, st.tag)
    if st.state == "stopping":
        return attrs.evolve(st, state="stopped", pid=None)
    if st.state == "running" and e is not None and e.kind == "process" and e.mode in ("test", "wait"):
        return attrs.evolve(st, state="passed" if e.mode == "test" else "done", pid=None, since=_PASSED_FOR_GOOD)
    if st.state == "passed":
        return attrs.evolve(st, since=_PASSED_FOR_GOOD)
    return st


# --- one node's view of the simulated cluster ------------------------------------------------


def published(spec: specmod.Spec, obs: Observed) -> NodeStatus:
    """What placement reads of a node's published status: per group, whether its tests passed
    here, whether it runs here, whether it is banned here (agent/status.py publishes more)."""
    groups = {}
    for name, g in spec.groups.items():
        ok = placement.local_eligibility(g, obs) if placement.allowed(g, obs.node) else False
        groups[name] = GroupStatus(eligible=ok, active=entries.is_active(name, obs, keep=placement.leading_tags(g)),
                                   banned=name in obs.bans)
    return NodeStatus(groups=groups)


def _view(spec: specmod.Spec, cluster: ClusterState, node: str, now: float, t0: float,
          beats: dict[str, tuple[Observed, Heartbeat]]) -> ClusterView:
    """`node`'s view: every other simulated node alive and
    publishing its simulated status; the nodes taken down silent since t0 - dead_after."""
    dead_after = spec.cluster.timing.dead_after
    members = {}
    for n, obs in cluster.observed.items():
        if n != node:
            # A simulated peer never dies: its heartbeat advances for ever (last_change inf:
            # alive at any `now`, and the wake-up to look at its liveness again never falls due).
            # (`beats` memoises each node's heartbeat while what it runs is the same object:
            # one per change, not one per peer per plan; placement's memo keys on it too)
            beat = beats.get(n)
            if beat is None or beat[0] is not obs:
                beat = beats[n] = (obs, Heartbeat(node=n, counter=1, status=published(spec, obs)))
            members[n] = Member(name=n, last_change=_FOREVER, heartbeat=beat[1])
    for n in cluster.down:
        # "Just died" at the start, as the dry run of one node has always shown it.
        members[n] = Member(name=n, last_change=t0 - dead_after, up=False)
    return ClusterView(node=node, members=members, claims=dict(cluster.claims), unclaimed_since=dict(cluster.unclaimed_since),
                       intents=dict(cluster.intents), wall=cluster.wall + (now - t0))


# --- applying one action as if it succeeded ---------------------------------------------------


def _apply(spec: specmod.Spec, cluster: ClusterState, node: str, a: Action, now: float) -> ClusterState:
    obs = cluster.observed[node]
    claims = dict(cluster.claims)
    unclaimed = dict(cluster.unclaimed_since)
    states = dict(obs.entries)
    key = (a.group, a.tag)
    if a.kind in ("start", "restart"):
        e = spec.entry(a.group, a.tag)
        kind = e.kind if e is not None else "process"
        state = "running"
        since = now
        if e is not None and e.kind == "process" and e.mode == "test":
            state, since = "passed", _PASSED_FOR_GOOD
        elif e is not None and e.kind == "process" and e.mode == "wait":
            state = "done"
        states[key] = EntryState(group=a.group, tag=a.tag, kind=kind, state=state, since=since, level=_level(spec, a.group))
    elif a.kind == "stop":
        old = states.get(key)
        states[key] = EntryState(group=a.group, tag=a.tag, kind=old.kind if old else "process", state="stopped", since=now,
                                 owned=False)
    elif a.kind == "reset":
        states.pop(key, None)
    elif a.kind in ("claim", "takeover"):
        before = claims.get(a.group) or a.claim
        claims[a.group] = Claim(group=a.group, node=node, generation=(before.generation if before else 0) + 1)
        unclaimed.pop(a.group, None)
    elif a.kind == "release":
        claims.pop(a.group, None)
        unclaimed[a.group] = now
    elif a.kind == "handover" and a.claim is not None:
        claims[a.group] = Claim(group=a.group, node=a.target, generation=a.claim.generation + 1)
    intents = cluster.intents
    if a.kind == "forget" and a.intent is not None:
        intents = {k: i for k, i in intents.items() if k != a.intent.key}
    probes = obs.probes
    if a.kind in ("start", "restart", "stop") and key in probes:
        probes = {k: v for k, v in probes.items() if k != key}  # a new process starts with no probe result
    observed = dict(cluster.observed)
    observed[node] = attrs.evolve(obs, entries=states, probes=probes)
    return ClusterState(observed=observed, claims=claims, down=cluster.down, unclaimed_since=unclaimed, intents=intents,
                        wall=cluster.wall)


def _level(spec: specmod.Spec, group: str) -> str:
    g = spec.groups.get(group)
    return g.runlevel if g is not None else ""


def _placement(spec: specmod.Spec, cluster: ClusterState) -> dict[str, tuple[str, ...]]:
    """group -> the nodes where something of it runs (its leading tests aside)."""
    names = set(spec.groups) | {g for obs in cluster.observed.values() for g, _ in obs.entries}
    out = {}
    for name in sorted(names):
        g = spec.groups.get(name)
        keep = placement.leading_tags(g) if g is not None else frozenset()
        out[name] = tuple(sorted(n for n, obs in cluster.observed.items() if entries.is_active(name, obs, keep=keep)))
    return out


def _overlaps(spec: specmod.Spec, cluster: ClusterState, group: str) -> list[tuple[str, tuple[str, ...]]]:
    """[(group, the nodes it runs on)] if it runs on more than one (only `group` can have
    changed by one action)."""
    g = spec.groups.get(group)
    keep = placement.leading_tags(g) if g is not None else frozenset()
    nodes = tuple(sorted(n for n, obs in cluster.observed.items() if entries.is_active(group, obs, keep=keep)))
    return [(group, nodes)] if len(nodes) > 1 else []
