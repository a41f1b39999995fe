"""Decision tables for the pure planner (reconciler/decide/plan.py): claim, takeover,
self-demotion and release.

Each row is one situation of one group, "web" (a leading test `t`, then a service `s`), seen
from node n1 at NOW with the default timing (dead_after 0.65 s, demote_margin 0.1 s), and the
actions plan() must return for it: (kind, tag, urgent), in order, plus what the row names of
the plan's note, the actions' deadline, fence argv or claim. Peers are built from a line of
their own: how long their heartbeat has stood still, whether the membership source has them
up, and what their published status says about "web".
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from reconciler.decide.plan import plan
from reconciler.model import Claim, ClusterView, EntryState, Heartbeat, Member, Observed
from reconciler.published import GroupStatus, NodeStatus
from reconciler.spec import Cluster, Entry, Group, Spec, Timing

NOW = 1000.0
ME, N2, N3 = "n1", "n2", "n3"
T = Timing()
DEAD = T.dead_after
# Just past a multiple of dead_after: NOW - (NOW - 0.65) is 0.649999... in floating point.
PAST = 1e-6
FENCE = ("/usr/local/sbin/fence", "{node}")
ENTRIES = (
    Entry(tag="t", runlevels=("run",), mode="test", command=("true",)),
    Entry(tag="s", runlevels=("run",), mode="respawn", command=("sleep", "100")),
)


class Peer(NamedTuple):
    age: float = 0.0  # seconds its heartbeat has stood still
    up: bool = True  # what the membership source says
    eligible: bool | None = True  # what it publishes about "web"
    active: bool = False
    reports: bool = True  # False: no status about "web" at all (not yet published)


def situation(
    *, claim: str | None = None, runlevel: str = "run", nodes: tuple[str, ...] = (), fence: tuple[str, ...] = (),
    failback: bool = False, test: str | None = "passed", running: bool = False, peers: dict[str, Peer] | None = None,
    unclaimed_for: float = 0.0, blocked: tuple[float, str] | None = None, in_spec: bool = True, **view: object,
) -> tuple[Spec, Observed, ClusterView]:
    """One group "web" as n1 sees it. `test`: the state of its leading test here (None: never
    run); `running`: its service runs here; `view`: ClusterView fields (quorum, lease_until...)."""
    g = Group(name="web", runlevel=runlevel, nodes=nodes, fence=fence, failback=failback, entries=ENTRIES)
    spec = Spec(cluster=Cluster(timing=T), groups={"web": g} if in_spec else {})
    entries = {}
    if test is not None:
        entries[("web", "t")] = EntryState(group="web", tag="t", state=test, since=NOW - 1, exit_code=0 if test == "passed" else 1)
    if running:
        entries[("web", "s")] = EntryState(group="web", tag="s", state="running", pid=4242, since=NOW - 5)
    obs = Observed(node=ME, entries=entries, blocked={"web": blocked} if blocked else {})
    members = {}
    for name, p in (peers or {}).items():
        groups = {"web": GroupStatus(eligible=p.eligible, active=p.active)} if p.reports else {}
        hb = Heartbeat(node=name, counter=7, status=NodeStatus(groups=groups))
        members[name] = Member(name=name, last_change=NOW - p.age, heartbeat=hb, up=p.up)
    claims = {"web": Claim(group="web", node=claim, generation=3, token="3")} if claim else {}
    unclaimed = {"web": NOW - unclaimed_for} if claim is None else {}
    return spec, obs, ClusterView(node=ME, members=members, claims=claims, unclaimed_since=unclaimed, **view)


def row(id: str, want: list[tuple[str, str, bool]], note: str = "", *, check: dict | None = None, **given: object):
    return pytest.param(given, want, note, check or {}, id=id)


CLAIM, START_T, STOP_S = ("claim", "", False), ("start", "t", False), ("stop", "s", False)
URGENT_STOP_S = ("stop", "s", True)
TAKEOVER, RELEASE = ("takeover", "", False), ("release", "", False)

CLAIMS = [
    row("alone-claims", [CLAIM], check={"reason": "candidate 1 of 1"}),
    row("tests-not-run-yet-runs-them", [START_T], "unclaimed; tests have not passed here yet", test=None),
    row("test-failed-no-claim", [], "unclaimed; a test failed here", test="failed"),
    row("rank0-of-two-claims", [CLAIM], nodes=(ME, N2), peers={N2: Peer()}),
    row("rank1-waits-for-rank0", [], f"unclaimed; {N2} should claim it", check={"wake_at": NOW + DEAD},
        nodes=(N2, ME), peers={N2: Peer()}),
    row("rank1-claims-after-1x-dead_after", [CLAIM], check={"reason": "candidate 2 of 2"},
        nodes=(N2, ME), peers={N2: Peer()}, unclaimed_for=DEAD + PAST),
    row("rank1-not-yet-at-0.9x-dead_after", [], f"{N2} should claim it", nodes=(N2, ME), peers={N2: Peer()},
        unclaimed_for=0.9 * DEAD),
    row("rank2-waits-2x-dead_after", [], f"{N2} should claim it", nodes=(N2, N3, ME), peers={N2: Peer(), N3: Peer()},
        unclaimed_for=1.5 * DEAD),
    row("rank2-claims-after-2x-dead_after", [CLAIM], nodes=(N2, N3, ME), peers={N2: Peer(), N3: Peer()},
        unclaimed_for=2 * DEAD + PAST),
    row("preferred-never-heard-from-ranks", [], "n9 should claim it", nodes=("n9", ME)),
    row("preferred-never-heard-from-after-dead_after", [CLAIM], nodes=("n9", ME), unclaimed_for=DEAD + PAST),
    row("preferred-peer-unfit-claims", [CLAIM], nodes=(N2, ME), peers={N2: Peer(eligible=False)}),
    row("preferred-peer-not-reported-yet-ranks", [], f"{N2} should claim it", nodes=(N2, ME),
        peers={N2: Peer(reports=False)}),
    row("preferred-peer-dead-claims", [CLAIM], nodes=(N2, ME), peers={N2: Peer(age=DEAD + PAST)}),
    row("preferred-peer-down-claims", [CLAIM], nodes=(N2, ME), peers={N2: Peer(up=False)}),
    row("running-elsewhere-no-claim", [], f"still running on {N2}", peers={N2: Peer(active=True)}),
    row("running-on-a-dead-peer-claims", [CLAIM], peers={N2: Peer(active=True, age=DEAD + PAST)}),
    row("runs-here-unclaimed-claims-back", [CLAIM], check={"reason": "runs here without a claim: claim it back"},
        running=True),
    row("runs-here-unclaimed-no-quorum-stops", [STOP_S], running=True, quorum=False),
    row("runs-here-unclaimed-test-failed-stops", [STOP_S], running=True, test="failed"),
    row("runs-here-claimed-elsewhere-urgent-stop", [URGENT_STOP_S], check={"deadline": NOW},
        running=True, claim=N2, peers={N2: Peer()}),
    row("no-quorum", [], "no quorum", quorum=False),
    row("store-unreachable", [], "store unreachable: etcd down", store_ok=False, store_error="etcd down"),
    row("membership-unreadable", [], "membership cannot be read: /proc/hpc/admin/mospe: No such file or directory",
        store_ok=False, store_error="/proc/hpc/admin/mospe: No such file or directory",
        membership_error="/proc/hpc/admin/mospe: No such file or directory"),
    row("lease-not-valid", [], "this node's lease is not valid", lease_until=NOW + T.demote_margin / 2),
    row("twin-claims-nothing", [], "another agent publishes as n1", may_claim=False, twin="another agent publishes as n1"),
    row("watching-own-record-first", [], "watching this node's record", may_claim=False),
    row("not-allowed", [], f"not allowed here (nodes = {N2})", nodes=(N2,), peers={N2: Peer()}),
    row("runlevel-stop-nothing", [], runlevel="stop", test=None),
    row("runlevel-stop-resets-records", [("reset", "t", False)], runlevel="stop", test="failed"),
    row("claim-attempt-blocked", [], "retry at +2.0s: claim refused", check={"wake_at": NOW + 2},
        blocked=(NOW + 2, "claim refused")),
    row("claim-block-over-claims", [CLAIM], blocked=(NOW - 1, "claim refused")),
]

TAKEOVERS = [
    row("owner-alive-waits", [], f"runs on {N2} (generation 3)", check={"wake_at": NOW - 0.2 + DEAD},
        claim=N2, peers={N2: Peer(age=0.2)}),
    row("unfenced-owner-dead-takes-over", [TAKEOVER], check={"fence": (), "claim_gen": 3, "reason": "its lease has run out"},
        claim=N2, peers={N2: Peer(age=DEAD + PAST)}),
    row("unfenced-owner-down-but-not-silent-waits", [], f"owner {N2} is dead; takeover pending",
        claim=N2, peers={N2: Peer(up=False, age=0.1)}),
    row("unfenced-owner-down-and-silent-takes-over", [TAKEOVER], claim=N2, peers={N2: Peer(up=False, age=DEAD + PAST)}),
    row("fenced-owner-dead-takes-over", [TAKEOVER], check={"fence": ("/usr/local/sbin/fence", N2), "reason": "fence it"},
        claim=N2, fence=FENCE, peers={N2: Peer(age=DEAD + PAST)}),
    row("fenced-owner-down-takes-over-at-once", [TAKEOVER], check={"fence": ("/usr/local/sbin/fence", N2), "reason": "is down"},
        claim=N2, fence=FENCE, peers={N2: Peer(up=False, age=0.1)}),
    row("owner-gone-from-the-store-takes-over", [TAKEOVER], check={"reason": "gone from the store (its heartbeat expired)"},
        claim=N2),
    row("fenced-owner-gone-from-the-store-fenced-at-once", [TAKEOVER],
        check={"fence": ("/usr/local/sbin/fence", N2), "reason": f"owner {N2} is gone from the store (its heartbeat expired): fence it"},
        claim=N2, fence=FENCE),
    row("unfenced-rank1-waits", [], f"owner {N2} is dead; takeover pending", check={"wake_at": NOW - 1.5 * DEAD + 2 * DEAD},
        claim=N2, nodes=(N3, ME), peers={N2: Peer(age=1.5 * DEAD), N3: Peer()}),
    row("unfenced-rank1-after-(1+1)x-dead_after", [TAKEOVER], claim=N2, nodes=(N3, ME),
        peers={N2: Peer(age=2 * DEAD + PAST), N3: Peer()}),
    row("fenced-rank1-waits", [], "takeover pending", claim=N2, fence=FENCE, nodes=(N3, ME),
        peers={N2: Peer(age=1.5 * DEAD), N3: Peer()}),
    row("fenced-rank1-after-(1+1)x-dead_after", [TAKEOVER], claim=N2, fence=FENCE, nodes=(N3, ME),
        peers={N2: Peer(age=2 * DEAD + PAST), N3: Peer()}),
    row("rank0-unfit-rank1-takes-over-at-once", [TAKEOVER], claim=N2, nodes=(N3, ME),
        peers={N2: Peer(age=DEAD + PAST), N3: Peer(eligible=False)}),
    row("owner-dead-not-eligible-here", [], f"owner {N2} is dead; this node is not eligible",
        claim=N2, test="failed", peers={N2: Peer(age=DEAD + PAST)}),
    row("owner-dead-tests-not-run-here", [START_T], "this node is not eligible", claim=N2, test=None, peers={N2: Peer(age=DEAD + PAST)}),
    row("owner-dead-no-quorum", [], "no quorum", claim=N2, peers={N2: Peer(age=DEAD + PAST)}, quorum=False),
    row("owner-dead-store-unreachable", [], "store unreachable", claim=N2, peers={N2: Peer(age=DEAD + PAST)}, store_ok=False),
    row("owner-dead-twin", [], "twin here", claim=N2, peers={N2: Peer(age=DEAD + PAST)}, may_claim=False, twin="twin here"),
    row("owner-dead-not-allowed", [], "not allowed here", claim=N2, nodes=(N3,), peers={N2: Peer(age=DEAD + PAST), N3: Peer()}),
    row("owner-dead-runlevel-stop", [], claim=N2, runlevel="stop", test=None, peers={N2: Peer(age=DEAD + PAST)}),
]

DEMOTIONS = [
    # (issue 16: the owner re-runs its leading test every retest: its one deadline)
    row("owner-converged-does-nothing", [], check={"wake_at": NOW - 1 + T.retest}, claim=ME, running=True),
    row("lease-ending-urgent-stop", [URGENT_STOP_S], check={"deadline": NOW + 0.05, "reason": "self-demotion: lease not renewed in time"},
        claim=ME, running=True, lease_until=NOW + 0.05),
    row("no-quorum-urgent-stop", [URGENT_STOP_S], check={"reason": "self-demotion: no quorum"},
        claim=ME, running=True, quorum=False, lease_until=NOW + 0.3),
    row("twin-urgent-stop", [URGENT_STOP_S], check={"reason": "self-demotion: twin!"},
        claim=ME, running=True, may_run=False, twin="twin!"),
    row("no-quorum-nothing-runs-releases", [RELEASE], check={"claim_gen": 3, "reason": "demoted (no quorum)"},
        claim=ME, quorum=False),
    row("lease-ending-nothing-runs-releases", [RELEASE], claim=ME, lease_until=NOW + 0.05),
    row("store-unreachable-nothing-runs-keeps", [], "claim generation 3 kept until the store answers",
        claim=ME, lease_until=NOW + 0.05, store_ok=False),
    row("twin-nothing-runs-keeps", [], "left alone: another agent under this name may hold it", claim=ME, may_run=False,
        may_release=False, twin="twin!"),
    # a newcomer still watching its node record holds no lease: the claim under its name is
    # the live namesake's, maybe, and is never ended from here
    row("watching-nothing-runs-leaves-the-names-claim", [], "left alone: another agent under this name may hold it",
        claim=ME, may_claim=False, may_release=False, lease_until=float("-inf")),
    row("watching-nothing-runs-stale-claim-left-alone", [], "left alone", claim=ME, may_claim=False, may_release=False,
        lease_until=float("-inf"), stale_claims=frozenset({"web"})),
]

RELEASES = [
    row("stale-claim-running-urgent-stop", [URGENT_STOP_S], check={"deadline": NOW, "reason": "outlived a lapse"},
        claim=ME, running=True, stale_claims=frozenset({"web"})),
    row("stale-claim-nothing-runs-releases", [RELEASE], check={"reason": "lease lapsed since generation 3 was won"},
        claim=ME, stale_claims=frozenset({"web"})),
    row("runlevel-stop-stops-first", [STOP_S], check={"reason": "desired runlevel is stop"}, claim=ME, running=True, runlevel="stop"),
    row("runlevel-stop-then-releases", [RELEASE], claim=ME, runlevel="stop"),
    row("no-longer-allowed-stops", [STOP_S], check={"reason": "no longer allowed"}, claim=ME, running=True, nodes=(N2,)),
    row("no-longer-allowed-releases", [RELEASE], claim=ME, nodes=(N2,)),
    row("test-failed-stops", [STOP_S], check={"reason": "a test failed here"}, claim=ME, running=True, test="failed"),
    row("test-failed-releases", [RELEASE], check={"reason": "a test failed here; nothing runs"}, claim=ME, test="failed"),
    row("failback-to-preferred-stops", [STOP_S], check={"reason": f"failback to preferred node {N2}"},
        claim=ME, running=True, failback=True, nodes=(N2, ME), peers={N2: Peer()}),
    row("failback-to-preferred-releases", [RELEASE], claim=ME, failback=True, nodes=(N2, ME), peers={N2: Peer()}),
    row("failback-off-stays", [], claim=ME, running=True, nodes=(N2, ME), peers={N2: Peer()}),
    row("failback-preferred-unfit-stays", [], claim=ME, running=True, failback=True, nodes=(N2, ME),
        peers={N2: Peer(eligible=False)}),
    row("failback-preferred-dead-stays", [], claim=ME, running=True, failback=True, nodes=(N2, ME), peers={N2: Peer(age=DEAD + PAST)}),
    row("failback-already-preferred-stays", [], claim=ME, running=True, failback=True, nodes=(ME, N2), peers={N2: Peer()}),
    row("removed-from-spec-stops", [STOP_S], check={"reason": "group removed from the spec"}, claim=ME, running=True, in_spec=False),
    row("removed-from-spec-no-quorum-urgent", [URGENT_STOP_S], claim=ME, running=True, in_spec=False, quorum=False),
    row("removed-from-spec-resets-and-releases", [("reset", "t", False), RELEASE], claim=ME, in_spec=False),
    row("removed-from-spec-twin-keeps-the-claim", [("reset", "t", False)], claim=ME, in_spec=False, may_run=False,
        may_release=False),
]


def _check(p, want, note, check):
    got = [(a.kind, a.tag, a.urgent) for a in p.actions]
    assert got == want, [a.describe() for a in p.actions]
    assert all(a.group == "web" for a in p.actions)
    if note:
        assert note in p.notes.get("web", ""), p.notes
    elif not want:
        assert "web" not in p.notes or check, p.notes
    for key, value in check.items():
        if key == "wake_at":
            assert p.wake_at == pytest.approx(value), p.wake_at
        elif key == "deadline":
            assert [a.deadline for a in p.actions] == [value] * len(p.actions)
        elif key == "fence":
            assert [a.fence for a in p.actions] == [value]
        elif key == "claim_gen":
            assert [a.claim.generation for a in p.actions] == [value]
        elif key == "reason":
            assert all(value in a.reason for a in p.actions), [a.reason for a in p.actions]
        else:
            raise AssertionError(f"unknown check {key}")


@pytest.mark.parametrize("given, want, note, check", CLAIMS)
def test_claim(given, want, note, check):
    _check(plan(*situation(**given), NOW), want, note, check)


@pytest.mark.parametrize("given, want, note, check", TAKEOVERS)
def test_takeover(given, want, note, check):
    _check(plan(*situation(**given), NOW), want, note, check)


@pytest.mark.parametrize("given, want, note, check", DEMOTIONS)
def test_self_demotion(given, want, note, check):
    _check(plan(*situation(**given), NOW), want, note, check)


@pytest.mark.parametrize("given, want, note, check", RELEASES)
def test_release(given, want, note, check):
    _check(plan(*situation(**given), NOW), want, note, check)


def test_busy_group_gets_only_urgent_actions():
    """A group whose previous actions still run is planned again after them, unless urgent."""
    spec, obs, view = situation(claim=ME, running=True, runlevel="stop")
    busy = Observed(node=ME, entries=obs.entries, busy=frozenset({"web"}))
    assert plan(spec, busy, view, NOW).actions == ()
    spec, obs, view = situation(claim=ME, running=True, quorum=False)
    busy = Observed(node=ME, entries=obs.entries, busy=frozenset({"web"}))
    assert [(a.kind, a.urgent) for a in plan(spec, busy, view, NOW).actions] == [("stop", True)]
