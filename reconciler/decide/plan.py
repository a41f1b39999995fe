"""plan(spec, observed, view, now) -> Plan: what this node must do, and why.

Pure: no I/O, no clock (`now` is an argument, monotonic seconds), no logging. The same
inputs always give the same Plan, which is what makes `--dry-run` honest and lets the
property tests explore it. Each group's actions are executed in order by one task; groups
are independent of each other. The memos kept between calls (entries._SHAPES, placement's
rankings and peer summaries) hold only values that are functions of their keys: they
make calls cheaper and change no Plan (tests/test_placement_memo.py). How a group's
entries reach a runlevel is decide/entries.py; who may run it, decide/placement.py; the
values it returns, decide/intent.py. Its branches, row by row: tests/test_plan_table.py.
"""

from __future__ import annotations

import attrs

from reconciler.decide import entries
from reconciler.decide import health
from reconciler.decide import intents
from reconciler.decide import placement
from reconciler import spec as specmod
# Re-exported (explicitly, the `as` form): plan.Action and plan.Plan are the planner's interface.
from reconciler.decide.intent import Action as Action
from reconciler.decide.intent import Plan as Plan
from reconciler.decide.intent import Part as _Part, earliest as _earliest, noted as _noted
from reconciler.model import Claim, ClusterView, EntryState, Failure, Observed

_test_tags = placement.leading_tags  # the tags of the group's leading tests (memoised)

@attrs.frozen
class _Indexed(Observed):
    """Observed with its entry states grouped by group, built once per plan() call: looking a
    group's states up must not cost a scan of every entry of every group."""

    by_group: dict[str, list[EntryState]] = attrs.field(factory=dict, eq=False, repr=False)


def _index(observed: Observed) -> _Indexed:
    if isinstance(observed, _Indexed):
        return observed
    by_group: dict[str, list[EntryState]] = {}
    for (gname, _), st in observed.entries.items():
        states = by_group.get(gname)
        if states is None:
            by_group[gname] = [st]
        else:
            states.append(st)
    fields = {f.name: getattr(observed, f.name) for f in attrs.fields(type(observed)) if f.init}
    return _Indexed(**fields, by_group=by_group)


def plan(spec: specmod.Spec, observed: Observed, view: ClusterView, now: float) -> Plan:
    actions: list[Action] = []
    notes: dict[str, str] = {}
    wake: float | None = None
    observed = _index(observed)
    names = list(spec.groups) + sorted(set(observed.by_group) - set(spec.groups))
    t = spec.cluster.timing
    roster = placement.Roster(view, now, t.dead_after)  # placement's per-view work, done once
    turn = ""
    if view.intents and view.node in intents.standby(view):
        turn = intents.standby_turn(spec, view, movable=lambda g: bool(intents.mover(
            g, view, now, dead_after=t.dead_after, wall=view.wall, roster=roster, obs=observed, standby_turn=True).target))
    for name in names:
        g = spec.groups.get(name)
        # In maintenance (an operator's intent) nothing about the group changes: no action at
        # all, not even a self-demotion (decide/intents.py; docs/design.md, "Maintenance").
        frozen = intents.frozen(view, name, view.claims.get(name)) if view.intents else ""
        if frozen:
            part = _Part(note=frozen)
        elif g is None:
            part = _removed(name, observed, view, now, t)
        else:
            part = _group(g, t, observed, view, now, roster, turn=turn)
        if name in observed.busy and not any(a.urgent for a in part.actions):
            continue  # its previous actions are still running; it is planned again after
        actions.extend(part.actions)
        wake = _earliest(wake, part.wake_at)
        if part.note:
            notes[name] = part.note
    return Plan(actions=tuple(actions), wake_at=wake, notes=notes)


# --- placement: which role this node has for a group ---------------------------------


def _group(
    g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float, roster: placement.Roster,
    *, turn: str = "",
) -> _Part:
    me = view.node
    claim = view.claims.get(g.name)
    can_run = view.quorum and view.may_run and now < view.lease_until - t.demote_margin
    if claim is not None and claim.node == me:
        return _owner(g, t, obs, view, now, claim, can_run, roster, turn=turn)
    away = bool(view.intents) and me in intents.standby(view)
    if claim is None and g.name in view.stale_claims:
        view = attrs.evolve(view, stale_claims=view.stale_claims - {g.name})
    mine_active = entries.is_active(g.name, obs, keep=_test_tags(g))
    if mine_active:
        # Running here without owning the claim (it was broken while this node was paused,
        # or never won): stop at once, before anything else.
        # Another node's claim makes this urgent (it may be starting the group right now).
        if claim is not None:
            why = f"claimed by {claim.node} (generation {claim.generation}): must not run here"
            return entries.stop_all(g.name, obs, why, urgent=True, deadline=now, keep=_test_tags(g), order=entries.entry_tags(g))
        # No claim at all (an etcd lease that did not survive an agent restart, a store that
        # was reset): peers do not claim a group a live node reports running, so claim it
        # back rather than bounce the service; if another node wins, the branch above stops it.
        blocked = obs.blocked.get(g.name)
        if (
            g.runlevel != specmod.STOP
            and placement.allowed(g, me)
            and placement.local_eligibility(g, obs) is not False
            and not placement.banned(g, obs, now)
            and can_run
            and view.store_ok
            and view.may_claim
            and not (blocked and now < blocked[0])
            and not away
        ):
            return _Part((Action("claim", g.name, reason="runs here without a claim: claim it back"),))
        return entries.stop_all(g.name, obs, "runs here without a claim", keep=_test_tags(g), order=entries.entry_tags(g))
    if g.runlevel == specmod.STOP:
        return _cleanup(g, obs, "desired runlevel is stop")
    standby = _standby(g, t, obs, view, now)
    if not placement.allowed(g, me):
        return _noted(standby, f"not allowed here (nodes = {', '.join(g.nodes)})")
    if away:  # (its tests still run: it reports its fitness for when it comes back)
        return _noted(standby, "this node is in standby: it claims and takes over nothing")
    if placement.banned(g, obs, now):  # it claims, takes over and ranks for nothing until the ban ends
        return _Part(standby.actions, _earliest(standby.wake_at, obs.bans[g.name]), health.ban_note(g))
    blocked = obs.blocked.get(g.name)
    if blocked and now < blocked[0]:
        return _Part(standby.actions, _earliest(standby.wake_at, blocked[0]), f"retry at +{blocked[0] - now:.1f}s: {blocked[1]}")
    if not view.store_ok:
        # (a view whose membership cannot be read is not store_ok either: nothing is taken over)
        why = f"membership cannot be read: {view.membership_error}" if view.membership_error else f"store unreachable: {view.store_error}"
        return _noted(standby, why)
    if not can_run:
        why = view.twin if not view.may_run else "no quorum" if not view.quorum else "this node's lease is not valid"
        return _noted(standby, why)
    if not view.may_claim:  # node identity (reconciler/decide/identity.py): a twin, or still watching
        return _noted(standby, view.twin or "watching this node's record before claiming anything")
    if claim is None:
        return _maybe_claim(g, t, obs, view, now, standby, roster)
    return _maybe_takeover(g, t, obs, view, now, claim, standby, roster)


def _owner(
    g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float, claim: Claim, can_run: bool,
    roster: placement.Roster, *, turn: str = "",
) -> _Part:
    if not can_run:
        why = view.twin if not view.may_run else "no quorum" if not view.quorum else "lease not renewed in time"
        if entries.is_active(g.name, obs):
            return entries.stop_all(g.name, obs, f"self-demotion: {why}", urgent=True, deadline=view.lease_until, order=entries.entry_tags(g))
        if view.store_ok and view.may_release:  # (claims under this name may be a namesake's: identity.py)
            # Give the group back so that a node that can run it need not wait for our
            # heartbeat to stall (with hpc membership it never would).
            return _Part((Action("release", g.name, reason=f"demoted ({why}); nothing runs", claim=claim),))
        if not view.may_release:
            return _Part(note=f"demoted ({why}); claim generation {claim.generation} under this node's name left alone:"
                              " another agent under this name may hold it")
        return _Part(note=f"demoted ({why}); claim generation {claim.generation} kept until the store answers")
    if g.name in view.stale_claims:
        if entries.is_active(g.name, obs):
            return entries.stop_all(g.name, obs, "claim outlived a lapse of this node's lease", urgent=True, deadline=now, order=entries.entry_tags(g))
        return _Part((Action("release", g.name, reason=f"lease lapsed since generation {claim.generation} was won (or another agent under this name won it): re-arbitrate", claim=claim),))
    done: tuple[Action, ...] = ()  # the removal of a move intent that is over
    waiting = ""  # in standby: why this group is not being handed over yet
    if view.intents:
        move = intents.mover(g, view, now, dead_after=t.dead_after, wall=view.wall, roster=roster, obs=obs,
                             standby_turn=turn == g.name)
        if move.target and g.runlevel != specmod.STOP:
            why = f"moving to {move.target}" + ("" if move.intent is not None else " (this node is in standby)")
            if entries.is_active(g.name, obs):  # stopped here first, as a stop: only then handed over
                return entries.stop_all(g.name, obs, why, order=entries.entry_tags(g))
            return _Part((Action("handover", g.name, reason=f"{why}: stopped here", claim=claim, target=move.target,
                                 intent=move.intent),))
        if move.ended and move.intent is not None:
            done = (Action("forget", g.name, reason=move.ended, intent=move.intent),)
        if view.node in intents.standby(view):
            movable = turn and intents.mover(g, view, now, dead_after=t.dead_after, wall=view.wall, roster=roster, obs=obs,
                                             standby_turn=True).target
            waiting = (f"this node is in standby: handed over after {turn}" if movable else
                       "this node is in standby, but no other node may take it: it stays")
    reason = ""
    if g.runlevel == specmod.STOP:
        reason = "desired runlevel is stop"
    elif not placement.allowed(g, view.node):
        reason = f"this node is no longer allowed (nodes = {', '.join(g.nodes)})"
    elif placement.banned(g, obs, now):
        reason = health.give_up_reason(g, obs.failures.get(g.name, ()))
    elif placement.local_eligibility(g, obs) is False:
        reason = "a test failed here"
    elif g.failback:
        best = roster.candidates(g, obs)
        if best and best[0] != view.node and placement.rank_key(g, best[0]) < placement.rank_key(g, view.node):
            reason = f"failback to preferred node {best[0]}"
    if reason:
        if entries.is_active(g.name, obs):
            return entries.stop_all(g.name, obs, reason, order=entries.entry_tags(g))
        return _Part((Action("release", g.name, reason=f"{reason}; nothing runs", claim=claim),))
    # The owner re-runs its leading tests every retest too: a node that became unfit gives up.
    part = entries.plan_entries(g, g.runlevel, obs, now, t, retest=_test_tags(g))
    restart = next((a for a in part.actions if a.kind == "restart"), None) if part.actions else None
    if restart is not None and g.max_failures is not None:
        # This restart's failure would ban the node: give the group up instead of starting it again.
        failures = (*obs.failures.get(g.name, ()), Failure(at=now, tag=restart.tag, cause="unhealthy", message=restart.failure))
        until = health.ban_until(g, failures)
        if until is not None and until > now:
            stops = entries.stop_all(g.name, obs, health.give_up_reason(g, failures), order=entries.entry_tags(g))
            return _Part(tuple(attrs.evolve(a, failure=restart.failure if a.tag == restart.tag else "") for a in stops.actions))
    arrived = intents.move_of(view, g.name) if view.intents else None
    if arrived is not None and arrived.target == view.node and not part.actions and entries.is_active(g.name, obs):
        done = (Action("forget", g.name, reason=f"move done: {g.name} runs on {view.node}", intent=arrived),)
    return _Part(part.actions + done, _earliest(part.wake_at, view.lease_until - t.demote_margin), waiting or part.note)


def _maybe_claim(
    g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float, standby: _Part, roster: placement.Roster
) -> _Part:
    busy = roster.running_elsewhere(g)
    if busy:
        return _noted(standby, f"unclaimed, but still running on {', '.join(busy)}: waiting for it to stop or claim")
    ranked, rank = roster.ranked(g, obs, unseen_rank=True)
    fit = placement.local_eligibility(g, obs)
    if rank < 0 or not fit:
        why = "tests have not passed here yet" if fit is None else "a test failed here"
        return _noted(standby, f"unclaimed; {why}")
    bound = view.promised_until + t.dead_after  # the failsafe (decide/failsafe.honour)
    if now < bound:
        return _Part(standby.actions, _earliest(standby.wake_at, bound),
                     f"unclaimed, but this node promised a peer not to break its claims until +{bound - now:.2f}s"
                     " (one that vanished with the store's outage may still run there)")
    waited = now - view.unclaimed_since.get(g.name, now)
    if placement.my_turn(rank, waited, t.dead_after):
        return _Part((Action("claim", g.name, reason=f"unclaimed and this node is candidate {rank + 1} of {len(ranked)}"),))
    due = view.unclaimed_since.get(g.name, now) + rank * t.dead_after
    return _Part(standby.actions, _earliest(standby.wake_at, due), f"unclaimed; {ranked[0]} should claim it")


def _maybe_takeover(
    g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float, claim: Claim, standby: _Part,
    roster: placement.Roster,
) -> _Part:
    owner = claim.node
    if view.alive(owner, now, t.dead_after):
        # Wake exactly when the owner would count as dead, not at the next store read.
        m = view.members.get(owner)
        due = m.last_change + t.dead_after if m is not None and m.up else None
        return _Part(standby.actions, _earliest(standby.wake_at, due), f"runs on {owner} (generation {claim.generation})")
    held = intents.unacknowledged(view, g.name, claim)
    if held and not g.fence:  # (with a fence hook the owner is fenced first, whatever it runs)
        return _noted(standby, f"{held}: not taken over without a fence hook")
    stalled = view.stalled_for(owner, now)
    ranked, rank = roster.ranked(g, obs, exclude=owner)
    if rank < 0 or not placement.local_eligibility(g, obs):
        return _noted(standby, f"owner {owner} is dead; this node is not eligible")
    member = view.members.get(owner)
    down = member is not None and not member.up
    quiet = f"silent for {stalled:.2f}s" if member is not None else "gone from the store (its heartbeat expired)"
    if g.fence:
        argv = tuple(a.replace("{node}", owner) for a in g.fence)
        if rank == 0 or placement.my_turn(rank, stalled - t.dead_after, t.dead_after):
            why = f"owner {owner} is {'down' if down else quiet}: fence it, then take over"
            return _Part((Action("takeover", g.name, reason=why, claim=claim, fence=argv),))
    else:
        # Without fencing, only the timing budget guarantees the owner has stopped.
        if stalled >= t.dead_after and placement.my_turn(rank, stalled - t.dead_after, t.dead_after):
            why = f"owner {owner} {quiet} (dead_after {t.dead_after:g}s): its lease has run out"
            return _Part((Action("takeover", g.name, reason=why, claim=claim),))
    member_seen = view.members.get(owner)
    due = (member_seen.last_change if member_seen else now) + t.dead_after * (rank + 1)
    return _Part(standby.actions, _earliest(standby.wake_at, due), f"owner {owner} is dead; takeover pending")


def _removed(name: str, obs: Observed, view: ClusterView, now: float, t: specmod.Timing) -> _Part:
    reason = "group removed from the spec"
    if entries.is_active(name, obs):
        if not (view.quorum and now < view.lease_until - t.demote_margin):
            return entries.stop_all(name, obs, f"{reason}; self-demotion", urgent=True, deadline=view.lease_until)
        return entries.stop_all(name, obs, reason)
    acts = [Action("reset", name, st.tag, reason=reason) for st in entries.group_states(name, obs) if st.state != "stopped"]
    claim = view.claims.get(name)
    if claim is not None and claim.node == view.node and view.may_release:
        acts.append(Action("release", name, reason=reason, claim=claim))
    return _Part(tuple(acts))


def _cleanup(g: specmod.Group, obs: Observed, reason: str) -> _Part:
    acts = [Action("reset", g.name, st.tag, reason=reason) for st in entries.group_states(g.name, obs) if st.state not in ("stopped",)]
    return _Part(tuple(acts))


def _standby(g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float) -> _Part:
    """A node that does not own the group keeps its fitness tests current."""
    if not placement.allowed(g, view.node):
        return _Part()
    return entries.plan_entries(g, g.runlevel, obs, now, t, only=_test_tags(g), retest=True)
