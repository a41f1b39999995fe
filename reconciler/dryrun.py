"""`reconcile --dry-run`: what this node's agent would do now, executing nothing.

It observes exactly what the agent observes (the recorded processes, checked against the
kernel; mounts; addresses), reads the store twice a heartbeat apart to see which peers are
alive, and calls the same pure `plan`. `--node-down NODE` shows what would happen if those
nodes died: the decentralised counterpart of Pacemaker's crm_simulate.
"""

from __future__ import annotations

import asyncio
import time

import attrs

from reconciler import plan as planmod, spec as specmod
from reconciler.act import process
from reconciler.observe import EntryState, Observed
from reconciler.store import ClusterView, Member, hpc as hpcmod, liveness, open_store


def observe(spec: specmod.Spec, node: str) -> Observed:
    sup = process.Supervisor(node=node, state_dir=spec.state_dir, on_change=lambda: None, create=False)
    sup.adopt()
    entries = sup.snapshot()
    res = [e for g in spec.groups.values() for e in g.entries if e.kind != "process"]
    if res:
        try:
            from reconciler.act import resources

            kernel = resources.observe(res)
        except Exception as exc:  # show the plan anyway; the state says why
            kernel = {e.tag: ("error", f"cannot observe: {exc}") for e in res}
        for g in spec.groups.values():
            for e in g.entries:
                if e.kind != "process":
                    state, msg = kernel.get(e.tag, ("stopped", ""))
                    entries[(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, kind=e.kind, state=state, message=msg)
    return Observed(node=node, entries=entries)


async def cluster_view(spec: specmod.Spec, node: str, down: tuple[str, ...]) -> ClusterView:
    t = spec.cluster.timing
    store = open_store(spec.store_url) if spec.store_url.startswith("dir:") else open_store(
        spec.store_url, prefix=spec.cluster.etcd_prefix, ca=spec.cluster.etcd_ca, cert=spec.cluster.etcd_cert,
        key=spec.cluster.etcd_key, user=spec.cluster.etcd_user, password=spec.cluster.etcd_password, lease=t.lease,
    )
    try:
        live = liveness.Liveness(node)
        first = await store.read()
        start = time.monotonic()
        live.update(first, start, groups=list(spec.groups), lease_until=0)
        await asyncio.sleep(t.heartbeat * 2.5)
        snap = await store.read()
    finally:
        await store.close()
    now = time.monotonic()
    hpc = None
    if spec.cluster.membership.startswith("hpc:"):
        hpc = hpcmod.read(spec.path(spec.cluster.membership[4:]))
    view = live.update(snap, now, groups=list(spec.groups), lease_until=now + t.lease, hpc=hpc)
    members = dict(view.members)
    for n, m in members.items():
        if m.last_change < now and m.heartbeat is not None:
            # Silent during this look: how long it has really been silent can only be
            # estimated, from the wall time it last published (informational, dry run only).
            wall = m.heartbeat.status.get("wall_time")
            age = max(now - start, time.time() - wall) if isinstance(wall, (int, float)) else now - start
            members[n] = attrs.evolve(m, last_change=now - age)
    mine = members.get(node)
    if mine is not None and mine.last_change >= now:
        view = attrs.evolve(view, lease_until=float("inf"))  # an agent runs here and renews
    members = dict(view.members)
    for n in down:
        m = members.get(n) or Member(name=n, last_change=float("-inf"))
        members[n] = attrs.evolve(m, last_change=float("-inf"), up=False)
    # Assume unclaimed groups have waited long enough: show who would claim them.
    return attrs.evolve(view, members=members, unclaimed_since={g: float("-inf") for g in view.unclaimed_since})


def simulate(spec: specmod.Spec, node: str, down: tuple[str, ...] = ()) -> planmod.Plan:
    observed = observe(spec, node)
    view = asyncio.run(cluster_view(spec, node, down))
    return planmod.plan(spec, observed, view, time.monotonic())
