"""What changed between two successive views, for the log and for systemd's status line.

The agent's log says what happened (the store became unreachable and came back, a peer died
and came back, a claim was won or lost, the membership could not be read), each once per
transition. Those are facts of two successive views, not of one: `step` compares what the
last view said (a `Seen`) with the next view and returns the changes, with the new `Seen`.
The loop keeps the `Seen` and logs what comes back. Pure: `now` is an argument (monotonic
seconds, this node's clock).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from reconciler.model import ClusterView

STORE_LOST = "store-lost"
STORE_BACK = "store-back"
PEER_DEAD = "peer-dead"
PEER_BACK = "peer-back"
PEER_NEW = "peer-new"
CLAIM_HELD = "claim-held"  # held already when the agent started (its predecessor's)
CLAIM_WON = "claim-won"
CLAIM_LOST = "claim-lost"
MEMBERSHIP_FAILED = "membership-failed"
MEMBERSHIP_OK = "membership-ok"


@attrs.frozen
class Change:
    kind: str
    subject: str = ""  # the node or the group it is about
    detail: str = ""  # the error; for a lost claim, who holds it now ("" if nobody)
    seconds: float | None = None  # how long the store was unreachable / the peer silent
    generation: int = 0  # a claim's


@attrs.frozen
class Seen:
    """What the previous view said, as far as `step` compares it."""

    store_ok: bool = True
    store_lost_at: float = 0.0
    membership_error: str = ""
    alive: frozenset[str] | None = None  # live peers; None before the first view
    silent_since: Mapping[str, float] = attrs.field(factory=dict)  # dead peer -> when its heartbeat last moved
    mine: Mapping[str, int] = attrs.field(factory=dict)  # this node's claims: group -> generation

    @property
    def first(self) -> bool:
        return self.alive is None


def store_reachable(view: ClusterView) -> bool:
    """Did the store answer? A membership that cannot be read also makes the view's store_ok
    False (nothing is taken over without it), but it is not the store's fault: it is
    reported as a membership error, not as an outage of the store."""
    return view.store_ok or (view.membership_error != "" and view.store_error == view.membership_error)


def live_peers(view: ClusterView, now: float, dead_after: float) -> frozenset[str]:
    return frozenset(n for n in view.members if n != view.node and view.alive(n, now, dead_after))


def step(seen: Seen, view: ClusterView, *, now: float, dead_after: float) -> tuple[Seen, tuple[Change, ...]]:
    """The changes from what `seen` says to `view`, and what to remember of `view`."""
    changes: list[Change] = []
    membership_error = view.membership_error

    store_ok, lost_at = store_reachable(view), seen.store_lost_at
    if seen.store_ok and not store_ok:
        changes.append(Change(STORE_LOST, detail=view.store_error))
        lost_at = now
    elif store_ok and not seen.store_ok:
        changes.append(Change(STORE_BACK, seconds=now - seen.store_lost_at))

    if membership_error and membership_error != seen.membership_error:
        changes.append(Change(MEMBERSHIP_FAILED, detail=membership_error))
    elif seen.membership_error and not membership_error:
        changes.append(Change(MEMBERSHIP_OK))

    # Peers: judged only on a view read from the store (an unreachable store tells nothing
    # new about them: its view keeps the last read's members).
    alive = live_peers(view, now, dead_after) if store_ok or seen.first else seen.alive
    assert alive is not None
    silent_since = dict(seen.silent_since)
    if not seen.first:
        assert seen.alive is not None
        for n in sorted(seen.alive - alive):
            m = view.members.get(n)
            if m is None:
                changes.append(Change(PEER_DEAD, n, detail="no longer in the store"))
                continue
            silent_since[n] = m.last_change
            changes.append(Change(PEER_DEAD, n, detail="" if m.up else "down in the membership",
                                  seconds=now - m.last_change))
        for n in sorted(alive - seen.alive):
            since = silent_since.pop(n, None)
            if since is None:
                changes.append(Change(PEER_NEW, n))
            else:
                changes.append(Change(PEER_BACK, n, seconds=view.members[n].last_change - since))
    for n in list(silent_since):
        if n not in view.members:
            del silent_since[n]  # gone from the store: a later return is a new peer

    mine = {g: c.generation for g, c in view.claims.items() if c.node == view.node}
    for g in sorted(set(seen.mine) | set(mine)):
        before, after = seen.mine.get(g), mine.get(g)
        if before == after:
            continue
        if before is not None:
            holder = view.claims.get(g)
            changes.append(Change(CLAIM_LOST, g, generation=before,
                                  detail=holder.node if holder is not None and holder.node != view.node else ""))
        if after is not None:
            changes.append(Change(CLAIM_HELD if seen.first else CLAIM_WON, g, generation=after))

    new = Seen(store_ok=store_ok, store_lost_at=lost_at, membership_error=membership_error, alive=alive,
               silent_since=silent_since, mine=mine)
    return new, tuple(changes)


def _silence(c: Change) -> str:
    return f", silent for {_duration(c.seconds)}" if c.seconds is not None else ""


# Each change's words: (the change, the node that saw it) -> the log line.
_LINES: dict[str, Callable[[Change, str], str]] = {
    STORE_LOST: lambda c, node: f"store unreachable: {c.detail}",
    STORE_BACK: lambda c, node: f"store reachable again after {_duration(c.seconds)}",
    MEMBERSHIP_FAILED: lambda c, node: f"membership cannot be read: {c.detail}",
    MEMBERSHIP_OK: lambda c, node: "membership readable again",
    PEER_DEAD: lambda c, node: f"peer {c.subject} dead ({c.detail or 'heartbeat stopped'}{_silence(c)})",
    PEER_BACK: lambda c, node: f"peer {c.subject} alive again after {_duration(c.seconds)} of silence",
    PEER_NEW: lambda c, node: f"peer {c.subject} joined",
    CLAIM_HELD: lambda c, node: f"claim on {c.subject} held by {node} (generation {c.generation})",
    CLAIM_WON: lambda c, node: f"claim won: {c.subject} (generation {c.generation})",
    CLAIM_LOST: lambda c, node: f"claim lost: {c.subject} (generation {c.generation})" + (f": now {c.detail}'s" if c.detail else ""),
}


def describe(change: Change, *, node: str) -> str:
    """The log line's text for `change` (seen from `node`)."""
    return _LINES[change.kind](change, node)


# What each change is worth in the log: an outage and a death are warnings, recoveries info.
SEVERITY = {
    STORE_LOST: "warning", STORE_BACK: "info", MEMBERSHIP_FAILED: "error", MEMBERSHIP_OK: "info",
    PEER_DEAD: "warning", PEER_BACK: "info", PEER_NEW: "info",
    CLAIM_HELD: "info", CLAIM_WON: "info", CLAIM_LOST: "warning",
}


def severity(change: Change) -> str:
    """A claim this node released is news, not a warning; one a peer took is."""
    if change.kind == CLAIM_LOST and not change.detail:
        return "info"
    return SEVERITY[change.kind]


def summary(view: ClusterView, now: float, dead_after: float) -> str:
    """One line for systemd's STATUS=: "owning 3 groups, 5 members live" (+ what is wrong)."""
    owned = sum(1 for c in view.claims.values() if c.node == view.node)
    live = len(live_peers(view, now, dead_after)) + (1 if view.alive(view.node, now, dead_after) else 0)
    text = f"owning {owned} group{'' if owned == 1 else 's'}, {live} member{'' if live == 1 else 's'} live"
    if view.membership_error:
        text += f"; membership cannot be read: {view.membership_error}"
    elif not view.store_ok:
        text += f"; store unreachable: {view.store_error}"
    elif not view.quorum:
        text += "; no quorum"
    return text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"
