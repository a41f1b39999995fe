"""The pure core of operator intents (reconciler/decide/intents.py and its use in
decide/plan.py): decision tables for move eligibility, hand-over planning, standby and the end
of maintenance, and hypothesis properties: in maintenance, plan returns no action for the
groups in scope, whatever else holds; a node in standby never claims or takes over."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, strategies as st

from reconciler.decide import intents, view as viewrules
from reconciler.decide.plan import plan
from reconciler.model import Claim, ClusterView, EntryState, Heartbeat, Member
from reconciler.published import GroupStatus, Intent, NodeStatus
from reconciler.spec import Cluster, Group, Spec

from test_plan_properties import OTHER, any_view, observed_for, specs
from test_plan_table import ENTRIES, ME, N2, N3, NOW, T, situation

MOVE = Intent(kind="move", id="a1", group="web", target=N2, expires=2000.0)
STANDBY_ME = Intent(kind="standby", id="b2", node=ME)


def with_intents(view: ClusterView, *its: Intent, wall: float = 1500.0) -> ClusterView:
    return attrs.evolve(view, intents={i.key: i for i in its}, wall=wall)


def kinds(p) -> list[tuple[str, str]]:
    return [(a.kind, a.tag) for a in p.actions]


# --- move eligibility (the CLI's check) --------------------------------------------------------


def outside(*, claim=ME, peers=None, failback=False, nodes=(), extra=()) -> tuple[Spec, ClusterView]:
    """web as seen from outside the cluster (the CLI): n1, n2, n3 live unless `peers` says."""
    peers = {ME: {}, N2: {}, N3: {}} if peers is None else peers
    members = {}
    for name, info in peers.items():
        g = GroupStatus(eligible=info.get("eligible", True), banned=info.get("banned", False))
        hb = Heartbeat(node=name, counter=1, status=NodeStatus(groups={"web": g}))
        members[name] = Member(name=name, last_change=NOW - info.get("age", 0.0), heartbeat=hb)
    g = Group(name="web", runlevel="run", nodes=nodes, failback=failback, entries=ENTRIES)
    spec = Spec(cluster=Cluster(timing=T), groups={"web": g})
    claims = {"web": Claim(group="web", node=claim, generation=3, token="3")} if claim else {}
    view = ClusterView(node="-look", members=members, claims=claims, lease_until=float("inf"))
    return spec, with_intents(view, *extra)


@pytest.mark.parametrize("given_, node, want", [
    ({}, N2, (N2, "")),
    ({}, ME, ("", "already runs on n1")),
    ({"nodes": (ME, N2)}, N3, ("", "not in the group's nodes")),
    ({"peers": {ME: {}, N2: {"eligible": False}}}, N2, ("", "tests failed on n2")),
    ({"peers": {ME: {}, N2: {"banned": True}}}, N2, ("", "gave web up")),
    ({"peers": {ME: {}, N2: {"age": 5.0}}}, N2, ("", "n2 is not alive")),
    ({"peers": {ME: {}}}, N2, ("", "not a member")),
    ({"extra": (Intent(kind="standby", id="c", node=N2),)}, N2, ("", "n2 is in standby")),
    ({"extra": (Intent(kind="maintenance", id="c"),)}, N2, ("", "in maintenance")),
    ({"extra": (Intent(kind="maintenance", id="c", node=ME),)}, N2, ("", "in maintenance")),
    ({"claim": None}, N2, ("", "not claimed")),
    # failback: a move away from the preferred node would come straight back
    ({"nodes": (ME, N2), "failback": True}, N2, ("", "failback = true: n1 is preferred")),
    ({"nodes": (N2, ME), "failback": True}, N2, (N2, "")),
    # without a target: the best eligible other node, in placement order
    ({"nodes": (ME, N3, N2)}, None, (N3, "")),
    ({"nodes": (ME, N3, N2), "peers": {ME: {}, N2: {}, N3: {"eligible": False}}}, None, (N2, "")),
    ({"nodes": (ME, N2, N3), "extra": (Intent(kind="standby", id="c", node=N2),)}, None, (N3, "")),
    ({"nodes": (ME, N2), "peers": {ME: {}, N2: {"age": 5.0}}}, None, ("", "no other node is eligible")),
])
def test_move_target(given_, node, want):
    spec, view = outside(**given_)
    target, why = intents.move_target(spec, view, "web", node, NOW)
    assert target == want[0]
    assert want[1] in why and (why == "") == bool(target)


def test_move_of_an_unknown_or_stopped_group_is_refused():
    spec, view = outside()
    assert intents.move_target(spec, view, "nosuch", N2, NOW) == ("", "no group nosuch in the spec")
    stopped = attrs.evolve(spec, groups={"web": attrs.evolve(spec.groups["web"], runlevel="stop")})
    assert "stop" in intents.move_target(stopped, view, "web", N2, NOW)[1]


# --- hand-over planning (the owner, the target) ------------------------------------------------


def test_owner_stops_then_hands_over_and_the_target_finishes():
    spec, obs, view = situation(claim=ME, running=True, peers={N2: _peer()})
    view = with_intents(view, MOVE)
    p = plan(spec, obs, view, NOW)
    assert kinds(p) == [("stop", "s"), ("stop", "t")] or kinds(p) == [("stop", "s")]
    assert all("moving to n2" in a.reason for a in p.actions)
    # stopped here: hand the claim over, in one action
    spec, obs, view = situation(claim=ME, running=False, test="stopped", peers={N2: _peer()})
    p = plan(spec, obs, with_intents(view, MOVE), NOW)
    assert [(a.kind, a.target) for a in p.actions] == [("handover", N2)]
    assert p.actions[0].claim == view.claims["web"] and p.actions[0].intent == MOVE
    # the target: a claim of its own, handed to it, starts at once (no dead_after, no turn)
    spec, obs, view = situation(claim=N2, test=None, peers={N2: _peer()})
    target_view = attrs.evolve(with_intents(view, attrs.evolve(MOVE, target=ME)),
                               claims={"web": Claim(group="web", node=ME, generation=4, token="4")})
    p = plan(spec, obs, target_view, NOW)
    assert kinds(p) == [("start", "t")]
    # ...and, once it runs there, removes the intent: the move is done
    spec, obs, _ = situation(claim=ME, running=True)
    p = plan(spec, obs, target_view, NOW)
    assert [(a.kind, a.intent) for a in p.actions] == [("forget", attrs.evolve(MOVE, target=ME))]
    assert "move done" in p.actions[0].reason


def _peer(**kw) -> object:
    from test_plan_table import Peer

    return Peer(**kw)


@pytest.mark.parametrize("peer, wall, why", [
    ({"eligible": False}, 1500.0, "refused: web's tests failed on n2"),
    ({"age": 5.0}, 1500.0, "refused: n2 is not alive"),
    ({}, 2000.0, "timed out"),
])
def test_a_move_that_cannot_happen_keeps_the_group_and_ends(peer, wall, why):
    spec, obs, view = situation(claim=ME, running=True, peers={N2: _peer(**peer)})
    p = plan(spec, obs, with_intents(view, MOVE, wall=wall), NOW)
    assert not any(a.kind in ("stop", "handover") for a in p.actions)
    forget = [a for a in p.actions if a.kind == "forget"]
    assert len(forget) == 1 and why in forget[0].reason and "stays on n1" in forget[0].reason


def test_a_handed_over_claim_is_not_stale_while_the_lease_holds():
    claims = {"web": Claim(group="web", node=ME, generation=4, token="4")}
    assert viewrules.stale_at_read((), claims, node=ME, lease_until=NOW + 1, now=NOW, lapsed_at_start=False) == frozenset()
    # (after a lapse every claim of this node is re-arbitrated, handed or not: it cannot tell)
    assert viewrules.stale_at_read((), claims, node=ME, lease_until=NOW - 1, now=NOW, lapsed_at_start=False) == {"web"}


# --- standby ------------------------------------------------------------------------------------


def test_a_node_in_standby_claims_nothing_but_keeps_testing():
    spec, obs, view = situation(claim=None, unclaimed_for=10.0)
    assert kinds(plan(spec, obs, view, NOW)) == [("claim", "")]
    p = plan(spec, obs, with_intents(view, STANDBY_ME), NOW)
    assert p.actions == () and "standby" in p.notes["web"]
    spec, obs, view = situation(claim=None, test=None, unclaimed_for=10.0)
    assert kinds(plan(spec, obs, with_intents(view, STANDBY_ME), NOW)) == [("start", "t")]  # its fitness stays known


def test_a_node_in_standby_does_not_take_over_and_ranks_for_nothing():
    spec, obs, view = situation(claim=N2, peers={N2: _peer(age=10.0)})
    assert kinds(plan(spec, obs, view, NOW)) == [("takeover", "")]
    assert plan(spec, obs, with_intents(view, STANDBY_ME), NOW).actions == ()
    # n3 ranks after n1 (nodes order); with n1 in standby it acts at once
    spec, obs, view = situation(claim=None, nodes=(N2, N3), peers={N2: _peer()}, unclaimed_for=10.0)
    v3 = attrs.evolve(view, node=N3, members={N2: view.members[N2], ME: Member(name=ME, last_change=NOW)})
    assert kinds(plan(spec, attrs.evolve(obs, node=N3), with_intents(v3, Intent(kind="standby", id="s", node=N2)), NOW)) == [("claim", "")]


def test_the_owner_in_standby_hands_over_one_group_at_a_time():
    g2 = Group(name="api", runlevel="run", entries=ENTRIES)
    spec, obs, view = situation(claim=ME, running=False, test="stopped", peers={N2: _peer()})
    spec = attrs.evolve(spec, groups={**spec.groups, "api": g2})
    claims = {**view.claims, "api": Claim(group="api", node=ME, generation=1, token="1")}
    view = with_intents(attrs.evolve(view, claims=claims), STANDBY_ME)
    obs = attrs.evolve(obs, entries={**obs.entries, ("api", "s"): EntryState(group="api", tag="s", state="running", pid=9)})
    p = plan(spec, obs, view, NOW)
    assert [(a.kind, a.group, a.target) for a in p.actions if a.kind in ("handover", "stop")] == [("handover", "web", N2)]
    assert "handed over after web" in p.notes["api"]
    # a group no other node may take stays, and holds up none after it
    only_me = attrs.evolve(spec.groups["web"], nodes=(ME,))
    p = plan(attrs.evolve(spec, groups={"web": only_me, "api": g2}), obs, view, NOW)
    assert [(a.kind, a.group) for a in p.actions if a.kind in ("handover", "stop")] == [("stop", "api")]
    assert "no other node may take it" in p.notes["web"]
    # with no other eligible node it keeps what it runs
    spec1, obs1, view1 = situation(claim=ME, running=True)
    assert plan(spec1, obs1, with_intents(view1, STANDBY_ME), NOW).actions == ()


# --- maintenance ------------------------------------------------------------------------------

SCOPES = [Intent(kind="maintenance", id="m1"), Intent(kind="maintenance", id="m2", node="n1"),
          Intent(kind="maintenance", id="m3", node="n2")]


@given(st.data())
def test_in_maintenance_plan_returns_no_action_for_the_groups_in_scope(data):
    spec = data.draw(specs())
    obs = data.draw(observed_for(spec, busy=True))
    view, now = data.draw(any_view(spec, obs))
    names = sorted(set(spec.groups) | obs.groups())
    chosen = data.draw(st.lists(st.sampled_from([*SCOPES, *(Intent(kind="maintenance", id="g1", group=n) for n in names)]),
                                min_size=1, max_size=3, unique_by=lambda i: i.key))
    view = with_intents(view, *chosen)
    p = plan(spec, obs, view, now)
    for name in names:
        claim = view.claims.get(name)
        owner = claim.node if claim else None
        held = any(intents.covers(i.key, name, owner) or i.key == "maintenance/node/n1" for i in chosen)
        if held:
            assert p.for_group(name) == (), (name, p.for_group(name))
            assert name in obs.busy or "maintenance" in p.notes.get(name, "")


def test_a_peer_waits_for_the_owner_to_acknowledge_the_end_of_maintenance():
    spec, obs, view = situation(claim=N2, peers={N2: _peer(age=10.0)})
    acked = Heartbeat(node=N2, counter=1, status=NodeStatus(maintenance=("maintenance/node/n2",)))
    view = attrs.evolve(view, members={N2: attrs.evolve(view.members[N2], heartbeat=acked)})
    p = plan(spec, obs, view, NOW)
    assert p.actions == () and "not acknowledged the end of maintenance" in p.notes["web"]
    # the owner published the end: taken over as usual
    fine = attrs.evolve(acked, status=NodeStatus())
    assert kinds(plan(spec, obs, attrs.evolve(view, members={N2: attrs.evolve(view.members[N2], heartbeat=fine)}), NOW)) == [
        ("takeover", "")]
    # with a fence hook: fenced first, then taken over
    spec, obs, fview = situation(claim=N2, fence=("/bin/fence", "{node}"), peers={N2: _peer(age=10.0)})
    fview = attrs.evolve(fview, members={N2: attrs.evolve(fview.members[N2], heartbeat=acked)})
    [a] = plan(spec, obs, fview, NOW).actions
    assert a.kind == "takeover" and a.fence == ("/bin/fence", N2)


# --- --wait: pending ----------------------------------------------------------------------------


def _member(node: str, *, revision=0, groups=None, maintenance=()) -> Heartbeat:
    return Heartbeat(node=node, counter=1, status=NodeStatus(spec_revision=revision, groups=groups or {},
                                                             maintenance=maintenance))


def test_pending():
    spec, _, _ = situation()
    runs = {"web": GroupStatus(desired="run", actual="run", owner=N2)}
    claims = {"web": Claim(group="web", node=N2, generation=1)}
    members = {ME: _member(ME, revision=3), N2: _member(N2, revision=2, groups=runs)}
    p = intents.pending(spec, members, claims, {}, alive=[ME, N2], what="revision", revision=3)
    assert p.waiting == ("n2 runs revision 2, not 3",)
    members[N2] = _member(N2, revision=3, groups=runs)
    assert intents.pending(spec, members, claims, {}, alive=[ME, N2], what="revision", revision=3).done
    # a move: done once it runs on the target; failed once its intent is gone while it does not
    assert intents.pending(spec, members, claims, {}, alive=[ME, N2], what="move", subject="web", target=N2,
                           intent_id="a1").done
    mv = intents.pending(spec, members, claims, {"move/web": MOVE}, alive=[ME, N2], what="move", subject="web",
                         target=N3, intent_id="a1")
    assert mv.waiting and not mv.failed
    gone = intents.pending(spec, members, claims, {}, alive=[ME, N2], what="move", subject="web", target=N3, intent_id="a1")
    assert "refused or timed out" in gone.failed
    assert intents.pending(spec, members, claims, {}, alive=[ME, N2], what="standby", subject=N2).waiting == (
        "n2 still owns web",)
    members[ME] = _member(ME, revision=3, maintenance=("maintenance",))
    assert intents.pending(spec, members, claims, {}, alive=[ME, N2], what="maintenance-off").waiting == (
        "n1 has not acknowledged the end of maintenance",)
    assert intents.pending(spec, members, claims, {}, alive=[N2], what="maintenance-off").done  # n1 is not alive


def test_frozen_and_standby_sets():
    v = ClusterView(node=ME, intents={i.key: i for i in (Intent(kind="maintenance", id="m", group="web"), STANDBY_ME)})
    assert intents.frozen(v, "web", None).startswith("in maintenance (maintenance/group/web)")
    assert intents.frozen(v, "api", None) == ""
    assert intents.standby(v) == {ME}
    assert intents.maintenance(v) == ("maintenance/group/web",)
    assert OTHER == N2  # (the property tests' peer is n2: SCOPES name it)


@given(st.data())
def test_a_node_in_standby_never_claims_or_takes_over(data):
    spec = data.draw(specs())
    obs = data.draw(observed_for(spec, busy=True))
    view, now = data.draw(any_view(spec, obs))
    p = plan(spec, obs, with_intents(view, STANDBY_ME), now)
    assert not [a.describe() for a in p.actions if a.kind in ("claim", "takeover")]
    # and what it hands over goes to a node that is not in standby
    assert all(a.target not in (ME, "") for a in p.actions if a.kind == "handover")


NODES = (ME, N2, N3, "n4")


@given(st.data())
def test_move_target_is_always_an_eligible_other_node(data):
    nodes = tuple(data.draw(st.lists(st.sampled_from(NODES), unique=True, max_size=4)))
    peers = {n: {"eligible": data.draw(st.sampled_from((True, False, None))), "banned": data.draw(st.booleans()),
                 "age": data.draw(st.sampled_from((0.0, 5.0)))} for n in data.draw(st.lists(st.sampled_from(NODES), unique=True))}
    away = data.draw(st.lists(st.sampled_from(NODES), unique=True, max_size=2))
    spec, view = outside(claim=data.draw(st.sampled_from((ME, N2))), peers=peers, nodes=nodes,
                         failback=data.draw(st.booleans()), extra=tuple(Intent(kind="standby", id="s", node=n) for n in away))
    asked = data.draw(st.sampled_from((None, *NODES)))
    target, why = intents.move_target(spec, view, "web", asked, NOW)
    assert bool(target) != bool(why)
    if target:
        assert target != view.claims["web"].node and target not in away and (asked is None or target == asked)
        assert intents.refusal(spec.groups["web"], view, target, NOW, dead_after=T.dead_after) == ""
        assert not nodes or target in nodes
