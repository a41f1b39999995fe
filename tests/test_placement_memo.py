"""The placement memos (rendezvous orders per member set, peer report summaries, leading
tests) change no answer: what placement.Roster answers with warm memos equals what it
answers after placement.forget(), and rendezvous_order equals sorting by rank_key.

The memos live across calls, so each property walks a sequence of views in which members
join, leave, die, come back and change what they report: every step must still agree.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from reconciler.decide import entries as entriesmod
from reconciler.decide import placement
from reconciler.observe import EntryState, Observed
from reconciler.decide.plan import plan
from reconciler.published import GroupStatus, NodeStatus
from reconciler.spec import Cluster, Entry, Group, Spec, SpecError, load
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

INFO = st.builds(GroupStatus, eligible=st.sampled_from((True, False, None)), active=st.booleans())


@st.composite
def statuses(draw):
    groups = {g: draw(INFO) for g in draw(st.lists(st.sampled_from(GROUPS), unique=True))}
    return draw(st.sampled_from((NodeStatus(groups=groups), NodeStatus())))


@st.composite
def views(draw):
    """A view from ME: members from POOL (ME among them or not), alive or dead, up or down,
    with or without a heartbeat and a status document; the lease valid or not."""
    members = {}
    for n in draw(st.lists(st.sampled_from(POOL), unique=True)):
        age = draw(st.sampled_from((0.0, 0.3, 0.7, 5.0)))
        hb = None
        if draw(st.integers(0, 4)):
            hb = Heartbeat(node=n, counter=1, status=draw(statuses()))
        members[n] = Member(name=n, last_change=NOW - age, heartbeat=hb, up=draw(st.integers(0, 5)) > 0)
    lease = draw(st.sampled_from((float("inf"), NOW + 1, NOW - 1)))
    return ClusterView(node=ME, members=members, lease_until=lease, quorum=draw(st.integers(0, 5)) > 0)


@st.composite
def placement_groups(draw):
    name = draw(st.sampled_from(GROUPS))
    nodes = draw(st.one_of(
        st.just(()),
        st.lists(st.sampled_from(POOL + ("unknown1", "unknown2")), max_size=5, unique=True).map(tuple),
        st.lists(st.sampled_from(POOL[:4]), max_size=4).map(tuple),  # repeats (the spec refuses them)
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


Query = tuple  # (group, observed, exclude, unseen_rank)


def answers(view: ClusterView, queries: list[Query]) -> list:
    """Every query's (ranked, running_elsewhere) from one Roster, with the memos as they are."""
    roster = placement.Roster(view, NOW, DEAD_AFTER)
    out = []
    for g, obs, exclude, unseen in queries:
        ranked = roster.ranked(g, obs, exclude=exclude, unseen_rank=unseen)
        assert roster.candidates(g, obs, exclude=exclude, unseen_rank=unseen) == ranked[0]
        out.append((ranked, roster.running_elsewhere(g)))
    return out


def assert_memo_changes_nothing(view: ClusterView, queries: list[Query]) -> list:
    """The answers with the memos as they are equal those computed afresh; both are sane."""
    warm = answers(view, queries)
    placement.forget()
    fresh = answers(view, queries)
    assert warm == fresh
    for (g, _obs, exclude, _unseen), ((cands, at), busy) in zip(queries, fresh):
        assert len(set(cands)) == len(cands) and exclude not in cands
        assert cands == sorted(cands, key=lambda n: placement.rank_key(g, n))
        assert at == (cands.index(view.node) if view.node in cands else -1)
        assert busy == sorted(busy) and view.node not in busy
    return fresh


@MEMO
@given(st.data())
def test_roster_answers_equal_answers_computed_afresh(data):
    for _step in range(data.draw(st.integers(1, 4))):  # the view changes between plan() calls
        view = data.draw(views())
        queries = []
        for _ in range(data.draw(st.integers(1, 5))):
            g = data.draw(placement_groups())
            queries.append((g, data.draw(observed(g)), data.draw(st.sampled_from(("",) + POOL[:5] + ("unknown1",))),
                            data.draw(st.booleans())))
        assert_memo_changes_nothing(view, queries)


def test_roster_notices_a_new_status_record_and_reuses_an_unchanged_one():
    g = Group(name="g0")
    peer = POOL[1]

    def view_with(status):
        members = {peer: Member(name=peer, last_change=NOW, heartbeat=Heartbeat(node=peer, counter=1, status=status))}
        return ClusterView(node=ME, members=members)

    fit = NodeStatus(groups={"g0": GroupStatus(eligible=True, active=False)})
    unfit = NodeStatus(groups={"g0": GroupStatus(eligible=False, active=True)})
    for status, cands, busy in ((fit, [ME, peer], []), (unfit, [ME], [peer]), (fit, [ME, peer], [])):
        view = view_with(status)
        r = placement.Roster(view, NOW, DEAD_AFTER)
        assert sorted(r.candidates(g, Observed(node=ME))) == cands
        assert r.running_elsewhere(g) == busy
        assert_memo_changes_nothing(view, [(g, Observed(node=ME), "", False)])
    assert placement._REPORTS[peer][0] is fit


def test_a_preferred_node_never_heard_from_ranks_only_if_asked():
    g = Group(name="g0", nodes=("n5", ME, POOL[1]))
    view = ClusterView(node=ME, members={POOL[1]: Member(name=POOL[1], last_change=NOW)})
    r = placement.Roster(view, NOW, DEAD_AFTER)
    assert r.ranked(g, Observed(node=ME)) == ([ME, POOL[1]], 0)
    assert r.ranked(g, Observed(node=ME), unseen_rank=True) == (["n5", ME, POOL[1]], 1)
    assert r.ranked(g, Observed(node=ME), exclude="n5", unseen_rank=True) == ([ME, POOL[1]], 0)
    # a node named twice ranks once, where it first appears (the spec refuses repeats)
    twice = attrs.evolve(g, nodes=(POOL[1], ME, POOL[1]))
    assert r.ranked(twice, Observed(node=ME), unseen_rank=True) == ([POOL[1], ME], 1)


def test_the_spec_refuses_a_node_listed_twice(tmp_path):
    f = tmp_path / "spec.toml"
    f.write_text('[cluster]\nname = "t"\n[groups.web]\nnodes = ["a", "b", "a"]\n')
    with pytest.raises(SpecError) as info:
        load(f)
    assert str(info.value) == f"{f}: groups.web.nodes[2]: node 'a' is listed twice"
    f.write_text('[cluster]\nname = "t"\n[groups.web]\nnodes = ["a", "b"]\n')
    assert load(f).groups["web"].nodes == ("a", "b")


def test_many_members_with_failures_and_joins():
    """100 members, some dead, some unfit, some running it; members leave between steps."""
    names = [f"node{i:03d}" for i in range(100)]
    groups = [Group(name=f"g{i:03d}") for i in range(40)] + [Group(name="pref", nodes=("node005", "node000", "gone"))]
    for step in range(4):
        present = names[step * 3:]
        members = {}
        for i, n in enumerate(present):
            gs = {g.name: GroupStatus(eligible=(i + step) % 7 != 0, active=(i * 13 + step) % 50 == 0) for g in groups}
            members[n] = Member(name=n, last_change=NOW - (0.0 if i % 11 else 1.0),
                                heartbeat=Heartbeat(node=n, counter=1, status=NodeStatus(groups=gs)))
        view = ClusterView(node="node000", members=members)
        queries = [(g, Observed(node="node000"), exclude, unseen)
                   for g in groups for exclude in ("", "node004", "node017") for unseen in (False, True)]
        fresh = assert_memo_changes_nothing(view, queries)
        (cands, _), busy = fresh[0]  # g000, nothing excluded
        assert all(i % 11 and (i + step) % 7 for i, n in enumerate(present) if n in cands and n != "node000")
        assert busy == sorted(n for i, n in enumerate(present) if i % 11 and (i * 13 + step) % 50 == 0 and n != "node000")


# --- the whole plan ------------------------------------------------------------------------------


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
        placement.forget()
        entriesmod._SHAPES.clear()
        with pytest.MonkeyPatch.context() as mp:
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
