"""A look at the cluster from outside an agent (`reconcile status`, `reconcile --dry-run`):
which members are alive, judged from the heartbeat counters in the store as the agents judge
them, never from what one node publishes about the others.

The store is read again and again, half a heartbeat apart, on this machine's clock: a member
whose counter moves is alive; one whose counter stands still is dead once it has been silent
for dead_after (decide/view.py: `look_done`, `silence`). A look of a live cluster lasts a
heartbeat or so; one with a dead member at most dead_after.
"""

from __future__ import annotations

import asyncio
import time

import attrs

from reconciler import spec as specmod
from reconciler.decide import view as rules
from reconciler.model import Snapshot
from reconciler.published import SpecRevision
from reconciler.store import Store, directory
from reconciler.store.factory import open_store


@attrs.frozen
class Look:
    snapshot: Snapshot  # the last read
    ended: float  # monotonic time of the last read
    advanced: frozenset[str] = frozenset()  # members whose heartbeat counter moved: alive
    # members whose counter stood still throughout -> seconds silent, at the least
    silent: dict[str, float] = attrs.field(factory=dict)


def open_spec_store(spec: specmod.Spec) -> Store:
    """The store the spec names, with its options."""
    if spec.store_url.startswith("dir:"):
        return open_store(spec.store_url)
    c = spec.cluster
    return open_store(spec.store_url, prefix=c.etcd_prefix, ca=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key,
                      user=c.etcd_user, password=c.etcd_password, lease=c.timing.lease)


async def look(store: Store, *, heartbeat: float, dead_after: float) -> Look:
    """Read `store` until every member is known alive or dead (StoreError if a read fails)."""
    first = await store.read()
    start = time.monotonic()
    while True:
        await asyncio.sleep(max(0.01, heartbeat / 2))
        snap = await store.read()
        now, wall = time.monotonic(), time.time()
        advanced = frozenset(n for n, hb in snap.members.items()
                             if n not in first.members or hb.counter != first.members[n].counter)
        silent = {
            n: rules.silence(now - start, max(0.0, wall - hb.wall) if hb.wall is not None else None)
            for n, hb in snap.members.items() if n not in advanced
        }
        if rules.look_done(now - start, silent.values(), heartbeat=heartbeat, dead_after=dead_after):
            return Look(snapshot=snap, ended=now, advanced=advanced, silent=silent)


def never_set_up(spec: specmod.Spec) -> bool:
    """A directory store no agent has set up yet (it holds nothing: no spec, no member)."""
    return spec.store_url.startswith("dir:") and directory.never_set_up(spec.store_url[4:])


async def current_revision(spec: specmod.Spec) -> SpecRevision | None:
    """The store's current cluster spec revision (None: it holds none, or was never set up)."""
    if never_set_up(spec):
        return None
    store = open_spec_store(spec)
    try:
        return await store.spec_get()
    finally:
        await store.close()


async def look_at(spec: specmod.Spec) -> Look:
    """A look at the store the spec names (an empty cluster before any agent set it up)."""
    if never_set_up(spec):
        return Look(snapshot=Snapshot(), ended=time.monotonic())  # the first agent sets it up
    store = open_spec_store(spec)
    try:
        t = spec.cluster.timing
        return await look(store, heartbeat=t.heartbeat, dead_after=t.dead_after)
    finally:
        await store.close()
