"""Property tests of the pure planner: `plan(spec, observed, view, now)`.

`plan` does no I/O, so these build the spec, Observed and ClusterView in memory and let
hypothesis explore them. The single-node view is "n1", holding a claim on every group and a
lease that never ends, unless a property says otherwise.

A simulated executor (`apply`) plays the part of the real one: start -> running (background)
or done/passed (foreground; a test in `failing` -> failed), stop -> stopped, reset -> the
record goes, claim -> n1 holds the group, release -> nobody does.
"""

from __future__ import annotations

import math

import attrs
from hypothesis import HealthCheck, given, settings, strategies as st

from reconciler.decide import placement
from reconciler.observe import EntryState, Observed
from reconciler.decide.plan import Plan, plan
from reconciler.spec import MODES, STOP, Cluster, Entry, Group, Spec, Timing
from reconciler.store import Claim, ClusterView, Member

NODE = "n1"
OTHER = "n2"
LEVELS = ("a", "b", "c")
NOW = 1000.0
INF = float("inf")

settings.register_profile("plan", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("plan")


# --- building inputs ------------------------------------------------------------------------


@st.composite
def groups(draw, name: str, *, modes=MODES, allow_stop: bool = True) -> Group:
    n = draw(st.integers(0, 6))
    entries = []
    for i in range(n):
        mode = draw(st.sampled_from(modes))
        levels = draw(st.lists(st.sampled_from(LEVELS), min_size=1, max_size=3, unique=True))
        entries.append(Entry(tag=f"{name}-{i}", runlevels=tuple(levels), mode=mode, command=("true",)))
    g = Group(name=name, entries=tuple(entries), source=f"{name}.toml")
    # A valid spec: the desired runlevel is "stop" or one some entry mentions.
    choices = list(g.levels()) + ([STOP] if allow_stop or not g.levels() else [])
    return attrs.evolve(g, runlevel=draw(st.sampled_from(choices)))


@st.composite
def specs(draw, *, modes=MODES, allow_stop: bool = True, max_groups: int = 3) -> Spec:
    n = draw(st.integers(1, max_groups))
    gs = {}
    for i in range(n):
        name = f"g{i}"
        gs[name] = draw(groups(name, modes=modes, allow_stop=allow_stop))
    return Spec(cluster=Cluster(), groups=gs)


# Entry states a real supervisor can report for an entry of each mode.
ANY_STATES = {
    "respawn": ("stopped", "running", "stopping", "exited"),
    "once": ("stopped", "running", "stopping", "done"),
    "wait": ("stopped", "running", "stopping", "done"),
    "test": ("stopped", "running", "stopping", "passed", "failed"),
    "off": ("stopped", "running", "done"),
}
# States from which the simulated executor alone can converge (nothing in flight, no failed test).
SETTLED_STATES = {
    "respawn": ("stopped", "running", "exited"),
    "once": ("stopped", "running", "done"),
    "wait": ("stopped", "done"),
    "test": ("stopped", "passed"),
    "off": ("stopped", "running", "done"),
}


@st.composite
def observed_for(draw, spec: Spec, *, states=ANY_STATES, stale: bool = True, busy: bool = False, ordered_since: bool = False):
    """Observed entry states for `spec`'s entries, plus (optionally) records the spec no
    longer has: entries removed from a group and whole groups removed from the spec."""
    entries: dict[tuple[str, str], EntryState] = {}
    clock = iter(range(1, 10_000))
    for g in spec.groups.values():
        for e in g.entries:
            if not draw(st.booleans()) and not ordered_since:
                continue  # never started: no record at all
            state = draw(st.sampled_from(states[e.mode]))
            since = float(next(clock)) if ordered_since else draw(st.floats(0, NOW, allow_nan=False))
            retry = None
            if state == "exited" and states is ANY_STATES:
                retry = draw(st.one_of(st.none(), st.floats(NOW - 5, NOW + 5)))
            pid = 100 + len(entries) if state in ("running", "stopping") else None
            entries[(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, state=state, since=since, pid=pid, retry_at=retry)
    if stale:
        for gname in list(spec.groups) + ["gone"]:
            for j in range(draw(st.integers(0, 2))):
                tag = f"old-{gname}-{j}"
                state = draw(st.sampled_from(("stopped", "running", "done", "exited")))
                since = float(next(clock)) if ordered_since else draw(st.floats(0, NOW, allow_nan=False))
                entries[(gname, tag)] = EntryState(group=gname, tag=tag, state=state, since=since)
    busy_groups = frozenset()
    if busy:
        busy_groups = frozenset(draw(st.lists(st.sampled_from(sorted({g for g, _ in entries} | set(spec.groups))), unique=True)))
    return Observed(node=NODE, entries=entries, busy=busy_groups)


def owned_view(spec: Spec, observed: Observed | None = None, **changes) -> ClusterView:
    names = set(spec.groups) | (observed.groups() if observed is not None else set())
    claims = {g: Claim(group=g, node=NODE, generation=1, token="1") for g in names}
    return attrs.evolve(ClusterView(node=NODE, claims=claims, lease_until=INF), **changes)


def converged_view(spec: Spec, **changes) -> ClusterView:
    """A converged node owns every group that should run, and no group whose runlevel is stop."""
    view = owned_view(spec, **changes)
    return attrs.evolve(view, claims={g: c for g, c in view.claims.items() if spec.groups[g].runlevel != STOP})


def converged(spec: Spec) -> Observed:
    """What a converged node looks like: wanted background entries running, foreground ones
    done or passed, everything else absent (stopped)."""
    entries = {}
    for g in spec.groups.values():
        for i, e in enumerate(g.entries):
            if not e.active_at(g.runlevel):
                continue
            state = {"respawn": "running", "once": "running", "wait": "done", "test": "passed"}[e.mode]
            if e.mode == "once" and i % 2:
                state = "done"  # a once entry that already exited is just as converged
            entries[(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, state=state, since=NOW - 1 - i, pid=1000 + i)
    return Observed(node=NODE, entries=entries)


# --- the simulated executor ---------------------------------------------------------------------


@attrs.define
class World:
    spec: Spec
    entries: dict
    claims: dict
    clock: float = NOW
    failing: frozenset = frozenset()
    generation: int = 1

    def observed(self) -> Observed:
        return Observed(node=NODE, entries=dict(self.entries))

    def view(self) -> ClusterView:
        return ClusterView(node=NODE, claims=dict(self.claims), lease_until=INF)

    def plan(self) -> Plan:
        return plan(self.spec, self.observed(), self.view(), self.clock)

    def apply(self, p: Plan) -> None:
        for a in p.actions:
            self.clock += 0.001  # distinct start times; far below any retest period
            key = (a.group, a.tag)
            if a.kind == "start":
                e = self.spec.entry(a.group, a.tag)
                assert e is not None, a
                if e.mode == "test":
                    state = "failed" if a.tag in self.failing else "passed"
                elif e.mode == "wait":
                    state = "done"
                else:
                    state = "running"
                self.entries[key] = EntryState(group=a.group, tag=a.tag, state=state, since=self.clock)
            elif a.kind == "stop":
                old = self.entries.get(key) or EntryState(group=a.group, tag=a.tag)
                self.entries[key] = attrs.evolve(old, state="stopped", pid=None, since=self.clock, retry_at=None)
            elif a.kind == "reset":
                self.entries.pop(key, None)
            elif a.kind == "claim":
                self.generation += 1
                self.claims[a.group] = Claim(group=a.group, node=NODE, generation=self.generation, token=str(self.generation))
            elif a.kind == "release":
                self.claims.pop(a.group, None)
            else:
                raise AssertionError(f"unexpected action on a single node: {a.describe()}")


def world(spec: Spec, observed: Observed, **kw) -> World:
    claims = dict(owned_view(spec, observed).claims)
    return World(spec=spec, entries=dict(observed.entries), claims=claims, **kw)


def starts(p: Plan, group: str | None = None) -> list[str]:
    return [a.tag for a in p.actions if a.kind == "start" and (group is None or a.group == group)]


def n_entries(spec: Spec) -> int:
    return sum(len(g.entries) for g in spec.groups.values())


# --- (a) a converged input plans nothing ------------------------------------------------------


@given(specs())
def test_converged_input_plans_nothing(spec):
    p = plan(spec, converged(spec), converged_view(spec), NOW)
    assert p.empty, [a.describe() for a in p.actions]


def test_converged_example_by_hand():
    g = Group(
        name="web",
        runlevel="run",
        entries=(
            Entry(tag="ready", runlevels=("run",), mode="test", command=("true",)),
            Entry(tag="docroot", runlevels=("run",), mode="wait", command=("true",)),
            Entry(tag="server", runlevels=("run", "maint"), mode="respawn", command=("true",)),
            Entry(tag="note", runlevels=("maint",), mode="once", command=("true",)),
            Entry(tag="never", runlevels=("run",), mode="off", command=("true",)),
        ),
    )
    spec = Spec(cluster=Cluster(), groups={"web": g})
    obs = converged(spec)
    assert set(obs.entries) == {("web", "ready"), ("web", "docroot"), ("web", "server")}
    assert plan(spec, obs, converged_view(spec), NOW).empty


# --- (b) apply + plan again converges, then stays empty ------------------------------------------


def _assert_converged(w: World) -> None:
    for g in w.spec.groups.values():
        for e in g.entries:
            st_ = w.entries.get((g.name, e.tag))
            state = st_.state if st_ else "stopped"
            if e.active_at(g.runlevel):
                want = {"respawn": ("running",), "once": ("running", "done"), "wait": ("done",), "test": ("passed",)}[e.mode]
                assert state in want, (g.name, e.tag, state)
            else:
                assert state not in ("running", "stopping"), (g.name, e.tag, state)
        if g.runlevel == STOP:
            assert g.name not in w.claims
    for (gname, tag), st_ in w.entries.items():
        if w.spec.entry(gname, tag) is None:
            assert not st_.active, (gname, tag, st_.state)


def _converge(w: World, limit: int) -> int:
    """Plan and apply until the plan is empty; return how many plans were applied."""
    rounds = 0
    while True:
        p = w.plan()
        if p.empty:
            return rounds
        rounds += 1
        assert rounds <= limit, f"not converged after {limit} rounds; still: {[a.describe() for a in p.actions]}"
        w.apply(p)


@given(st.data())
def test_apply_then_plan_converges_and_is_idempotent(data):
    spec = data.draw(specs())
    obs = data.draw(observed_for(spec, states=SETTLED_STATES))
    w = world(spec, obs)
    # Entries of the spec plus the records of entries and groups the spec no longer has.
    n = n_entries(spec) + sum(1 for g, t in obs.entries if spec.entry(g, t) is None)
    rounds = _converge(w, n + 2)
    assert rounds <= n + 2
    _assert_converged(w)
    # Idempotent: planning again, and again, still plans nothing.
    for _ in range(3):
        assert w.plan().empty


@given(st.data())
def test_without_foreground_entries_one_application_converges(data):
    spec = data.draw(specs(modes=("once", "respawn", "off"), allow_stop=False))
    obs = data.draw(observed_for(spec, states=SETTLED_STATES, stale=False))
    w = world(spec, obs)
    p = w.plan()
    w.apply(p)
    after = w.plan()
    assert after.empty, [a.describe() for a in after.actions]
    _assert_converged(w)


@given(st.data())
def test_each_round_advances_past_one_foreground_entry(data):
    """From nothing, a group with k foreground entries needs at most k + 1 rounds."""
    spec = data.draw(specs(allow_stop=False, max_groups=1))
    w = world(spec, Observed(node=NODE))
    g = next(iter(spec.groups.values()))
    k = sum(1 for e in g.entries if e.foreground and e.active_at(g.runlevel))
    assert _converge(w, k + 1) <= k + 1
    _assert_converged(w)


# --- (c) never start what the desired runlevel excludes --------------------------------------------


@st.composite
def any_view(draw, spec: Spec, observed: Observed) -> tuple[ClusterView, float]:
    """A view where each group is claimed by n1, by a live or dead n2, or by nobody; the lease
    may have run out."""
    now = NOW
    names = sorted(set(spec.groups) | observed.groups())
    claims = {}
    for gname in names:
        who = draw(st.sampled_from((NODE, OTHER, None)))
        if who is not None:
            claims[gname] = Claim(group=gname, node=who, generation=3, token="3")
    alive = draw(st.booleans())
    members = {OTHER: Member(name=OTHER, last_change=now if alive else now - 100)}
    lease_until = draw(st.sampled_from((INF, now + 1, now + 0.05, now - 1)))
    unclaimed = {g: now - draw(st.floats(0, 5)) for g in names if g not in claims}
    view = ClusterView(
        node=NODE, members=members, claims=claims, lease_until=lease_until, quorum=True,
        unclaimed_since=unclaimed,
    )
    return view, now


@given(st.data())
def test_never_starts_an_entry_the_desired_runlevel_excludes(data):
    spec = data.draw(specs())
    obs = data.draw(observed_for(spec, busy=True))
    view, now = data.draw(any_view(spec, obs))
    p = plan(spec, obs, view, now)
    for a in p.actions:
        if a.kind != "start":
            continue
        g = spec.groups.get(a.group)
        assert g is not None, f"started an entry of a group not in the spec: {a.describe()}"
        e = spec.entry(a.group, a.tag)
        assert e is not None, a.describe()
        assert e.mode != "off", a.describe()
        assert g.runlevel != STOP and g.runlevel in e.runlevels, a.describe()
        assert a.reason


@given(st.data())
def test_never_starts_across_a_simulated_run(data):
    """(c) along whole converging runs too, including runlevel changes midway."""
    spec = data.draw(specs())
    w = world(spec, data.draw(observed_for(spec, states=SETTLED_STATES)))
    for _step in range(2):
        for _ in range(n_entries(spec) + 3):
            p = w.plan()
            for a in p.actions:
                if a.kind == "start":
                    g, e = spec.groups[a.group], spec.entry(a.group, a.tag)
                    assert e.active_at(g.runlevel), a.describe()
            w.apply(p)
        # change every group's runlevel and converge again
        gs = {}
        for name, g in spec.groups.items():
            levels = list(g.levels()) + [STOP]
            gs[name] = attrs.evolve(g, runlevel=data.draw(st.sampled_from(levels)))
        spec = attrs.evolve(spec, groups=gs)
        w.spec = spec


# --- (d) stops before starts; stops in reverse file order ----------------------------------------------


@given(st.data())
def test_stops_come_before_starts_and_in_reverse_file_order(data):
    spec = data.draw(specs())
    # Entries were started in file order (which is what the agent does).
    obs = data.draw(observed_for(spec, ordered_since=True, stale=False))
    p = plan(spec, obs, owned_view(spec), NOW)
    for name, g in spec.groups.items():
        acts = p.for_group(name)
        kinds = [a.kind for a in acts if a.kind in ("start", "stop")]
        if "start" in kinds and "stop" in kinds:
            assert max(i for i, k in enumerate(kinds) if k == "stop") < min(i for i, k in enumerate(kinds) if k == "start"), kinds
        order = {e.tag: i for i, e in enumerate(g.entries)}
        stopped = [order[a.tag] for a in acts if a.kind == "stop"]
        assert stopped == sorted(stopped, reverse=True), [a.describe() for a in acts]


@given(st.data())
def test_minimal_transition_stops_in_reverse_file_order_whatever_the_start_times(data):
    """A runlevel change of an owned group stops in reverse file order even when the entries
    were started in another order (e.g. after restarts), and leaves shared entries alone."""
    spec = data.draw(specs(allow_stop=False, modes=("respawn", "once")))
    obs = data.draw(observed_for(spec, stale=False, states={"respawn": ("running",), "once": ("running", "done")}))
    p = plan(spec, obs, owned_view(spec), NOW)
    for name, g in spec.groups.items():
        order = {e.tag: i for i, e in enumerate(g.entries)}
        acts = p.for_group(name)
        stopped = [order[a.tag] for a in acts if a.kind == "stop"]
        assert stopped == sorted(stopped, reverse=True)
        started = [order[a.tag] for a in acts if a.kind == "start"]
        assert started == sorted(started)
        for a in acts:
            if not a.tag:
                continue  # release of an empty group
            e = spec.entry(name, a.tag)
            st_ = obs.get(name, a.tag)
            if e.active_at(g.runlevel):
                # minimal: an entry wanted at the new level and running (or done) is untouched
                assert st_.state not in ("running", "done"), a.describe()
                assert a.kind == "start"
            else:
                assert a.kind in ("stop", "reset")


# --- (e) a failed test halts the group -------------------------------------------------------------------


@given(st.data())
def test_failed_test_halts_later_entries(data):
    spec = data.draw(specs(allow_stop=False))
    tests = [(g.name, e.tag) for g in spec.groups.values() for e in g.entries if e.mode == "test" and e.active_at(g.runlevel)]
    failing = frozenset(t for _, t in data.draw(st.lists(st.sampled_from(tests), unique=True))) if tests else frozenset()
    w = world(spec, Observed(node=NODE), failing=failing)
    ever_started: dict[str, list[str]] = {}
    for _ in range(n_entries(spec) + 3):
        p = w.plan()
        for a in p.actions:
            if a.kind == "start":
                ever_started.setdefault(a.group, []).append(a.tag)
        w.apply(p)
    assert w.plan().empty
    for g in spec.groups.values():
        tags = [e.tag for e in g.entries]
        first_fail = next((i for i, e in enumerate(g.entries) if e.tag in failing), None)
        if first_fail is None:
            continue
        late = [t for t in ever_started.get(g.name, []) if tags.index(t) > first_fail]
        assert not late, f"{g.name}: started {late} after failed test {tags[first_fail]}"
        # and nothing after it runs now
        for e in g.entries[first_fail + 1 :]:
            assert not w.observed().get(g.name, e.tag).active


@given(st.data())
def test_failed_test_in_observed_halts(data):
    spec = data.draw(specs(allow_stop=False))
    obs = data.draw(observed_for(spec, stale=False))
    view = owned_view(spec)
    p = plan(spec, obs, view, NOW)
    for g in spec.groups.values():
        idx = next(
            (i for i, e in enumerate(g.entries) if e.active_at(g.runlevel) and e.mode == "test" and obs.get(g.name, e.tag).state == "failed"),
            None,
        )
        if idx is None:
            continue
        after = {e.tag for e in g.entries[idx + 1 :]}
        assert not (set(starts(p, g.name)) & after), [a.describe() for a in p.for_group(g.name)]


def test_failed_leading_test_releases_and_starts_nothing():
    g = Group(
        name="web",
        runlevel="run",
        entries=(
            Entry(tag="ready", runlevels=("run",), mode="test", command=("false",)),
            Entry(tag="server", runlevels=("run",), mode="respawn", command=("true",)),
        ),
    )
    spec = Spec(cluster=Cluster(), groups={"web": g})
    w = world(spec, Observed(node=NODE), failing=frozenset({"ready"}))
    for _ in range(4):
        w.apply(w.plan())
    assert w.entries[("web", "ready")].state == "failed"
    assert ("web", "server") not in w.entries
    assert "web" not in w.claims  # a node whose test failed gives the group up
    assert w.plan().empty


# --- (f) another live node holds the claim -----------------------------------------------------------------


@given(st.data())
def test_claimed_elsewhere_starts_only_leading_tests(data):
    spec = data.draw(specs())
    obs = data.draw(observed_for(spec, stale=False))
    claims = {g: Claim(group=g, node=OTHER, generation=7, token="7") for g in spec.groups}
    view = ClusterView(node=NODE, members={OTHER: Member(name=OTHER, last_change=NOW)}, claims=claims, lease_until=INF)
    p = plan(spec, obs, view, NOW)
    for a in p.actions:
        assert a.kind in ("start", "stop", "reset"), a.describe()
        g = spec.groups[a.group]
        if a.kind == "start":
            assert a.tag in {e.tag for e in placement.leading_tests(g, g.runlevel)}, a.describe()
        if a.kind == "stop":
            e = spec.entry(a.group, a.tag)
            if e is not None and e.tag not in {t.tag for t in placement.leading_tests(g, g.runlevel)}:
                assert a.urgent, a.describe()  # running here while another node owns it


# --- (g) the lease ran out: self-demotion ---------------------------------------------------------------


@given(st.data())
def test_expired_lease_stops_every_active_entry_urgently(data):
    spec = data.draw(specs())
    obs = data.draw(observed_for(spec, stale=False, busy=True))
    margin = spec.cluster.timing.demote_margin
    lease_until = NOW + data.draw(st.floats(-10, margin))  # now >= lease_until - demote_margin
    assert NOW >= lease_until - margin
    view = owned_view(spec, lease_until=lease_until)
    p = plan(spec, obs, view, NOW)
    assert not starts(p), [a.describe() for a in p.actions]
    urgent = {(a.group, a.tag) for a in p.actions if a.kind == "stop" and a.urgent}
    for key, st_ in obs.entries.items():
        if st_.active:
            assert key in urgent, (key, st_.state, [a.describe() for a in p.actions])
    for a in p.actions:
        if a.kind == "stop":
            assert a.urgent and a.deadline is not None and a.deadline <= lease_until


def test_lease_boundary_is_demote_margin_before_lease_end():
    g = Group(name="g", runlevel="run", entries=(Entry(tag="s", runlevels=("run",), mode="respawn", command=("true",)),))
    spec = Spec(cluster=Cluster(timing=Timing()), groups={"g": g})
    obs = converged(spec)
    margin = spec.cluster.timing.demote_margin
    just_valid = plan(spec, obs, owned_view(spec, lease_until=NOW + margin + 1e-6), NOW)
    assert just_valid.empty
    expired = plan(spec, obs, owned_view(spec, lease_until=NOW + margin), NOW)
    assert [(a.kind, a.tag, a.urgent) for a in expired.actions] == [("stop", "s", True)]


# --- purity ---------------------------------------------------------------------------------------------


@given(st.data())
def test_plan_is_deterministic(data):
    spec = data.draw(specs())
    obs = data.draw(observed_for(spec, busy=True))
    view, now = data.draw(any_view(spec, obs))
    assert plan(spec, obs, view, now) == plan(spec, obs, view, now)
    w = plan(spec, obs, view, now).wake_at
    assert w is None or not math.isnan(w)
