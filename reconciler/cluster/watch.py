"""The cluster as this node last read it: liveness, the current ClusterView, when the last
read came back, and whether a read changed anything the planner cares about.

The renewer thread takes each read in (`apply_read`), the executor's claim events
(`set_claim`) come from the loop; either way the view is replaced whole, never modified in
place, so the loop can take `view` at any moment. The loop plans with `planning_view()`:
this node's current lease and stale claims, and the store marked unreachable if reads have
stopped coming back (decide/view.py says when).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import attrs

from reconciler import spec as specmod
from reconciler.cluster import hpc as hpcmod
from reconciler.cluster.instance import Instance
from reconciler.cluster.lease import Lease
from reconciler.cluster.liveness import Liveness
from reconciler.decide import failsafe as failsaferules
from reconciler.decide import view as rules
from reconciler.model import Claim, ClusterView, Snapshot
from reconciler.published import Intent


class Watch:
    """The view of `node`, read from the store at `store_url` under the current spec."""

    def __init__(self, node: str, *, spec: Callable[[], specmod.Spec], store_url: str, lease: Lease,
                 instance: Instance, clock: Callable[[], float] = time.monotonic):
        self.node = node
        self._spec = spec
        self._store_url = store_url
        self._lease = lease
        self._instance = instance
        self._clock = clock
        self.liveness = Liveness(node)
        self.view = ClusterView(node=node, lease_until=rules.NEVER, store_ok=False, store_error="not read yet")
        self.read_at = 0.0  # monotonic time of the last successful store read
        self._fingerprint: object = None
        self._membership_error = ""  # the last membership read's ("" when read, or no hpc membership)
        # The promises this node holds to owners (owner -> deadline; the failsafe's, when on):
        # each plan honours them (decide/failsafe.honour).
        self.promises: Callable[[], Mapping[str, float]] = dict

    def read_membership(self) -> tuple[hpcmod.HpcView | None, str]:
        """(the /proc/hpc view, "") or (None, why not); (None, "") without hpc membership."""
        spec = self._spec()
        if not spec.cluster.membership.startswith("hpc:"):
            self._membership_error = ""
            return None, ""
        try:
            hpc = hpcmod.read(spec.path(spec.cluster.membership[4:]))
        except hpcmod.MembershipError as exc:
            self._membership_error = str(exc)
            return None, self._membership_error
        self._membership_error = ""
        return hpc, ""

    def apply_read(self, snap: Snapshot | None, error: str, hpc: hpcmod.HpcView | None) -> bool:
        """Take a read (None: it failed, `error` says why) into the view; True if the planner
        should look at it."""
        spec = self._spec()
        if snap is None:
            self.view = attrs.evolve(self.view, store_ok=False, store_error=error, membership_error=self._membership_error)
            self._fingerprint = None
            return True
        now = self._clock()
        self._lease.note_read(snap.claims)
        view = self.liveness.update(
            # (a group desired to stop is not waiting for a claim: when it is set to run again,
            # its preferred node gets dead_after to claim it first, as after a start)
            snap, now, groups=[n for n, g in spec.groups.items() if g.runlevel != specmod.STOP], lease_until=self._lease.until,
            hpc=hpc,
            stale_claims=self._lease.stale(), store_ok=not error, store_error=error,
        )
        view = rules.checked_membership(view, None if hpc is None else hpc.me)
        verdict = self._instance.fold(snap, now)
        view = rules.with_verdict(view, verdict, published=self._instance.published_at is not None, skipped=snap.skipped)
        if self._membership_error:
            view = attrs.evolve(view, membership_error=self._membership_error)
        if snap.spec_revision != view.spec_revision:
            view = attrs.evolve(view, spec_revision=snap.spec_revision)
        if snap.intents:
            view = attrs.evolve(view, intents=snap.intents, wall=time.time())
        self.view = view
        if not error:
            self.read_at = now
        fp = rules.fingerprint(view, now, dead_after=spec.cluster.timing.dead_after)
        # Kept even when equal: the next comparison then meets the objects this read
        # handed out (the same ones while nothing changes) and stops at identity checks.
        last, self._fingerprint = self._fingerprint, fp
        return fp != last

    def set_claim(self, group: str, claim: Claim | None) -> None:
        """The executor won (or lost) a claim: show it in the view before the next read."""
        claims = dict(self.view.claims)
        if claim is None:
            claims.pop(group, None)
        else:
            claims[group] = claim
        self.view = attrs.evolve(self.view, claims=claims)
        self._lease.discard_stale(group)

    def drop_intent(self, intent: Intent) -> None:
        """The executor removed this intent instance (or found it gone): out of the view
        before the next read, unless that already shows a newer one at its key."""
        current = self.view.intents.get(intent.key)
        if current is not None and current.id == intent.id:
            intents = dict(self.view.intents)
            del intents[intent.key]
            self.view = attrs.evolve(self.view, intents=intents)

    def planning_view(self) -> ClusterView:
        """The view to plan with (decide/view.py: planning_view)."""
        view = self.view
        lease_until, stale = self._lease.snapshot(view.claims)
        t = self._spec().cluster.timing
        view = rules.planning_view(view, lease_until=lease_until, stale=stale, now=self._clock(), read_at=self.read_at,
                                   lease=t.lease, heartbeat=t.heartbeat, store_url=self._store_url)
        return failsaferules.honour(view, self.promises())
