"""The failsafe's rules (reconciler/decide/failsafe.py), tested directly: the member's answer,
the owner's extension and the honouring of a promise, as decision tables and properties (no
agent, no clock: `now` is an argument)."""

from __future__ import annotations

import attrs

import pytest
from hypothesis import given, strategies as st

from reconciler.decide import failsafe as rules
from reconciler.decide.plan import plan
from reconciler.model import Claim, ClusterView, EntryState, Heartbeat, Member, Observed
from reconciler.published import GroupStatus, NodeStatus
from reconciler.spec import Cluster, Entry, Group, Spec, Timing

ME, OWNER, N3 = "n2", "n1", "n3"
T = Timing()
NOW, WALL = 1000.0, 1.7e9
MEMBERS = (ME, OWNER, N3)


def request(**kw: object) -> rules.Request:
    base: dict[str, object] = dict(sender=OWNER, receiver=ME, wall=WALL, nonce="abc", duration=T.lease)
    base.update(kw)
    return rules.Request(**base)  # type: ignore[arg-type]


def answer(req: rules.Request | None = None, **kw: object) -> rules.Promise | rules.Refusal:
    base: dict[str, object] = dict(me=ME, now=NOW, wall=WALL, members=MEMBERS, round_trip_at=NOW - 1.0,
                                   heartbeat=T.heartbeat, lease=T.lease, seen=False, taking_over=())
    base.update(kw)
    return rules.answer(req or request(), **base)  # type: ignore[arg-type]


ANSWERS = [
    pytest.param({}, {}, "promise", id="store-unreachable-promises"),
    pytest.param({}, {"round_trip_at": NOW - 0.1}, "reaches the store", id="reaches-store-refuses"),
    pytest.param({}, {"round_trip_at": NOW - 2 * T.heartbeat}, "promise", id="two-missed-beats-promises"),
    pytest.param({"receiver": N3}, {}, "not to this node", id="misaddressed"),
    pytest.param({"sender": "stranger"}, {}, "not a recorded member", id="unknown-sender"),
    pytest.param({"sender": ME}, {}, "not a recorded member", id="from-itself"),
    pytest.param({"wall": WALL - 31}, {}, "off this node's clock", id="stale-time"),
    pytest.param({"wall": WALL + 31}, {}, "off this node's clock", id="future-time"),
    pytest.param({"wall": WALL - 29}, {}, "promise", id="loosely-synced-clock"),
    pytest.param({}, {"seen": True}, "replay", id="replayed-nonce"),
    pytest.param({"duration": T.lease * 2}, {}, "duration", id="longer-than-a-lease"),
    pytest.param({"duration": 0.0}, {}, "duration", id="zero-duration"),
    pytest.param({"duration": float("nan")}, {}, "duration", id="nan-duration"),
    pytest.param({}, {"taking_over": {OWNER}}, "taking over", id="taking-over-the-sender"),
    pytest.param({}, {"taking_over": {N3}}, "promise", id="taking-over-another"),
]


@pytest.mark.parametrize("req, kw, want", ANSWERS)
def test_the_member_answers(req, kw, want):
    got = answer(request(**req), **kw)
    if want == "promise":
        assert got == rules.Promise(owner=OWNER, deadline=NOW + request(**req).duration)
    else:
        assert isinstance(got, rules.Refusal) and want in got.reason, got


def test_the_owner_extends_only_on_every_members_promise():
    p = rules.Promise(owner=OWNER, deadline=0.0)
    no = rules.Refusal("this node reaches the store")
    ext = dict(members=(OWNER, ME, N3), me=OWNER, clock_slack=T.clock_slack)
    assert rules.extension(NOW, 0.4, {ME: p, N3: p}, **ext) == pytest.approx(NOW + 0.4 * (1 - T.clock_slack))
    assert rules.extension(NOW, 0.4, {ME: p, N3: no}, **ext) is None
    assert rules.extension(NOW, 0.4, {ME: p, N3: None}, **ext) is None  # no answer
    assert rules.extension(NOW, 0.4, {ME: p}, **ext) is None  # a member not even asked (no address)
    assert rules.extension(NOW, 0.4, {ME: p, N3: p, "extra": no}, **ext) is not None  # not a recorded member
    assert rules.extension(NOW, 0.4, {}, members=(OWNER,), me=OWNER, clock_slack=0.02) is None  # nobody vouches


def test_the_owner_asks_with_a_round_to_spare_before_demotion():
    at = rules.ask_at(NOW + T.lease, demote_margin=T.demote_margin, heartbeat=T.heartbeat)
    assert NOW < at < NOW + T.lease - T.demote_margin - T.heartbeat


@given(
    rate_owner=st.floats(0.99, 1.01), rate_member=st.floats(0.99, 1.01),
    delays=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=5), duration=st.floats(0.05, 5.0),
    start=st.floats(0, 1e5), offsets=st.lists(st.floats(-1e4, 1e4), min_size=6, max_size=6),
)
def test_an_extension_never_outlasts_any_members_promise_on_a_shared_clock(rate_owner, rate_member, delays, duration,
                                                                          start, offsets):
    """Real time t; each node's monotonic clock reads offset + rate x t, the rates within
    clock_slack of each other (0.99..1.01 is 2 %). The owner sends at real time `start`; member
    i receives after delays[i] and promises until its receipt + duration on its own clock;
    the owner extends to its send time + duration x (1 - slack). In real time the extension
    ends no later than every member's promise."""
    slack = 0.02
    owner_clock = lambda t: offsets[0] + rate_owner * t  # noqa: E731
    deadlines_real = []
    names = [f"m{i}" for i in range(len(delays))]
    for i, d in enumerate(delays):
        received = start + d
        member_now = offsets[1 + i % 5] + rate_member * received
        got = rules.answer(request(receiver=names[i], duration=duration), me=names[i], now=member_now, wall=WALL,
                           members=[OWNER, *names], round_trip_at=member_now - 10, heartbeat=0.1, lease=5.0, seen=False)
        assert isinstance(got, rules.Promise)
        deadlines_real.append((got.deadline - offsets[1 + i % 5]) / rate_member)
    answers = {n: rules.Promise(owner=OWNER, deadline=0.0) for n in names}
    until = rules.extension(owner_clock(start), duration, answers, members=[OWNER, *names], me=OWNER, clock_slack=slack)
    assert until is not None
    until_real = (until - offsets[0]) / rate_owner
    assert until_real <= min(deadlines_real) + 1e-6


def situation(*, age: float, promise: float | None, now: float = NOW) -> tuple[Spec, Observed, ClusterView]:
    """Group "web" claimed by OWNER (heartbeat still for `age` seconds), seen from ME, which
    holds a promise to OWNER until `promise` (None: none) and could run web."""
    entries = (Entry(tag="s", runlevels=("run",), mode="respawn", command=("sleep", "100")),)
    spec = Spec(cluster=Cluster(timing=T), groups={"web": Group(name="web", runlevel="run", entries=entries)})
    obs = Observed(node=ME, entries={})
    members = {OWNER: Member(name=OWNER, last_change=now - age, heartbeat=Heartbeat(
        node=OWNER, counter=7, status=NodeStatus(groups={"web": GroupStatus(eligible=True, active=True)})))}
    view = ClusterView(node=ME, members=members, claims={"web": Claim(group="web", node=OWNER, generation=3, token="3")},
                       lease_until=now + 10)
    return spec, obs, rules.honour(view, {OWNER: promise} if promise is not None else {})


def test_without_a_promise_a_silent_owner_is_taken_over():
    spec, obs, view = situation(age=T.dead_after + 0.01, promise=None)
    assert [a.kind for a in plan(spec, obs, view, NOW).actions] == ["takeover"]


@given(age=st.floats(0.0, 100.0), left=st.floats(-5.0, 5.0), after=st.floats(0.0, 10.0))
def test_a_member_with_a_live_promise_never_breaks_the_owners_claim_before_deadline_plus_dead_after(age, left, after):
    deadline = NOW + left
    now = NOW + after
    spec, obs, view = situation(age=age + after, promise=deadline, now=now)
    kinds = [a.kind for a in plan(spec, obs, view, now).actions]
    if now < deadline + T.dead_after:
        assert "takeover" not in kinds
    assert view.members[OWNER].last_change >= deadline


def test_promises_bind_until_deadline_plus_dead_after_then_are_dropped():
    promises = {OWNER: NOW, N3: NOW - 1.0}
    assert rules.live(promises, NOW + T.dead_after - 0.01, dead_after=T.dead_after) == {OWNER: NOW}
    assert rules.live(promises, NOW + T.dead_after, dead_after=T.dead_after) == {}


def test_honour_changes_nothing_without_promises_and_never_moves_a_heartbeat_back():
    _spec, _obs, view = situation(age=0.0, promise=None)
    assert rules.honour(view, {}) is view
    held = rules.honour(view, {OWNER: NOW - 5})  # an older deadline: the heartbeat is newer
    assert held.members == view.members
    assert rules.honour(view, {OWNER: NOW - 5}).promised_until == NOW - 5  # (the deadline, for claims)


def test_a_promised_owner_the_store_dropped_keeps_its_claims_and_nothing_unclaimed_is_claimed():
    """etcd dropped the owner's record (and its unfenced claims) with its lease during the
    outage: until the promise's deadline + dead_after, its surviving (fenced) claim is not
    broken and no group that lost its claim is claimed: the owner may still run them."""
    spec, obs, view = situation(age=0.0, promise=None)
    view = attrs.evolve(view, members={})
    for now, want in ((NOW + 1.0, []), (NOW + 2.0 + T.dead_after + 0.01, ["takeover"])):
        held = rules.honour(view, {OWNER: NOW + 2.0})
        assert held.members[OWNER].last_change == NOW + 2.0 and held.members[OWNER].heartbeat is None
        assert [a.kind for a in plan(spec, obs, held, now).actions] == want
        unclaimed = attrs.evolve(held, claims={})
        p = plan(spec, obs, unclaimed, now)
        if want:
            assert [a.kind for a in p.actions] == ["claim"]
        else:
            assert not p.actions and "promised a peer" in p.notes["web"] and p.wake_at == pytest.approx(NOW + 2.0 + T.dead_after)


def test_the_status_line():
    line = rules.describe(unreachable_for=12.2, promised_by=["n3", "n2"], until=NOW + 0.35, now=NOW)
    assert line == "store unreachable for 12 s; running on promises from n2, n3 until +0.35 s"
