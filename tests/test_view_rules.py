"""The view's derived facts (reconciler/decide/view.py), tested directly: decision tables and
properties, no agent, no clock (now is an argument)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, strategies as st

from reconciler.decide import view as rules
from reconciler.decide.identity import Verdict
from reconciler.model import Claim, ClusterView, Heartbeat, Member
from reconciler.published import EMPTY, NodeStatus

ME, PEER = "n1", "n2"
LEASE, HB = 0.4, 0.1  # the default timing: lease, heartbeat
OK = Verdict("ok", publish=True, claim=True, run=True, twin="")


def claims(**owners: str) -> dict[str, Claim]:
    return {g: Claim(group=g, node=n, generation=1) for g, n in owners.items()}


# --- stale claims ------------------------------------------------------------------------

def test_a_lapse_makes_every_claim_of_this_node_stale_and_only_those():
    c = claims(web=ME, db=PEER, mail=ME)
    assert rules.my_claims(c, ME) == {"web", "mail"}
    assert rules.stale_after_lapse(set(), c, node=ME) == {"web", "mail"}
    assert rules.stale_after_lapse({"old"}, c, node=ME) == {"old", "web", "mail"}  # (pruned at the next plan)


def test_stale_claims_are_pruned_to_those_still_mine():
    c = claims(web=ME, db=PEER)
    assert rules.stale_still_mine({"web", "db", "gone"}, c, node=ME) == {"web"}
    assert rules.stale_still_mine(set(), c, node=ME) == frozenset()


@given(st.dictionaries(st.sampled_from("abcdef"), st.sampled_from((ME, PEER, "n3"))),
       st.sets(st.sampled_from("abcdefgh")))
def test_stale_claims_are_always_this_nodes_after_pruning(owners, stale):
    c = claims(**owners)
    after = rules.stale_still_mine(rules.stale_after_lapse(stale, c, node=ME), c, node=ME)
    assert after == {g for g, n in owners.items() if n == ME}


@pytest.mark.parametrize("lease_until, started, lapsed", [
    (rules.NEVER, 5.0, False),  # never held: the first renewal, nothing to re-arbitrate
    (4.9, 5.0, True),
    (5.0, 5.0, False),  # valid to the instant the renewal began
    (5.1, 5.0, False),
])
def test_a_renewal_after_the_lease_ran_out(lease_until, started, lapsed):
    assert rules.renewal_after_lapse(lease_until, started) is lapsed


# --- the store unreachable when reads are overdue ----------------------------------------

@pytest.mark.parametrize("since_read, overdue", [
    (0.0, False), (0.2, False), (LEASE / 2 + HB, False),  # within lease / 2 + heartbeat
    (LEASE / 2 + HB + 0.001, True), (5.0, True),
])
def test_reads_are_overdue_after_half_a_lease_and_a_heartbeat(since_read, overdue):
    got = rules.read_overdue(100.0 + since_read, 100.0, lease=LEASE, heartbeat=HB)
    assert (got is not None) is overdue
    if overdue:
        assert got == pytest.approx(since_read)


def test_the_planning_view_carries_the_lease_and_stale_claims():
    view = ClusterView(node=ME, claims=claims(web=ME), lease_until=rules.NEVER)
    out = rules.planning_view(view, lease_until=12.0, stale=frozenset({"web"}), now=10.0, read_at=9.9, lease=LEASE,
                              heartbeat=HB, store_url="dir:/s")
    assert (out.lease_until, out.stale_claims, out.store_ok, out.store_error) == (12.0, {"web"}, True, "")
    assert out.claims is view.claims


def test_the_planning_view_says_the_store_is_unreachable_when_reads_are_overdue():
    view = ClusterView(node=ME)
    out = rules.planning_view(view, lease_until=12.0, stale=frozenset(), now=11.0, read_at=10.0, lease=LEASE,
                              heartbeat=HB, store_url="dir:/s")
    assert not out.store_ok and out.store_error == "dir:/s: no answer for 1.0s"
    # A view that already says why the store is unreachable keeps its own reason.
    failed = attrs.evolve(view, store_ok=False, store_error="dir:/s: injected")
    out = rules.planning_view(failed, lease_until=12.0, stale=frozenset(), now=11.0, read_at=10.0, lease=LEASE,
                              heartbeat=HB, store_url="dir:/s")
    assert out.store_error == "dir:/s: injected"


# --- quorum and the hpc id ---------------------------------------------------------------

@pytest.mark.parametrize("node, hpc_me, quorum", [
    ("1", None, True),  # no hpc membership: nothing to check
    ("1", "1", True),
    ("2", "1", False),  # the membership speaks of another node
])
def test_quorum_is_dropped_when_the_hpc_id_is_not_the_node_name(node, hpc_me, quorum):
    view = ClusterView(node=node)
    out = rules.checked_membership(view, hpc_me)
    assert out.quorum is quorum
    if quorum:
        assert out is view
    else:
        assert out.store_error == f"node name {node} is not this node's hpc id {hpc_me}"


# --- the identity verdict in the view ----------------------------------------------------

def test_the_verdict_shows_in_the_view_only_when_there_is_something_to_say():
    view = ClusterView(node=ME)
    assert rules.with_verdict(view, OK, published=True, skipped=()) is view
    held = Verdict("hold", publish=True, claim=False, run=True, twin="")
    out = rules.with_verdict(view, held, published=True, skipped=())
    assert (out.may_claim, out.may_run, out.may_release) == (False, True, True)
    twin = Verdict("yield", publish=False, claim=False, run=False, twin="another agent")
    out = rules.with_verdict(view, twin, published=True, skipped=("nodes/x",))
    assert (out.twin, out.may_claim, out.may_run, out.skipped) == ("another agent", False, False, ("nodes/x",))
    assert out.may_release is False
    assert rules.with_verdict(view, OK, published=True, skipped=("nodes/x",)).skipped == ("nodes/x",)


@pytest.mark.parametrize("state", ["watch", "hold", "ok", "incumbent", "yield"])
@pytest.mark.parametrize("published", [False, True])
def test_claims_under_this_name_may_be_ended_only_by_an_agent_that_has_published_and_does_not_yield(state, published):
    """A newcomer still watching its node record, or one that yields to a namesake, leaves
    the claims under the name alone: they may be the other agent's (it once released a live
    incumbent's claims while watching: the CI run of 2026-12-07)."""
    v = Verdict(state, publish=state != "yield", claim=state == "ok", run=state != "yield", twin="")
    out = rules.with_verdict(ClusterView(node=ME), v, published=published, skipped=())
    assert out.may_release is (published and state != "yield")


@pytest.mark.parametrize("lease_until, lapsed_at_start, stale", [
    (10.0, False, set()),  # a valid lease: the claims read are this agent's
    (10.0, True, {"web", "mail"}),  # the first read after a start whose lease had lapsed
    (5.0, False, {"web", "mail"}),  # read while the lease has run out
    (rules.NEVER, False, {"web", "mail"}),  # no lease yet (watching, yielding): a namesake's, maybe
])
def test_claims_read_without_a_valid_lease_are_stale(lease_until, lapsed_at_start, stale):
    c = claims(web=ME, db=PEER, mail=ME)
    out = rules.stale_at_read({"old"}, c, node=ME, lease_until=lease_until, now=5.0, lapsed_at_start=lapsed_at_start)
    assert out == {"old"} | stale


# --- the renewer and a stalled loop ------------------------------------------------------

@pytest.mark.parametrize("lease, stall", [(0.1, 2.0), (0.4, 2.0), (1.0, 2.0), (1.5, 3.0), (10.0, 20.0)])
def test_the_loop_stall_bound_is_two_leases_and_at_least_two_seconds(lease, stall):
    assert rules.loop_stall(lease) == stall


@pytest.mark.parametrize("alive_ago, stopped", [(0.0, False), (1.0, False), (2.0, False), (2.01, True), (60.0, True)])
def test_the_renewer_stops_renewing_when_the_loop_stalls(alive_ago, stopped):
    assert rules.renewal_stopped(50.0, 50.0 - alive_ago, stall=2.0) is stopped


def test_posts_to_the_loop_come_before_the_stall_bound():
    assert rules.post_after(2.0, 1.5) == 1.5
    assert rules.post_after(1.0, 1.5) == 0.75 < 1.0  # a short bound: well before it


@pytest.mark.parametrize("changed, alive_ago, posted_ago, post", [
    (True, 0.0, 0.0, True),  # a change always
    (False, 0.1, 10.0, False),  # the loop proved itself alive lately: no wake-up for nothing
    (False, 1.5, 10.0, True),  # not for post_after: a post that proves it alive
    (False, 1.5, 0.5, False),  # ...but not again within half of that
    (False, 1.5, 0.75, True),
])
def test_when_a_read_is_posted_to_the_loop(changed, alive_ago, posted_ago, post):
    now = 100.0
    assert rules.should_post(changed, now, loop_alive_at=now - alive_ago, posted_at=now - posted_ago,
                             post_after=1.5) is post


# --- the fingerprint of a view -----------------------------------------------------------

def member(name: str, last_change: float, status: NodeStatus = EMPTY) -> Member:
    return Member(name=name, last_change=last_change, heartbeat=Heartbeat(node=name, counter=1, status=status))


def test_the_fingerprint_changes_with_what_the_planner_plans_on():
    D = 0.65
    base = ClusterView(node=ME, members={PEER: member(PEER, 10.0, NodeStatus(eligible_groups=("web",)))},
                       claims=claims(web=PEER), lease_until=20.0)
    fp = rules.fingerprint(base, 10.1, dead_after=D)
    assert rules.fingerprint(base, 10.2, dead_after=D) == fp  # nothing changed
    # The same facts in a new read (other objects, equal values): no wake-up.
    again = attrs.evolve(base, members={PEER: member(PEER, 10.05, NodeStatus(eligible_groups=("web",)))})
    assert rules.fingerprint(again, 10.2, dead_after=D) == fp
    for changed, now in [
        (base, 10.0 + D),  # the peer died
        (attrs.evolve(base, members={PEER: member(PEER, 10.0, NodeStatus(eligible_groups=()))}), 10.1),
        (attrs.evolve(base, claims=claims(web=ME)), 10.1),
        (attrs.evolve(base, store_ok=False), 10.1),
        (attrs.evolve(base, quorum=False), 10.1),
        (attrs.evolve(base, twin="another agent"), 10.1),
        (attrs.evolve(base, may_claim=False), 10.1),
        (attrs.evolve(base, may_run=False), 10.1),
    ]:
        assert rules.fingerprint(changed, now, dead_after=D) != fp, changed
    # What the planner does not plan on (the error text, unclaimed_since, a status field
    # other than eligible_groups) wakes nothing.
    quiet = attrs.evolve(base, store_error="x", unclaimed_since={"db": 1.0},
                         members={PEER: member(PEER, 10.0, NodeStatus(eligible_groups=("web",), store_error="a peer's own"))})
    assert rules.fingerprint(quiet, 10.1, dead_after=D) == fp


# --- how long a group has waited for a claim (cluster/liveness.py) -------------------------

def test_a_group_waits_for_a_claim_only_while_it_is_desired_to_run():
    """A group set to stop, then to run again, gives its preferred node dead_after to claim it
    from then on, as at start; the time it spent stopped does not count (it once let the
    second candidate claim it at once)."""
    from reconciler.cluster.liveness import Liveness
    from reconciler.model import Snapshot

    live = Liveness(ME)
    view = live.update(Snapshot(claims={}), 1.0, groups=["web"], lease_until=10.0)
    assert view.unclaimed_since == {"web": 1.0}
    view = live.update(Snapshot(claims={}), 2.0, groups=[], lease_until=10.0)  # web: runlevel stop
    assert view.unclaimed_since == {}
    view = live.update(Snapshot(claims={}), 9.0, groups=["web"], lease_until=10.0)  # run again
    assert view.unclaimed_since == {"web": 9.0}
    view = live.update(Snapshot(claims=claims(web=PEER)), 9.5, groups=["web"], lease_until=10.0)
    assert view.unclaimed_since == {}
