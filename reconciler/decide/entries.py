"""The inittab part of planning: how one group's entries get to a runlevel, with the least
starting and stopping, in file order (stops in reverse); pure, like reconciler/decide/plan.py, which
decides *whether* this node runs the group at all."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from reconciler import spec as specmod
from reconciler.decide import health, placement
from reconciler.decide.intent import Action, Part
from reconciler.model import EntryState, Observed

_test_tags = placement.leading_tags  # the tags of the group's leading tests (memoised)


def group_states(group: str, obs: Observed) -> Sequence[EntryState]:
    """The group's entry states (read-only: the index's own list)."""
    # plan's index of `obs` (plan._Indexed, a subclass of Observed that this module cannot
    # import without a circle), or None for a plain Observed
    by_group: dict[str, list[EntryState]] | None = getattr(obs, "by_group", None)
    if by_group is not None:
        return by_group.get(group, ())
    return [st for (gname, _), st in obs.entries.items() if gname == group]


def is_active(group: str, obs: Observed, keep: frozenset[str] = frozenset()) -> bool:
    for st in group_states(group, obs):
        if st.active and st.tag not in keep:
            return True
    return False


def stop_all(
    group: str,
    obs: Observed,
    reason: str,
    *,
    urgent: bool = False,
    deadline: float | None = None,
    keep: frozenset[str] = frozenset(),
    order: tuple[str, ...] = (),
) -> Part:
    """Stop every active entry: in reverse file order (`order`: the group's tags), what
    depends on an entry going first; entries the spec no longer knows go before all, latest
    started first."""
    rank = {tag: i for i, tag in enumerate(order)}
    states = sorted(
        (st for st in group_states(group, obs) if st.active and st.tag not in keep),
        key=lambda s: (s.tag in rank, -rank.get(s.tag, 0), -s.since),
    )
    return Part(tuple(Action("stop", group, st.tag, reason=reason, urgent=urgent, deadline=deadline) for st in states))


def entry_tags(g: specmod.Group) -> tuple[str, ...]:
    return tuple(e.tag for e in g.entries)


@attrs.frozen
class _Shape:
    """What `plan_entries` needs from a group's spec for one level: it depends on the spec alone."""

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


def plan_entries(
    g: specmod.Group,
    level: str,
    obs: Observed,
    now: float,
    t: specmod.Timing,
    *,
    only: frozenset[str] | None = None,
    retest: bool | frozenset[str] = False,
) -> Part:
    """Minimal transition of one group's entries to `level`, in inittab order; a running
    entry that is unhealthy (decide/health.py) is restarted. `retest`: re-run passed tests
    every timing.retest (True: every test; a set: the tests with those tags)."""
    # This runs for every group on every round: it is written for speed (see
    # tests/bench/plan_scale.py), with the meaning of obs.get() and earliest() inlined.
    name = g.name
    entries = obs.entries
    shape = _shape(g, level, only)
    acts: list[Action] = []
    wake: float | None = None
    known = shape.known
    states = group_states(name, obs)
    gone: list[EntryState] = []
    st: EntryState | None  # below, a record looked up by key may be absent
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
            if e.health is not None and st.state == "running":
                why = health.unhealthy(e, st, obs.probes.get(key))
                if why:
                    acts.append(Action("restart", name, e.tag, reason=why, failure=why))
            continue  # converged, and later entries need not wait: what _advance says, sooner
        act, due, halt = _advance(name, e, st, level, now, t, retest)
        if act is not None:
            acts.append(act)
        if due is not None:
            wake = due if wake is None else min(wake, due)
        if halt:
            break
    return Part(tuple(acts), wake)


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
    group: str, e: specmod.Entry, st: EntryState, level: str, now: float, t: specmod.Timing, retest: bool | frozenset[str]
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
        rerun = s == "failed" or (retest if isinstance(retest, bool) else e.tag in retest)
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
