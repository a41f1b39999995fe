"""The failsafe's rules: when a member promises an owner that cannot renew through the store,
when the owner may extend its lease on those promises, and what a promise means for the
member's own view of the owner (docs/design.md, "Store outages: promises").

Pure: the peer endpoint (cluster/peer.py), the promise book (cluster/promises.py) and the
owner's failsafe thread (cluster/failsafe.py) do the I/O and the clocks; they ask these
functions what it means. Monotonic times are this node's own clock; `wall` values are wall
clocks of two machines, which are only loosely synchronised (NTP): they serve only to refuse
stale and replayed messages, never to compute a deadline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from reconciler.model import ClusterView, Member

# A request's wall time may differ from the member's by this much (loosely synced clocks:
# NTP keeps them within milliseconds, a machine without NTP may drift by seconds); nonces
# are remembered for as long, so a replay within the window is caught by its nonce and one
# outside it by its time.
WINDOW = 30.0
# "Reached the store recently": a successful round trip (publish + read) within this many
# heartbeats. The renewer makes one every heartbeat; one missed beat is a blip, not an outage.
RECENT_HEARTBEATS = 2.0
BUDGET_FRACTION = 0.5  # the owner waits at most this fraction of a heartbeat for the answers


@attrs.frozen
class Request:
    """An owner's "promise not to break my claims for `duration` seconds" (as received)."""

    sender: str
    receiver: str
    wall: float  # the sender's wall clock when it sent it
    nonce: str
    duration: float


@attrs.frozen
class Promise:
    """Given: this member will not break `owner`'s claims before `deadline` + dead_after
    (`deadline`: the member's monotonic clock)."""

    owner: str
    deadline: float


@attrs.frozen
class Refusal:
    reason: str


def store_recent(now: float, round_trip_at: float, *, heartbeat: float) -> bool:
    """Did this node reach the store recently (its last successful round trip, publish and
    read, began at `round_trip_at`)? Then it refuses to promise: it may be the one to take over."""
    return now - round_trip_at < RECENT_HEARTBEATS * heartbeat


def answer(request: Request, *, me: str, now: float, wall: float, members: Iterable[str], round_trip_at: float,
           heartbeat: float, lease: float, seen: bool, taking_over: Iterable[str] = ()) -> Promise | Refusal:
    """The member's answer to an authenticated `request` (its MAC checked by the channel).

    `members`: the nodes this member knows from the store (its last good view); `seen`: the
    nonce is in the replay cache; `taking_over`: owners whose claims this node is breaking
    right now (a takeover planned before the request came: it must not promise them).
    A promise lasts `request.duration` from now on this member's clock, never longer than
    one `lease` (a promise outlives neither a reboot nor a lost owner for long)."""
    if request.receiver != me:
        return Refusal(f"addressed to {request.receiver!r}, not to this node")
    if request.sender == me or request.sender not in set(members):
        return Refusal(f"sender {request.sender!r} is not a recorded member")
    if abs(wall - request.wall) > WINDOW:
        return Refusal(f"its time is {request.wall - wall:+.1f}s off this node's clock (more than {WINDOW:.0f}s)")
    if seen:
        return Refusal("a replay (its nonce was seen already)")
    if not 0 < request.duration <= lease:
        return Refusal(f"duration {request.duration!r} is not within (0, lease = {lease}]")
    if store_recent(now, round_trip_at, heartbeat=heartbeat):
        return Refusal("this node reaches the store")
    if request.sender in set(taking_over):
        return Refusal("this node is taking over the sender's claims")
    return Promise(owner=request.sender, deadline=now + request.duration)


def extension(sent_at: float, duration: float, answers: Mapping[str, Promise | Refusal | None], *, members: Iterable[str],
              me: str, clock_slack: float) -> float | None:
    """Until when the owner may run on its peers' promises, asked at `sent_at` (its clock,
    before the first request left) for `duration`: only when every recorded member other
    than itself promised (a member missing from `answers` or None: no answer). Then
    sent_at + duration x (1 - clock_slack): every delay after sent_at only makes each
    member's own deadline (its receipt + duration) later in real time, and the slack covers
    the two clocks' rates. A cluster of one has nobody to vouch for it: None."""
    others = set(members) - {me}
    if not others:
        return None
    if not all(isinstance(answers.get(n), Promise) for n in others):
        return None
    return sent_at + duration * (1.0 - clock_slack)


def ask_at(lease_until: float, *, demote_margin: float, heartbeat: float) -> float:
    """When the owner asks its peers, if no renewal moved its lease on meanwhile: a heartbeat
    and an answer budget before its self-demotion deadline, so that one more round still
    fits before the loop would demote."""
    return lease_until - demote_margin - heartbeat - BUDGET_FRACTION * heartbeat


def live(promises: Mapping[str, float], now: float, *, dead_after: float) -> dict[str, float]:
    """The promises (owner -> deadline) that still bind: until deadline + dead_after."""
    return {o: d for o, d in promises.items() if now < d + dead_after}


def honour(view: ClusterView, promises: Mapping[str, float]) -> ClusterView:
    """The view with each promised owner's heartbeat counted as last seen no earlier than the
    promise's deadline: breaking its claims then waits deadline + dead_after, the budget that
    protects a paused owner. A promised owner the view no longer lists (etcd dropped its
    record with its lease during the outage) counts as a member last seen then: a claim of
    its that outlived the outage (a fenced group's) is not broken before then either. And the
    view carries the latest deadline (promised_until): plan claims no unclaimed group before
    it + dead_after (the owner's claim may have vanished with its lease, its group running
    on). The view itself when no promise changes anything."""
    if not promises:
        return view
    members = dict(view.members)
    changed = False
    for owner, deadline in promises.items():
        m = members.get(owner)
        if m is None and owner != view.node:
            members[owner] = Member(name=owner, last_change=deadline)
            changed = True
        elif m is not None and m.last_change < deadline:
            members[owner] = attrs.evolve(m, last_change=deadline)
            changed = True
    until = max(promises.values())
    if until > view.promised_until:
        return attrs.evolve(view, members=members, promised_until=until)
    return attrs.evolve(view, members=members) if changed else view


def takeovers_of(actions: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The owners whose claims planned takeovers break ((kind, claim's node) pairs)."""
    return frozenset(node for kind, node in actions if kind == "takeover")


def describe(*, unreachable_for: float, promised_by: Iterable[str], until: float, now: float) -> str:
    """The status line of a node running on promises."""
    return (f"store unreachable for {unreachable_for:.0f} s; running on promises from {', '.join(sorted(promised_by))} "
            f"until {until - now:+.2f} s")
