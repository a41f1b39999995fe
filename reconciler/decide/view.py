"""The view's derived facts: what this node's reads, lease and loop mean for the view it plans
with, and for its own renewals.

Pure: the cluster watch, the lease and the renewer (reconciler/cluster/) hold the state and
do the I/O; they ask these functions what it means. `now` is an argument (monotonic
seconds, this node's clock), as everywhere in the core.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from reconciler.decide import identity
from reconciler.decide.identity import Verdict
from reconciler.model import Claim, ClusterView

NEVER = float("-inf")  # a lease never held (no lease file, no renewal yet)


def my_claims(claims: Mapping[str, Claim], node: str) -> frozenset[str]:
    """The groups whose claim is this node's."""
    return frozenset(g for g, c in claims.items() if c.node == node)


def stale_after_lapse(stale: Iterable[str], claims: Mapping[str, Claim], *, node: str) -> frozenset[str]:
    """After a lapse of this node's lease every claim of its own is stale: peers may have
    taken them over meanwhile, so they are re-arbitrated before anything runs again."""
    return frozenset(stale) | my_claims(claims, node)


def stale_at_read(stale: Iterable[str], claims: Mapping[str, Claim], *, node: str, lease_until: float, now: float,
                  lapsed_at_start: bool) -> frozenset[str]:
    """The stale claims after a read that found `claims`. A claim under this node's name read
    while this agent holds no valid lease is not provably its own: a namesake it yielded to
    or watched (decide/identity.py) may have won it, or a peer may be taking it over. So is
    every claim at the first read after a start whose inherited lease had lapsed. Such claims
    are re-arbitrated (released, then claimed afresh) before anything runs under them."""
    if lapsed_at_start or lease_until <= now:
        return stale_after_lapse(stale, claims, node=node)
    return frozenset(stale)


def stale_still_mine(stale: Iterable[str], claims: Mapping[str, Claim], *, node: str) -> frozenset[str]:
    """The stale claims that are still this node's (the others have been re-arbitrated)."""
    return frozenset(stale) & my_claims(claims, node)


def renewal_after_lapse(lease_until: float, started: float) -> bool:
    """Does a renewal that began at `started` come after the lease ran out? (Never for a
    lease never held: the first renewal of a node with nothing to re-arbitrate.)"""
    return lease_until < started and lease_until != NEVER


def read_overdue(now: float, read_at: float, *, lease: float, heartbeat: float) -> float | None:
    """Seconds since the last successful read, if that is longer than lease / 2 + heartbeat
    (the renewer is stuck in a read: a hung store); None while reads come back in time."""
    overdue = now - read_at
    return overdue if overdue > lease / 2 + heartbeat else None


def planning_view(view: ClusterView, *, lease_until: float, stale: frozenset[str], now: float, read_at: float,
                  lease: float, heartbeat: float, store_url: str) -> ClusterView:
    """The view to plan with: this node's current lease and stale claims, and the store
    marked unreachable if no read has come back for too long (never plan with a view this
    old: no takeovers on it)."""
    overdue = read_overdue(now, read_at, lease=lease, heartbeat=heartbeat)
    if overdue is not None and view.store_ok:
        return attrs.evolve(view, lease_until=lease_until, stale_claims=stale, store_ok=False,
                            store_error=f"{store_url}: no answer for {overdue:.1f}s")
    return attrs.evolve(view, lease_until=lease_until, stale_claims=stale)


def checked_membership(view: ClusterView, hpc_me: str | None) -> ClusterView:
    """With hpc membership (`hpc_me`: this machine's id in /proc/hpc, None without it), a node
    name that is not this machine's id has no quorum: the membership speaks of another node."""
    if hpc_me is None or hpc_me == view.node:
        return view
    return attrs.evolve(view, quorum=False, store_error=f"node name {view.node} is not this node's hpc id {hpc_me}")


def with_verdict(view: ClusterView, verdict: Verdict, *, published: bool, skipped: tuple[str, ...]) -> ClusterView:
    """The node identity verdict (decide/identity.py; `published`: this agent has published
    under its name) and the read's skipped entries, in the view (the view itself while there
    is nothing to say: the usual case)."""
    may_release = identity.may_release(verdict, published=published)
    if verdict.twin or not verdict.claim or skipped or not may_release:
        return attrs.evolve(view, twin=verdict.twin, may_run=verdict.run, may_claim=verdict.claim,
                            may_release=may_release, skipped=skipped)
    return view


def loop_stall(lease: float) -> float:
    """How long the event loop may go without proving itself alive before the renewer stops
    renewing: a wedged agent then loses its lease (and the keeper stops its processes) as a
    dead one would. Two leases, and never under 2 s (a slow pass must not cost the lease)."""
    return max(2.0, 2 * lease)


def renewal_stopped(now: float, loop_alive_at: float, *, stall: float) -> bool:
    """Has the loop gone longer than `stall` without proving itself alive? (No renewal then.)"""
    return now - loop_alive_at > stall


def post_after(stall: float, most: float) -> float:
    """How long a loop may go without proof of life before the renewer posts to it: well
    before `stall`, and at most `most` seconds (a pass, once a tick, proves it too)."""
    return min(most, 0.75 * stall)


def should_post(changed: bool, now: float, *, loop_alive_at: float, posted_at: float, post_after: float) -> bool:
    """Post a read to the loop? When the view changed; otherwise only when the loop has not
    proved itself alive for post_after (and not posted to for half that): an idle loop is
    not woken for nothing."""
    return changed or (now - loop_alive_at >= post_after and now - posted_at >= post_after / 2)


def fingerprint(view: ClusterView, now: float, *, dead_after: float) -> object:
    """What, in a fresh view, should wake a reconcile when it differs from the last one.

    Compared with ==, which is cheap when nothing changed: a store hands back the very same
    claim and status objects while they are unchanged, and == on equal-by-identity values
    stops at the identity check (this runs on every heartbeat).
    """
    alive = frozenset(n for n in view.members if view.alive(n, now, dead_after))
    eligible = {n: m.heartbeat.status.eligible_groups for n, m in view.members.items() if m.heartbeat is not None}
    return (alive, eligible, view.claims, view.store_ok, view.quorum, view.twin, view.may_claim, view.may_run,
            view.may_release, view.spec_revision, view.intents)


# --- a look from outside the agent (`reconcile status`, `reconcile --dry-run`) ---------------
# A command has no history of the heartbeats: it reads the store again and again, a fraction
# of a heartbeat apart, and times the counters on its own clock as the agents do.

LOOK_HEARTBEATS = 2.5  # the least a look lasts while a member stands still


def silence(looked: float, wall_age: float | None) -> float:
    """How long a member whose counter stood still through a look of `looked` seconds has
    been silent, at the least: the look, or longer by the wall time it last published
    (`wall_age`, another machine's clock against ours: an estimate, never a verdict alone)."""
    return looked if wall_age is None else max(looked, wall_age)


def look_done(looked: float, silences: Iterable[float], *, heartbeat: float, dead_after: float) -> bool:
    """May a look end? At once when every member's counter moved (`silences`: those of the
    members that stood still); otherwise after LOOK_HEARTBEATS heartbeats, once every member
    that stood still throughout has been silent for dead_after (dead, as the agents judge),
    which a look of dead_after always ends."""
    still = list(silences)
    if not still:
        return True
    return looked >= LOOK_HEARTBEATS * heartbeat and all(s >= dead_after for s in still)
