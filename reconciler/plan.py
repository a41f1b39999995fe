"""plan(spec, observed, view, now) -> Plan: what this node must do, and why.

Pure: no I/O, no clock (`now` is an argument, monotonic seconds), no logging. The same
inputs always give the same Plan, which is what makes `--dry-run` honest and lets the
property tests explore it. Each group's actions are executed in order by one task; groups
are independent of each other. The memos kept between calls (_SHAPES here, placement's
rankings and peer summaries) hold only values that are functions of their keys: they
make calls cheaper and change no Plan (tests/test_placement_memo.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from reconciler import placement
from reconciler import spec as specmod
from reconciler.model import Claim, ClusterView, EntryState, Observed

KINDS = ("start", "stop", "reset", "claim", "release", "takeover")


@attrs.frozen
class Action:
    kind: str  # one of KINDS
    group: str
    tag: str = ""
    reason: str = ""
    urgent: bool = False  # self-demotion: SIGKILL no later than `deadline`
    deadline: float | None = None
    claim: Claim | None = None  # release / takeover: the claim instance to end
    fence: tuple[str, ...] = ()  # takeover: the fence hook argv, "{node}" filled in

    def describe(self) -> str:
        what = f"{self.group}/{self.tag}" if self.tag else self.group
        return f"{self.kind} {what}: {self.reason}"


@attrs.frozen
class Plan:
    actions: tuple[Action, ...] = ()
    wake_at: float | None = None  # the plan changes by itself then, with no event
    notes: dict[str, str] = attrs.field(factory=dict)  # per group: why nothing happens yet

    @property
    def empty(self) -> bool:
        return not self.actions

    def for_group(self, group: str) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.group == group)


@attrs.define
class _Part:
    """One group's contribution to the plan. Never changed once made: not frozen only
    because a frozen class's __init__ costs twice as much, once per group per call."""

    actions: tuple[Action, ...] = ()
    wake_at: float | None = None
    note: str = ""


def _noted(part: _Part, note: str) -> _Part:
    """`part` with `note` (attrs.evolve, without its cost)."""
    return _Part(part.actions, part.wake_at, note)


def _earliest(*times: float | None) -> float | None:
    """The smallest time that is not None (min()'s choice among equals), or None."""
    best = None
    for t in times:
        if t is not None and (best is None or t < best):
            best = t
    return best


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
    for name in names:
        g = spec.groups.get(name)
        part = _removed(name, observed, view, now, t) if g is None else _group(g, t, observed, view, now, roster)
        if name in observed.busy and not any(a.urgent for a in part.actions):
            continue  # its previous actions are still running; it is planned again after
        actions.extend(part.actions)
        wake = _earliest(wake, part.wake_at)
        if part.note:
            notes[name] = part.note
    return Plan(actions=tuple(actions), wake_at=wake, notes=notes)


# --- placement: which role this node has for a group ---------------------------------


def _group(
    g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float, roster: placement.Roster
) -> _Part:
    me = view.node
    claim = view.claims.get(g.name)
    can_run = view.quorum and now < view.lease_until - t.demote_margin
    if claim is not None and claim.node == me:
        return _owner(g, t, obs, view, now, claim, can_run, roster)
    if claim is None and g.name in view.stale_claims:
        view = attrs.evolve(view, stale_claims=view.stale_claims - {g.name})
    mine_active = _active(g.name, obs, keep=_test_tags(g))
    if mine_active:
        # Running here without owning the claim (it was broken while this node was paused,
        # or never won): stop at once, before anything else.
        # Another node's claim makes this urgent (it may be starting the group right now).
        if claim is not None:
            why = f"claimed by {claim.node} (generation {claim.generation}): must not run here"
            return _stop_all(g.name, obs, why, urgent=True, deadline=now, keep=_test_tags(g), order=_tags(g))
        # No claim at all (an etcd lease that did not survive an agent restart, a store that
        # was reset): peers do not claim a group a live node reports running, so claim it
        # back rather than bounce the service; if another node wins, the branch above stops it.
        blocked = obs.blocked.get(g.name)
        if (
            g.runlevel != specmod.STOP
            and placement.allowed(g, me)
            and placement.local_eligibility(g, obs) is not False
            and can_run
            and view.store_ok
            and not (blocked and now < blocked[0])
        ):
            return _Part((Action("claim", g.name, reason="runs here without a claim: claim it back"),))
        return _stop_all(g.name, obs, "runs here without a claim", keep=_test_tags(g), order=_tags(g))
    if g.runlevel == specmod.STOP:
        return _cleanup(g, obs, "desired runlevel is stop")
    standby = _standby(g, t, obs, view, now)
    if not placement.allowed(g, me):
        return _noted(standby, f"not allowed here (nodes = {', '.join(g.nodes)})")
    blocked = obs.blocked.get(g.name)
    if blocked and now < blocked[0]:
        return _Part(standby.actions, _earliest(standby.wake_at, blocked[0]), f"retry at +{blocked[0] - now:.1f}s: {blocked[1]}")
    if not view.store_ok:
        return _noted(standby, f"store unreachable: {view.store_error}")
    if not can_run:
        why = "no quorum" if not view.quorum else "this node's lease is not valid"
        return _noted(standby, why)
    if claim is None:
        return _maybe_claim(g, t, obs, view, now, standby, roster)
    return _maybe_takeover(g, t, obs, view, now, claim, standby, roster)


def _owner(
    g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float, claim: Claim, can_run: bool,
    roster: placement.Roster,
) -> _Part:
    if not can_run:
        why = "no quorum" if not view.quorum else "lease not renewed in time"
        if _active(g.name, obs):
            return _stop_all(g.name, obs, f"self-demotion: {why}", urgent=True, deadline=view.lease_until, order=_tags(g))
        if view.store_ok:
            # Give the group back so that a node that can run it need not wait for our
            # heartbeat to stall (with hpc membership it never would).
            return _Part((Action("release", g.name, reason=f"demoted ({why}); nothing runs", claim=claim),))
        return _Part(note=f"demoted ({why}); claim generation {claim.generation} kept until the store answers")
    if g.name in view.stale_claims:
        if _active(g.name, obs):
            return _stop_all(g.name, obs, "claim outlived a lapse of this node's lease", urgent=True, deadline=now, order=_tags(g))
        return _Part((Action("release", g.name, reason=f"lease lapsed since generation {claim.generation} was won: re-arbitrate", claim=claim),))
    reason = ""
    if g.runlevel == specmod.STOP:
        reason = "desired runlevel is stop"
    elif not placement.allowed(g, view.node):
        reason = f"this node is no longer allowed (nodes = {', '.join(g.nodes)})"
    elif placement.local_eligibility(g, obs) is False:
        reason = "a test failed here"
    elif g.failback:
        best = roster.candidates(g, obs)
        if best and best[0] != view.node and placement.rank_key(g, best[0]) < placement.rank_key(g, view.node):
            reason = f"failback to preferred node {best[0]}"
    if reason:
        if _active(g.name, obs):
            return _stop_all(g.name, obs, reason, order=_tags(g))
        return _Part((Action("release", g.name, reason=f"{reason}; nothing runs", claim=claim),))
    part = _entries(g, g.runlevel, obs, now, t)
    return _Part(part.actions, _earliest(part.wake_at, view.lease_until - t.demote_margin), part.note)


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
    stalled = view.stalled_for(owner, now)
    ranked, rank = roster.ranked(g, obs, exclude=owner)
    if rank < 0 or not placement.local_eligibility(g, obs):
        return _noted(standby, f"owner {owner} is dead; this node is not eligible")
    member = view.members.get(owner)
    down = member is not None and not member.up
    if g.fence:
        argv = tuple(a.replace("{node}", owner) for a in g.fence)
        if rank == 0 or placement.my_turn(rank, stalled - t.dead_after, t.dead_after):
            why = f"owner {owner} is {'down' if down else f'silent for {stalled:.2f}s'}: fence it, then take over"
            return _Part((Action("takeover", g.name, reason=why, claim=claim, fence=argv),))
    else:
        # Without fencing, only the timing budget guarantees the owner has stopped.
        if stalled >= t.dead_after and placement.my_turn(rank, stalled - t.dead_after, t.dead_after):
            why = f"owner {owner} silent for {stalled:.2f}s (dead_after {t.dead_after:g}s): its lease has run out"
            return _Part((Action("takeover", g.name, reason=why, claim=claim),))
    member_seen = view.members.get(owner)
    due = (member_seen.last_change if member_seen else now) + t.dead_after * (rank + 1)
    return _Part(standby.actions, _earliest(standby.wake_at, due), f"owner {owner} is dead; takeover pending")


def _removed(name: str, obs: Observed, view: ClusterView, now: float, t: specmod.Timing) -> _Part:
    reason = "group removed from the spec"
    if _active(name, obs):
        if not (view.quorum and now < view.lease_until - t.demote_margin):
            return _stop_all(name, obs, f"{reason}; self-demotion", urgent=True, deadline=view.lease_until)
        return _stop_all(name, obs, reason)
    acts = [Action("reset", name, st.tag, reason=reason) for st in _states(name, obs) if st.state != "stopped"]
    claim = view.claims.get(name)
    if claim is not None and claim.node == view.node:
        acts.append(Action("release", name, reason=reason, claim=claim))
    return _Part(tuple(acts))


def _cleanup(g: specmod.Group, obs: Observed, reason: str) -> _Part:
    acts = [Action("reset", g.name, st.tag, reason=reason) for st in _states(g.name, obs) if st.state not in ("stopped",)]
    return _Part(tuple(acts))


def _standby(g: specmod.Group, t: specmod.Timing, obs: Observed, view: ClusterView, now: float) -> _Part:
    """A node that does not own the group keeps its fitness tests current."""
    if not placement.allowed(g, view.node):
        return _Part()
    return _entries(g, g.runlevel, obs, now, t, only=_test_tags(g), retest=True)


# --- entries: the inittab part -----------------------------------------------------------


_test_tags = placement.leading_tags  # the tags of the group's leading tests (memoised)


def _states(group: str, obs: Observed) -> Sequence[EntryState]:
    """The group's entry states (read-only: the index's own list)."""
    by_group = getattr(obs, "by_group", None)
    if by_group is not None:
        return by_group.get(group, ())
    return [st for (gname, _), st in obs.entries.items() if gname == group]


def _active(group: str, obs: Observed, keep: frozenset[str] = frozenset()) -> bool:
    for st in _states(group, obs):
        if st.active and st.tag not in keep:
            return True
    return False


def _stop_all(
    group: str,
    obs: Observed,
    reason: str,
    *,
    urgent: bool = False,
    deadline: float | None = None,
    keep: frozenset[str] = frozenset(),
    order: tuple[str, ...] = (),
) -> _Part:
    """Stop every active entry: in reverse file order (`order`: the group's tags), what
    depends on an entry going first; entries the spec no longer knows go before all, latest
    started first."""
    rank = {tag: i for i, tag in enumerate(order)}
    states = sorted(
        (st for st in _states(group, obs) if st.active and st.tag not in keep),
        key=lambda s: (s.tag in rank, -rank.get(s.tag, 0), -s.since),
    )
    return _Part(tuple(Action("stop", group, st.tag, reason=reason, urgent=urgent, deadline=deadline) for st in states))


def _tags(g: specmod.Group) -> tuple[str, ...]:
    return tuple(e.tag for e in g.entries)


@attrs.frozen
class _Shape:
    """What `_entries` needs from a group's spec for one level: it depends on the spec alone."""

    known: frozenset[str]  # every tag of the group
    # (entry, its key in Observed.entries, is a process, foreground, its state when absent), in file order
    wanted: tuple[tuple[specmod.Entry, tuple[str, str], bool, bool, EntryState], ...]
    # (entry, its key, why it must not run), in reverse file order
    unwanted: tuple[tuple[specmod.Entry, tuple[str, str], str], ...]
    wanted_keys: tuple[tuple[str, str], ...]  # the keys of `wanted`, each once


# (group name, level, only) -> (the Group it was computed from, its shape). Specs are frozen, so
# a shape stays valid while the very same Group object is planned again; a reloaded spec brings
# new Group objects and the shape is computed afresh. This memo changes no result of plan().
_SHAPES: dict[tuple[str, str, frozenset[str] | None], tuple[specmod.Group, _Shape]] = {}


def _shape(g: specmod.Group, level: str, only: frozenset[str] | None) -> _Shape:
    key = (g.name, level, only)
    hit = _SHAPES.get(key)
    if hit is not None and hit[0] is g:
        return hit[1]
    wanted = [e for e in g.entries if e.active_at(level) and (only is None or e.tag in only)]
    wanted_tags = {e.tag for e in wanted}
    shape = _Shape(
        known=frozenset(e.tag for e in g.entries),
        wanted=tuple(
            (e, (g.name, e.tag), e.kind == "process", e.foreground, EntryState(group=g.name, tag=e.tag, kind=e.kind))
            for e in wanted
        ),
        unwanted=tuple((e, (g.name, e.tag), _why_not(e, level, only)) for e in reversed(g.entries) if e.tag not in wanted_tags),
        wanted_keys=tuple(dict.fromkeys((g.name, e.tag) for e in wanted)),
    )
    if len(_SHAPES) > 65536:
        _SHAPES.clear()
    _SHAPES[key] = (g, shape)
    return shape


def _entries(
    g: specmod.Group,
    level: str,
    obs: Observed,
    now: float,
    t: specmod.Timing,
    *,
    only: frozenset[str] | None = None,
    retest: bool = False,
) -> _Part:
    """Minimal transition of one group's entries to `level`, in inittab order."""
    # This runs for every group on every round: it is written for speed (see
    # tests/bench/plan_scale.py), with the meaning of obs.get() and _earliest() inlined.
    name = g.name
    entries = obs.entries
    shape = _shape(g, level, only)
    acts: list[Action] = []
    wake: float | None = None
    known = shape.known
    states = _states(name, obs)
    gone: list[EntryState] = []
    for st in states:
        if st.tag not in known:
            gone.append(st)
    if gone:
        for st in sorted(gone, key=lambda s: -s.since):
            acts.append(_leave(name, st, "entry removed from the spec"))
    if shape.unwanted and _may_leave(shape, states, entries):
        for e, key, why in shape.unwanted:
            st = entries.get(key)  # absent = stopped: nothing to leave
            if st is not None and st.state != "stopped":
                acts.append(_leave(name, st, why))
    for e, key, process, foreground, absent in shape.wanted:
        st = entries.get(key)
        if st is None:
            st = absent
        elif process and (st.state == "done" or (st.state == "running" and not foreground)):
            continue  # converged, and later entries need not wait: what _advance says, sooner
        act, due, halt = _advance(name, e, st, level, now, t, retest)
        if act is not None:
            acts.append(act)
        if due is not None:
            wake = due if wake is None else min(wake, due)
        if halt:
            break
    return _Part(tuple(acts), wake)


def _may_leave(shape: _Shape, states: Sequence[EntryState], entries: dict[tuple[str, str], EntryState]) -> bool:
    """False if no record of the group (`states`) is under an unwanted entry's key: when
    every one is under a wanted entry's key. Counting those costs one look-up per wanted
    entry instead of one per unwanted entry (a standby wants only its tests)."""
    keys = shape.wanted_keys
    if len(keys) >= len(shape.unwanted):
        return True  # looking at every unwanted entry is no dearer
    present = 0
    for key in keys:
        if key in entries:
            present += 1
    return present != len(states)


def _leave(group: str, st: EntryState, reason: str) -> Action:
    return Action("stop" if st.active else "reset", group, st.tag, reason=reason)


def _why_not(e: specmod.Entry, level: str, only: frozenset[str] | None) -> str:
    if level == specmod.STOP:
        return "runlevel stop"
    if e.mode == "off":
        return "mode is off"
    if level not in e.runlevels:
        return f"runlevel {level} is not in its runlevels ({', '.join(e.runlevels)})"
    return "the group runs on another node"


_IDLE: tuple[None, None, bool] = (None, None, False)  # nothing to do; later entries may go on
_HALT: tuple[None, None, bool] = (None, None, True)  # nothing to do; later entries wait


def _advance(
    group: str, e: specmod.Entry, st: EntryState, level: str, now: float, t: specmod.Timing, retest: bool
) -> tuple[Action | None, float | None, bool]:
    """(action, wake time, halt): what one wanted entry needs; halt = later entries wait."""
    s = st.state
    if e.kind != "process":
        if s == "running":
            return _IDLE
        if st.retry_at is not None and now < st.retry_at:
            return None, st.retry_at, True  # later entries depend on this resource
        why = {"mismatch": f"present but different ({st.message})", "error": f"retry after: {st.message}"}.get(
            s, f"runlevel {level} includes it, not present"
        )
        return Action("start", group, e.tag, reason=why), None, False
    # The common, converged cases first: this runs for every wanted entry on every round.
    if s == "running":
        return _HALT if e.foreground else _IDLE
    if s == "done":
        return _IDLE
    if s == "stopping":
        return _HALT
    if s == "stopped":
        return Action("start", group, e.tag, reason=f"runlevel {level} includes it, not running"), None, e.foreground
    if s in ("passed", "failed"):
        due = st.since + t.retest
        rerun = retest or s == "failed"
        if rerun and now >= due:
            return Action("start", group, e.tag, reason=f"re-run test: {s} {now - st.since:.0f}s ago"), None, True
        return None, due if rerun else None, s == "failed"
    # exited (respawn) or error (could not start): retry when the backoff allows
    if st.retry_at is not None and now < st.retry_at:
        return None, st.retry_at, False
    if e.mode == "respawn" or s == "error":
        last = f"exit {st.exit_code}" if st.exit_code is not None else (st.message or "exited")
        return Action("start", group, e.tag, reason=f"respawn: {last}"), None, e.foreground
    return None, None, False
