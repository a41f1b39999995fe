"""Issue 16, the pure rules: decide/health.py (unhealthy, counts, ban_until) and what plan()
does with them: restart an unhealthy entry, give a group up when it fails too often here,
leave a banned node out of placement, re-run the owner's leading tests."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from reconciler.decide import health
from reconciler.decide.plan import plan
from reconciler.model import EntryState, Failure, Probe
from reconciler.spec import Entry, Group, Health, Spec, Cluster

from test_plan_table import ENTRIES, ME, N2, NOW, T, Peer, situation

HTTP = Health(http="http://127.0.0.1:8080/", interval=1.0, timeout=0.5, failures=3, start_period=5.0)
SERVICE = Entry(tag="s", runlevels=("run",), mode="respawn", command=("sleep", "100"), health=HTTP)
RUNNING = EntryState(group="web", tag="s", state="running", pid=4242, since=NOW - 5)


# --- unhealthy and counts: a table --------------------------------------------------------------

@pytest.mark.parametrize("probe,state,want", [
    (None, RUNNING, ""),
    (Probe(pid=4242, failures=2, result="fail"), RUNNING, ""),
    (Probe(pid=4242, failures=3, result="fail", message="connection refused"), RUNNING,
     "unhealthy: http probe http://127.0.0.1:8080/ failed 3 times in a row: connection refused"),
    (Probe(pid=1111, failures=9, result="fail"), RUNNING, ""),  # a probe of the previous process
    (Probe(pid=4242, failures=3, result="fail"), attrs.evolve(RUNNING, state="stopping"), ""),
])
def test_unhealthy(probe, state, want):
    assert health.unhealthy(SERVICE, state, probe) == want


@pytest.mark.parametrize("at,passed,want", [
    (NOW + 1, False, False),  # within start_period
    (NOW + 4.99, False, False),
    (NOW + 5, False, True),  # start period over
    (NOW + 1, True, True),  # a probe passed since the start: the service is up
])
def test_counts(at, passed, want):
    assert health.counts(HTTP, started=NOW, at=at, passed=passed) is want


# --- ban_until: a table and properties -----------------------------------------------------------

G3 = Group(name="web", runlevel="run", entries=(SERVICE,), max_failures=3, failure_window=60.0, ban=300.0)


def fails(*times: float) -> tuple[Failure, ...]:
    return tuple(Failure(at=t, tag="s", cause="rapid_exit") for t in times)


@pytest.mark.parametrize("group,times,want", [
    (attrs.evolve(G3, max_failures=None), (1, 2, 3, 4, 5), None),  # unset: restart in place for ever
    (G3, (1, 2), None),
    (G3, (1, 2, 3), 303.0),
    (G3, (1, 30, 62), None),  # the first left the window before the third
    (G3, (1, 30, 60), 360.0),
    (G3, (1, 2, 3, 4, 5), 305.0),
    (G3, (1, 2, 3, 400, 401), 303.0),  # the old ones left the window: two new ones do not ban again
    (G3, (1, 2, 3, 400, 401, 402), 702.0),
    (attrs.evolve(G3, max_failures=1), (10,), 310.0),
])
def test_ban_until(group, times, want):
    assert health.ban_until(group, fails(*times)) == want


times_st = st.lists(st.floats(min_value=0, max_value=5000, allow_nan=False), max_size=30).map(sorted)


@settings(max_examples=300, deadline=None)
@given(times=times_st, m=st.integers(1, 5), window=st.floats(1, 500), ban=st.floats(1, 1000))
def test_a_ban_always_follows_max_failures_within_the_window(times, m, window, ban):
    g = attrs.evolve(G3, max_failures=m, failure_window=window, ban=ban)
    until = health.ban_until(g, fails(*times))
    if until is None:
        # never max_failures within any window
        assert all(sum(1 for u in times if t - window < u <= t) < m for t in times)
        return
    starts = [t for t in times if t + ban == until]
    assert starts
    start = starts[-1]
    assert sum(1 for u in times if start - window < u <= start) >= m


@settings(max_examples=200, deadline=None)
@given(times=times_st, m=st.integers(1, 5), window=st.floats(1, 500), ban=st.floats(1, 1000), now=st.floats(0, 7000))
def test_dropping_old_failures_changes_no_current_ban(times, m, window, ban, now):
    """The ledger drops failures before keep_since(now): whether the node is banned at `now`
    and later must not change (the answer for any time from `now` on)."""
    g = attrs.evolve(G3, max_failures=m, failure_window=window, ban=ban)
    times = [t for t in times if t <= now]
    whole = health.ban_until(g, fails(*times))
    kept = health.ban_until(g, fails(*(t for t in times if t >= health.keep_since(g, now))))
    assert (whole is not None and whole > now) == (kept is not None and kept > now)


# --- plan: restart, give up, ban ------------------------------------------------------------------

def web(**group: object) -> Group:
    return Group(name="web", runlevel="run", entries=(ENTRIES[0], SERVICE), **group)


def owner_situation(group: Group, *, probe: Probe | None = None, failures=(), bans=None, running=True, **kw):
    spec, obs, view = situation(claim=ME, running=running, **kw)
    spec = Spec(cluster=Cluster(timing=T), groups={"web": group})
    obs = attrs.evolve(obs, probes={("web", "s"): probe} if probe else {}, failures={"web": fails(*failures)} if failures else {},
                       bans=bans or {})
    return spec, obs, view


def acts(p):
    return [(a.kind, a.tag) for a in p.actions]


def test_an_unhealthy_entry_is_restarted_with_its_reason():
    p = plan(*owner_situation(web(), probe=Probe(pid=4242, failures=3, result="fail", message="timed out")), NOW)
    assert acts(p) == [("restart", "s")]
    assert p.actions[0].reason == "unhealthy: http probe http://127.0.0.1:8080/ failed 3 times in a row: timed out"


def test_a_failing_entry_below_the_threshold_is_left_alone():
    p = plan(*owner_situation(web(), probe=Probe(pid=4242, failures=2, result="fail")), NOW)
    assert acts(p) == []


def test_a_banned_owner_gives_the_group_up_gracefully_then_releases():
    g = web(max_failures=3)
    p = plan(*owner_situation(g, failures=(NOW - 3, NOW - 2, NOW - 1), bans={"web": NOW + 1799}), NOW)
    assert acts(p) == [("stop", "s")]
    assert not p.actions[0].urgent
    assert p.actions[0].reason.startswith("gave up: 3 failures within 10m (max_failures), banned here for 30m; the last: s rapid exit")
    p = plan(*owner_situation(g, failures=(NOW - 3, NOW - 2, NOW - 1), bans={"web": NOW + 1799}, running=False), NOW)
    assert acts(p) == [("release", "")]


def test_an_expired_ban_changes_nothing():
    p = plan(*owner_situation(web(max_failures=3), bans={"web": NOW - 1}), NOW)
    assert acts(p) == []


def banned_elsewhere(**kw):
    spec, obs, view = situation(**kw)
    spec = Spec(cluster=Cluster(timing=T), groups={"web": web(max_failures=3)})
    return spec, attrs.evolve(obs, bans={"web": NOW + 5}), view


def test_a_banned_node_does_not_claim_and_wakes_when_the_ban_ends():
    p = plan(*banned_elsewhere(), NOW)
    assert acts(p) == []
    assert p.notes["web"] == "banned here: 3 failures within 10m; `reconcile clear web` lifts it"
    assert p.wake_at == NOW + 5  # (before the standby's test re-run, NOW - 1 + retest)


def test_a_banned_node_does_not_take_over():
    p = plan(*banned_elsewhere(claim=N2, peers={N2: Peer(age=10.0)}), NOW)
    assert acts(p) == []


def test_a_banned_node_running_without_a_claim_stops_instead_of_claiming_back():
    p = plan(*banned_elsewhere(running=True), NOW)
    assert acts(p) == [("stop", "s")]


def test_a_peer_claims_at_once_when_the_better_node_is_banned():
    """n2 ranks first (`nodes`), publishes the ban: n1 claims without waiting dead_after."""
    spec, obs, view = situation(nodes=(N2, ME), peers={N2: Peer()})
    spec = Spec(cluster=Cluster(timing=T), groups={"web": attrs.evolve(web(max_failures=3), nodes=(N2, ME))})
    assert acts(plan(spec, obs, view, NOW)) == []  # n2 should claim it
    hb = view.members[N2].heartbeat
    status = attrs.evolve(hb.status, groups={"web": attrs.evolve(hb.status.groups["web"], banned=True)})
    members = {N2: attrs.evolve(view.members[N2], heartbeat=attrs.evolve(hb, status=status))}
    assert acts(plan(spec, obs, attrs.evolve(view, members=members), NOW)) == [("claim", "")]


def test_the_owner_re_runs_its_leading_test_every_retest():
    spec, obs, view = situation(claim=ME, running=True, lease_until=NOW + T.retest + 5)
    p = plan(spec, obs, view, NOW - 1 + T.retest)
    assert acts(p) == [("start", "t")]
    assert p.actions[0].reason.startswith("re-run test: passed")


def test_an_owner_whose_leading_test_failed_gives_the_group_up():
    p = plan(*situation(claim=ME, running=True, test="failed"), NOW)
    assert acts(p) == [("stop", "s")] and p.actions[0].reason == "a test failed here"


def test_a_restart_that_would_reach_max_failures_gives_the_group_up_instead():
    """No start just before the ban's stop: the restart's failure is recorded by the stop."""
    probe = Probe(pid=4242, failures=3, result="fail", message="timed out")
    p = plan(*owner_situation(web(max_failures=3), probe=probe, failures=(NOW - 3, NOW - 2)), NOW)
    assert acts(p) == [("stop", "s")]
    assert p.actions[0].reason.startswith("gave up: 3 failures within 10m (max_failures), banned here for 30m; the last: s unhealthy")
    assert p.actions[0].failure.startswith("unhealthy: http probe")
    p = plan(*owner_situation(web(max_failures=3), probe=probe, failures=(NOW - 3,)), NOW)
    assert acts(p) == [("restart", "s")] and p.actions[0].failure == p.actions[0].reason


def test_status_says_how_a_probed_entry_is_and_why_it_was_restarted():
    from reconciler.agent import overview
    from reconciler.published import EntryStatus

    e = EntryStatus(state="running", pid=7, health="failing", probe_failures=2, probe_message="Connection refused",
                    probe_since=990.0, restart_reason="unhealthy: tcp probe 127.0.0.1:5432 failed 3 times in a row: timed out")
    assert overview.entry_detail(e, 1000.0) == (
        "pid 7, health failing (2 in a row): Connection refused, since 10s ago,"
        " last restart: unhealthy: tcp probe 127.0.0.1:5432 failed 3 times in a row: timed out")
    assert overview.entry_detail(EntryStatus(state="running", pid=7, health="ok", probe_since=990.0), 1000.0) == "pid 7"
    assert overview.group_state(desired="run", owner="n1", owner_live=True, actual="run", entries=[e]) == overview.DEGRADED
    assert overview.group_state(desired="run", owner=None, owner_live=False, actual=None, banned_everywhere=True) == overview.FAILED
