"""Turn store snapshots into a ClusterView, timing heartbeats on this node's own clock.

A peer is alive while its heartbeat counter keeps advancing; when it advanced last is
measured here, by the observer, so no two machines need synchronised clocks.
"""

from __future__ import annotations

from reconciler.store import ClusterView, Member, Snapshot
from reconciler.cluster.hpc import HpcView


class Liveness:
    def __init__(self, node: str):
        self.node = node
        self._seen: dict[str, tuple[int, float]] = {}  # node -> (counter, when it last changed)
        self._unclaimed: dict[str, float] = {}
        self._last: tuple[object, object] = (None, None)  # (claims, groups) of the last update
        self._unclaimed_view: dict[str, float] = {}  # a copy of _unclaimed that views hold

    def update(
        self,
        snap: Snapshot,
        now: float,
        *,
        groups: list[str],  # the groups desired to run: how long each has been unclaimed counts only meanwhile
        lease_until: float,
        hpc: HpcView | None = None,
        stale_claims: frozenset[str] = frozenset(),
        store_ok: bool = True,
        store_error: str = "",
    ) -> ClusterView:
        members: dict[str, Member] = {}
        if hpc is not None:
            for name in hpc.configured:
                self._seen.setdefault(name, (-1, now))  # never seen: wait dead_after from now
        for name, hb in snap.members.items():
            prev = self._seen.get(name)
            if prev is None or prev[0] != hb.counter:
                self._seen[name] = (hb.counter, now)
        for name, (counter, changed) in self._seen.items():
            up = True if hpc is None else name in hpc.up
            members[name] = Member(name=name, last_change=changed, heartbeat=snap.members.get(name), up=up)
        # Unchanged claims (the store hands back the same dict) and groups: nothing to do.
        if snap.claims is not self._last[0] or groups != self._last[1]:
            self._last = (snap.claims, groups)
            for g in groups:
                if g in snap.claims:
                    self._unclaimed.pop(g, None)
                else:
                    self._unclaimed.setdefault(g, now)
            for g in [g for g in self._unclaimed if g not in groups]:
                del self._unclaimed[g]  # (no longer desired to run: its wait starts afresh)
            if self._unclaimed != self._unclaimed_view:
                self._unclaimed_view = dict(self._unclaimed)
        # Views and snapshots are never modified in place (whoever changes one copies it
        # first), so the view holds the snapshot's claims and the same unclaimed_since while
        # they stand still: no copies every heartbeat.
        return ClusterView(
            node=self.node,
            members=members,
            claims=snap.claims,
            lease_until=lease_until,
            quorum=True if hpc is None else (hpc.quorum and self.node in hpc.up),
            store_ok=store_ok,
            store_error=store_error,
            unclaimed_since=self._unclaimed_view,
            stale_claims=stale_claims,
        )
