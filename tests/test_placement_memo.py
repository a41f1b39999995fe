"""The memoised placement (placement.Roster, rendezvous_order) answers exactly what the
plain functions (placement.candidates, running_elsewhere, sorted by rank_key) answer.

The memos live across calls, so each property walks a sequence of views in which members
join, leave, die, come back and change what they report: every step must still agree.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from reconciler.decide import entries as entriesmod
from reconciler.decide import placement
from reconciler.decide import plan as planmod
from reconciler.observe import EntryState, Observed
from reconciler.decide.plan import plan
from reconciler.spec import Cluster, Entry, Group, Spec
from reconciler.store import Claim, ClusterView, Heartbeat, Member

NOW = 1000.0
DEAD_AFTER = 0.65
POOL = tuple(f"n{i}" for i in range(12))  # member names; n0 is this node
ME = POOL[0]
GROUPS = ("g0", "g1", "g2", "web/x")

MEMO = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_order(group: str, names) -> tuple[str, ...]:
    g = Group(name=group)
    return tuple(sorted(names, key=lambda n: placement.rank_key(g, n)))


def outcome(fn, *args, **kw):
    """fn's result, or the type of the exception it raised (a malformed status document)."""
    try:
        return fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - both sides must fail the same way
        return type(exc)


# --- rendezvous order ---------------------------------------------------------------------------


@MEMO
@given(st.lists(st.tuples(st.sampled_from(GROUPS), st.frozensets(st.sampled_from(POOL + ("", "a/b", "ü")))), min_size=1, max_size=12))
def test_rendezvous_order_equals_sorting_by_rank_key(steps):
    for group, names in steps:  # each step: members joined and left since the one before
        assert placement.rendezvous_order(group, names) == reference_order(group, names)


def test_rendezvous_order_derived_after_joins_and_leaves():
    many = frozenset(f"m{i:03d}" for i in range(100))
    for group in ("a", "b"):
        assert placement.rendezvous_order(group, many) == reference_order(group, many)
    # one leaves, one joins, both at once, a whole batch: orders derived from the last set
    steps = [many - {"m042"}, many | {"new1"}, (many - {"m007", "m099"}) | {"new2", "new3"}, many - {f"m{i:03d}" for i in range(50)},
             frozenset(f"x{i}" for i in range(30)), many]
    for names in steps:
        for group in ("a", "b", "c"):
            assert placement.rendezvous_order(group, names) == reference_order(group, names)
    assert len(placement._ORDERS) <= placement._ORDER_SETS


def test_order_memo_stays_bounded():
    for i in range(50):
        names = frozenset(POOL[: 1 + i % len(POOL)]) | {f"extra{i}"}
        for group in GROUPS:
            placement.rendezvous_order(group, names)
    assert len(placement._ORDERS) <= placement._ORDER_SETS
    assert all(len(d) <= placement._ORDER_GROUPS for d in placement._ORDERS.values())


# --- candidates and running_elsewhere over random views ---------------------------------------------

INFO = st.one_of(
    st.none(),
    st.just("not a dict"),
    st.fixed_dictionaries({}, optional={
        "eligible": st.sampled_from((True, False, None, 0, 1, "yes")),
        "active": st.sampled_from((True, False, None, 0, 1, "")),
    }),
)


@st.composite
def statuses(draw, *, malformed: bool):
    groups = {g: draw(INFO) for g in draw(st.lists(st.sampled_from(GROUPS), unique=True))}
    shapes = [{"groups": groups}, {"groups": groups}, {"groups": groups}, {}]
    if malformed:
        shapes += [{"groups": ["g0"]}, {"groups": None}]
    return draw(st.sampled_from(shapes))


@st.composite
def views(draw, *, malformed: bool = False):
    """A view from ME: members from POOL (ME among them or not), alive or dead, up or down,
    with or without a heartbeat and a status document; the lease valid or not."""
    members = {}
    for n in draw(st.lists(st.sampled_from(POOL), unique=True)):
        age = draw(st.sampled_from((0.0, 0.3, 0.7, 5.0)))
        hb = None
        if draw(st.integers(0, 4)):
            hb = Heartbeat(node=n, counter=1, status=draw(statuses(malformed=malformed)))
        members[n] = Member(name=n, last_change=NOW - age, heartbeat=hb, up=draw(st.integers(0, 5)) > 0)
    lease = draw(st.sampled_from((float("inf"), NOW + 1, NOW - 1)))
    return ClusterView(node=ME, members=members, lease_until=lease, quorum=draw(st.integers(0, 5)) > 0)


@st.composite
def placement_groups(draw):
    name = draw(st.sampled_from(GROUPS))
    nodes = draw(st.one_of(
        st.just(()),
        st.lists(st.sampled_from(POOL + ("unknown1", "unknown2")), max_size=5, unique=True).map(tuple),
        st.lists(st.sampled_from(POOL[:4]), max_size=4).map(tuple),  # duplicates (spec rejects them)
    ))
    entries = ()
    if draw(st.booleans()):
        entries = (Entry(tag="t", runlevels=("run",), mode="test", command=("true",)),
                   Entry(tag="s", runlevels=("run",), mode="respawn", command=("true",)),
                   Entry(tag="u", runlevels=("run",), mode="once", command=("true",)),
                   Entry(tag="m", runlevels=("maint",), mode="respawn", command=("true",)))
    return Group(name=name, runlevel="run", nodes=nodes, entries=entries)


@st.composite
def observed(draw, g: Group):
    state = draw(st.sampled_from((None, "passed", "failed", "running")))
    entries = {}
    if state is not None and g.entries:
        entries[(g.name, "t")] = EntryState(group=g.name, tag="t", state=state)
    return Observed(node=ME, entries=entries)


def assert_same(roster: placement.Roster, view: ClusterView, g: Group, obs: Observed, exclude: str, unseen: bool):
    want = outcome(placement.candidates, g, obs, view, NOW, DEAD_AFTER, exclude=exclude, unseen_rank=unseen)
    got = outcome(roster.candidates, g, obs, exclude=exclude, unseen_rank=unseen)
    assert got == want, (g, exclude, unseen)
    if isinstance(want, list):
        at = want.index(view.node) if view.node in want else -1
        assert roster.ranked(g, obs, exclude=exclude, unseen_rank=unseen) == (want, at)
    assert outcome(roster.running_elsewhere, g) == outcome(placement.running_elsewhere, g, view, NOW, DEAD_AFTER)


@MEMO
@given(st.data())
def test_roster_answers_what_the_plain_functions_answer(data):
    for _step in range(data.draw(st.integers(1, 4))):  # the view changes between plan() calls
        view = data.draw(views(malformed=data.draw(st.integers(0, 4)) == 0))
        roster = placement.Roster(view, NOW, DEAD_AFTER)
        for _ in range(data.draw(st.integers(1, 5))):
            g = data.draw(placement_groups())
            obs = data.draw(observed(g))
            exclude = data.draw(st.sampled_from(("",) + POOL[:5] + ("unknown1",)))
            assert_same(roster, view, g, obs, exclude, data.draw(st.booleans()))


def test_roster_notices_a_new_status_document_and_reuses_an_unchanged_one():
    g = Group(name="g0")
    peer = POOL[1]

    def view_with(status):
        members = {peer: Member(name=peer, last_change=NOW, heartbeat=Heartbeat(node=peer, counter=1, status=status))}
        return ClusterView(node=ME, members=members)

    fit = {"groups": {"g0": {"eligible": True, "active": False}}}
    unfit = {"groups": {"g0": {"eligible": False, "active": True}}}
    for status, cands, busy in ((fit, [ME, peer], []), (unfit, [ME], [peer]), (fit, [ME, peer], [])):
        view = view_with(status)
        r = placement.Roster(view, NOW, DEAD_AFTER)
        assert sorted(r.candidates(g, Observed(node=ME))) == cands
        assert r.running_elsewhere(g) == busy
        assert_same(r, view, g, Observed(node=ME), "", False)
    assert placement._REPORTS[peer][0] is fit


def test_many_members_with_failures_and_joins():
    """The fast path's own shapes at scale: 100 members, some dead, some unfit, some running it."""
    names = [f"node{i:03d}" for i in range(100)]
    groups = [Group(name=f"g{i:03d}") for i in range(40)] + [Group(name="pref", nodes=("node005", "node000", "gone"))]
    for step in range(4):
        present = names[step * 3:]
        members = {}
        for i, n in enumerate(present):
            gs = {g.name: {"eligible": (i + step) % 7 != 0, "active": (i * 13 + step) % 50 == 0} for g in groups}
            members[n] = Member(name=n, last_change=NOW - (0.0 if i % 11 else 1.0),
                                heartbeat=Heartbeat(node=n, counter=1, status={"groups": gs}))
        view = ClusterView(node="node000", members=members)
        roster = placement.Roster(view, NOW, DEAD_AFTER)
        for g in groups:
            for exclude in ("", "node004", "node017"):
                for unseen in (False, True):
                    assert_same(roster, view, g, Observed(node="node000"), exclude, unseen)


# --- the whole plan ------------------------------------------------------------------------------


class _PlainRoster(placement.Roster):
    """A Roster that asks the plain functions every time: the planner without the memos."""

    def candidates(self, g, observed, exclude="", unseen_rank=False):
        return placement.candidates(g, observed, self.view, self.now, self.dead_after, exclude, unseen_rank)

    def ranked(self, g, observed, exclude="", unseen_rank=False):
        out = self.candidates(g, observed, exclude, unseen_rank)
        return out, out.index(self.view.node) if self.view.node in out else -1

    def running_elsewhere(self, g):
        return placement.running_elsewhere(g, self.view, self.now, self.dead_after)


@st.composite
def cluster_inputs(draw):
    gs = {}
    for name in ("g0", "g1", "g2"):
        g = draw(placement_groups())
        gs[name] = attrs.evolve(g, name=name, failback=draw(st.booleans()))
    spec = Spec(cluster=Cluster(), groups=gs)
    view = draw(views())
    claims = {}
    for name in gs:
        who = draw(st.sampled_from((None, ME) + POOL[1:4]))
        if who is not None:
            claims[name] = Claim(group=name, node=who, generation=2, token="2")
    view = attrs.evolve(view, claims=claims, unclaimed_since={n: NOW - draw(st.sampled_from((0.0, 0.7, 3.0))) for n in gs if n not in claims})
    entries = {}
    for name, g in gs.items():
        for tag in [e.tag for e in g.entries] + ["old"]:  # "old": an entry the spec no longer has
            state = draw(st.sampled_from((None, "passed", "failed", "running", "stopped")))
            if state is not None:
                entries[(name, tag)] = EntryState(group=name, tag=tag, state=state, since=NOW - 20)
    return spec, Observed(node=ME, entries=entries), view


@MEMO
@given(st.data())
def test_plan_with_memos_equals_plan_without(data):
    for _step in range(data.draw(st.integers(1, 3))):
        spec, obs, view = data.draw(cluster_inputs())
        fast = plan(spec, obs, view, NOW)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(planmod.placement, "Roster", _PlainRoster)
            mp.setattr(entriesmod, "_may_leave", lambda shape, states, entries: True)  # look at every unwanted entry
            slow = plan(spec, obs, view, NOW)
        assert fast == slow


def test_standby_still_leaves_an_unwanted_record_next_to_its_tests():
    """A standby wants only its tests: records of other entries are still reset."""
    g = Group(
        name="g0", runlevel="run",
        entries=(Entry(tag="t", runlevels=("run",), mode="test", command=("true",)),
                 Entry(tag="s", runlevels=("run",), mode="respawn", command=("true",)),
                 Entry(tag="u", runlevels=("run",), mode="once", command=("true",)),
                 Entry(tag="m", runlevels=("maint",), mode="respawn", command=("true",))))
    spec = Spec(cluster=Cluster(), groups={"g0": g})
    peer = POOL[1]
    view = ClusterView(node=ME, members={peer: Member(name=peer, last_change=NOW)},
                       claims={"g0": Claim(group="g0", node=peer, generation=1, token="1")})
    for others in ({"u": "done"}, {"u": "done", "m": "stopped"}, {"s": "exited", "m": "done"}, {}):
        records = {"t": "passed", **others}
        obs = Observed(node=ME, entries={("g0", tag): EntryState(group="g0", tag=tag, state=state, since=NOW - 1)
                                         for tag, state in records.items()})
        p = plan(spec, obs, view, NOW)
        resets = sorted(a.tag for a in p.actions if a.kind == "reset")
        assert resets == sorted(tag for tag, state in others.items() if state != "stopped"), p
