"""What the operator's intents (published.Intent, in ClusterView.intents) mean for one group or
node: maintenance scopes, standby nodes, moves and where they may go, and what `--wait`
still waits for.

Pure: no I/O, no clock (`now`, monotonic, and `wall`, the caller's wall clock, are arguments).
The planner (decide/plan.py) asks `frozen` before anything else about a group and `mover`
as its owner; the CLI asks `move_target` before it records a move and `pending` while it
waits. The safety argument (hand-over, the end of maintenance) is in docs/design.md,
"Operator intents".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import attrs

from reconciler import spec as specmod
from reconciler.decide import placement
from reconciler.model import Claim, ClusterView, Heartbeat, Observed
from reconciler.published import Intent


def maintenance(view: ClusterView) -> tuple[str, ...]:
    """The keys of the maintenance intents in the view, sorted (what a node publishes as the
    maintenance it has seen: NodeStatus.maintenance)."""
    return tuple(sorted(k for k, i in view.intents.items() if i.kind == "maintenance"))


def covers(key: str, group: str, owner: str | None) -> bool:
    """Does the maintenance intent at `key` hold `group`, owned by `owner` (None: unclaimed)?"""
    if key == "maintenance":
        return True
    if key == f"maintenance/group/{group}":
        return True
    return owner is not None and key == f"maintenance/node/{owner}"


def frozen(view: ClusterView, group: str, claim: Claim | None) -> str:
    """Why this node must change nothing about `group` ("": it may act). In maintenance: the
    whole cluster, the group, the node that owns it, or this node itself (a node in
    maintenance claims, starts and stops nothing at all)."""
    owner = claim.node if claim is not None else None
    for key in maintenance(view):
        if covers(key, group, owner) or key == f"maintenance/node/{view.node}":
            return f"in maintenance ({key}): observed only, nothing changed"
    return ""


def exempt(view: ClusterView, groups: Iterable[str]) -> frozenset[str]:
    """Of `groups`, those this node owns that are in maintenance: the keeper spares them."""
    if not view.intents:
        return frozenset()
    me = view.node
    return frozenset(g for g in groups if (c := view.claims.get(g)) is not None and c.node == me and frozen(view, g, c))


def unacknowledged(view: ClusterView, group: str, claim: Claim) -> str:
    """Why a peer must not take `group` over from its owner yet ("": it may): the owner's last
    published status still shows a maintenance that held the group, which the view no longer
    has. An owner that has not seen the end of maintenance does not enforce its lease on the
    group (its processes outlive it): only fencing makes a takeover safe then."""
    member = view.members.get(claim.node)
    hb = member.heartbeat if member is not None else None
    if hb is None or not hb.status.maintenance:
        return ""
    now_held = set(maintenance(view))
    for key in hb.status.maintenance:
        if covers(key, group, claim.node) and key not in now_held:
            return f"owner {claim.node} has not acknowledged the end of maintenance ({key})"
    return ""


def standby(view: ClusterView) -> frozenset[str]:
    """The nodes in standby: they claim nothing and rank for nothing (placement.Roster)."""
    return frozenset(i.node for i in view.intents.values() if i.kind == "standby")


def move_of(view: ClusterView, group: str) -> Intent | None:
    intent = view.intents.get(f"move/{group}")
    return intent if intent is not None and intent.kind == "move" else None


def refusal(g: specmod.Group, view: ClusterView, node: str, now: float, *, dead_after: float) -> str:
    """Why `node` cannot take `g` now ("": it can): not allowed, in standby, not alive, its
    tests failed there or it gave the group up (its published status)."""
    if not placement.allowed(g, node):
        return f"{node} is not in the group's nodes ({', '.join(g.nodes)})"
    if node in standby(view):
        return f"{node} is in standby"
    if node != view.node and not view.alive(node, now, dead_after):
        return f"{node} is not alive" if node in view.members else f"{node} is not a member of the cluster"
    member = view.members.get(node)
    hb = member.heartbeat if member is not None else None
    info = hb.status.groups.get(g.name) if hb is not None else None
    if info is not None and info.banned:
        return f"{node} gave {g.name} up (banned after its failures there)"
    if info is not None and info.eligible is False:
        return f"{g.name}'s tests failed on {node}"
    return ""


def _failback_refusal(g: specmod.Group, view: ClusterView, node: str, best: list[str]) -> str:
    if g.failback and best and best[0] != node and placement.rank_key(g, best[0]) < placement.rank_key(g, node):
        return (f"failback = true: {best[0]} is preferred and would take {g.name} back at once "
                "(set failback = false for it first)")
    return ""


def move_target(spec: specmod.Spec, view: ClusterView, group: str, node: str | None, now: float) -> tuple[str, str]:
    """(target, "") where `group` may move now, or ("", why not). Without `node`: the best
    eligible node by placement order other than the owner. `view` is a look from outside the
    agents (view.node is not a member)."""
    g = spec.groups.get(group)
    if g is None:
        return "", f"no group {group} in the spec"
    if g.runlevel == specmod.STOP:
        return "", f"{group}'s desired runlevel is stop: nothing to move"
    claim = view.claims.get(group)
    if claim is None:
        return "", f"{group} is not claimed by any node: nothing to move"
    why = frozen(view, group, claim)
    if why:
        return "", f"{group} is {why.split(':')[0]}"
    dead_after = spec.cluster.timing.dead_after
    roster = placement.Roster(view, now, dead_after)
    best = [n for n in roster.candidates(g, Observed(node=view.node)) if n != view.node]
    if node is not None:
        if node == claim.node:
            return "", f"{group} already runs on {node}"
        why = refusal(g, view, node, now, dead_after=dead_after) or _failback_refusal(g, view, node, best)
        return ("", why) if why else (node, "")
    for n in best:
        if n != claim.node and not refusal(g, view, n, now, dead_after=dead_after) and not _failback_refusal(g, view, n, best):
            return n, ""
    return "", f"no other node is eligible for {group}"


@attrs.frozen
class Move:
    """What the owner of a group does about a move of it (mover)."""

    target: str = ""  # hand it to this node once it stopped here ("": do not move)
    intent: Intent | None = None  # the move intent concerned (None: standby's own move)
    ended: str = ""  # the intent is over: remove it, with this result ("refused: ...")


def mover(g: specmod.Group, view: ClusterView, now: float, *, dead_after: float, wall: float,
          roster: placement.Roster, obs: Observed, standby_turn: bool) -> Move:
    """The owner's (view.node's) move of `g`: a move intent to another node, or (`standby_turn`:
    this node is in standby and `g` is the one group it hands over now) the best eligible node."""
    intent = move_of(view, g.name)
    if intent is not None and intent.target != view.node:
        if intent.expires is not None and wall >= intent.expires:
            return Move(intent=intent, ended=f"timed out: {g.name} stays on {view.node}")
        why = refusal(g, view, intent.target, now, dead_after=dead_after)
        if why:
            return Move(intent=intent, ended=f"refused: {why}; {g.name} stays on {view.node}")
        return Move(target=intent.target, intent=intent)
    if standby_turn:
        away = standby(view)
        for n in roster.candidates(g, obs, exclude=view.node):
            if n not in away and not refusal(g, view, n, now, dead_after=dead_after):
                return Move(target=n)
    return Move()


def standby_turn(spec: specmod.Spec, view: ClusterView, *, movable: Callable[[specmod.Group], bool]) -> str:
    """The one group a node in standby hands over now ("" none): the first it owns in spec
    order that another node may take (`movable`); the next one only after that one has gone
    (one planned move at a time). One that no other node may take stays, and holds up none."""
    if view.node not in standby(view):
        return ""
    for name, g in spec.groups.items():
        claim = view.claims.get(name)
        if claim is not None and claim.node == view.node and g.runlevel != specmod.STOP and movable(g):
            return name
    return ""


# --- `--wait`: what is still pending, from what every node published -------------------------


@attrs.frozen
class Pending:
    waiting: tuple[str, ...] = ()  # one line each: what is not there yet
    failed: str = ""  # it will not happen (a move refused or timed out): why

    @property
    def done(self) -> bool:
        return not self.waiting and not self.failed


_RUNNING_WORDS = ("degraded",)  # an owner's GroupStatus.actual that counts as converged besides the runlevel


def _converged(spec: specmod.Spec, members: Mapping[str, Heartbeat], claims: Mapping[str, Claim], alive: Iterable[str],
               groups: Iterable[str] | None = None) -> list[str]:
    live = set(alive)
    out = []
    for name in (spec.groups if groups is None else groups):
        g = spec.groups.get(name)
        if g is None:
            continue
        if g.runlevel == specmod.STOP:
            running = sorted(n for n in live if n in members and members[n].status.groups.get(name) is not None
                             and members[n].status.groups[name].active)
            if running:
                out.append(f"{name}: still running on {', '.join(running)}")
            continue
        claim = claims.get(name)
        if claim is None:
            out.append(f"{name}: not claimed yet")
            continue
        hb = members.get(claim.node)
        info = hb.status.groups.get(name) if hb is not None else None
        if info is None or info.desired != g.runlevel or (info.actual != g.runlevel and info.actual not in _RUNNING_WORDS):
            out.append(f"{name}: {info.actual if info is not None else 'no status'} on {claim.node}, not {g.runlevel}")
    return out


def pending(spec: specmod.Spec, members: Mapping[str, Heartbeat], claims: Mapping[str, Claim],
            intents: Mapping[str, Intent], *, alive: Iterable[str], what: str, subject: str = "",
            revision: int = 0, target: str = "", intent_id: str = "") -> Pending:
    """What `--wait` still waits for, from the nodes' published statuses (`members`, the
    `alive` ones among them), the claims and the intents as last read. `what`:

    - "revision": every live node runs `revision` or later, and every group converged to it;
    - "move": `subject` (a group) runs on `target`; failed once the intent `intent_id` is
      gone while it does not (the owner refused it or it timed out);
    - "standby": the node `subject` owns nothing;
    - "maintenance-off": no live node still shows maintenance (each acknowledged its end),
      and every group converged.
    """
    live = sorted(set(alive) & set(members))
    if what == "revision":
        behind = [f"{n} runs revision {members[n].status.spec_revision}, not {revision}"
                  for n in live if members[n].status.spec_revision < revision]
        return Pending(waiting=tuple(behind + _converged(spec, members, claims, live)))
    if what == "move":
        claim = claims.get(subject)
        there = claim is not None and claim.node == target
        waiting = _converged(spec, members, claims, live, [subject]) if there else [
            f"{subject}: on {claim.node if claim else 'no node'}, moving to {target}"]
        intent = intents.get(f"move/{subject}")
        if waiting and not there and (intent is None or intent.id != intent_id):
            return Pending(failed=f"the move of {subject} to {target} ended without it: refused or timed out (see the "
                                  f"owner's log)")
        return Pending(waiting=tuple(waiting))
    if what == "standby":
        owned = sorted(g for g, c in claims.items() if c.node == subject)
        return Pending(waiting=(f"{subject} still owns {', '.join(owned)}",) if owned else ())
    if what == "maintenance-off":
        held = {k for k, i in intents.items() if i.kind == "maintenance"}
        left = [f"{n} has not acknowledged the end of maintenance" for n in live
                if set(members[n].status.maintenance) - held]
        return Pending(waiting=tuple(left + _converged(spec, members, claims, live)))
    raise ValueError(f"nothing to wait for: {what!r}")
