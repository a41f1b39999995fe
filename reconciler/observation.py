"""Build Observed for this node: process records, the kernel's mounts and addresses, and
what the executor remembers (failures, retry times, which resources are ours)."""

from __future__ import annotations

import logging

import attrs

from reconciler.observe import EntryState, Observed

log = logging.getLogger("reconciler.observe")


class Observer:
    def __init__(self, agent):
        self.agent = agent

    def observe(self, now: float) -> Observed:
        a = self.agent
        entries = a.supervisor.snapshot()
        entries.update(self._resources(now))
        return Observed(node=a.node, entries=entries, busy=frozenset(a.busy), blocked=dict(a.executor.blocked))

    def _resources(self, now: float) -> dict[tuple[str, str], EntryState]:
        a = self.agent
        wanted = []
        for g in a.spec.groups.values():
            for e in g.entries:
                if e.kind != "process":
                    wanted.append((g.name, e))
        for (group, tag), rec in a.executor.book.items():
            if rec.owned and rec.entry is not None and a.spec.entry(group, tag) is None:
                wanted.append((group, rec.entry))  # removed from the spec but still applied
        if not wanted:
            return {}
        if a.resources is None:
            return {
                (g, e.tag): EntryState(group=g, tag=e.tag, kind=e.kind, state="error", message="resource support unavailable")
                for g, e in wanted
            }
        try:
            kernel = a.resources.observe([e for _, e in wanted])
        except Exception as exc:  # observation must never stop the loop
            log.warning("cannot observe mounts/addresses: %s", exc)
            kernel = {}
        out = {}
        my_claims = {g for g, c in a.view.claims.items() if c.node == a.node}
        for group, e in wanted:
            state, message = kernel.get(e.tag, ("stopped", ""))
            rec = a.executor.book.get((group, e.tag))
            if rec is None:
                rec = a.executor.book.setdefault((group, e.tag), a.executor.new_record(e))
            rec.entry = e
            g = a.spec.groups.get(group)
            if state == "running" and group in my_claims and g is not None and e.active_at(g.runlevel):
                rec.owned = True  # present while we own and want it: ours to remove on stop
            if rec.retry_at is not None and state != "running":
                state, message = "error", rec.message or message
            out[(group, e.tag)] = EntryState(
                group=group, tag=e.tag, kind=e.kind, state=state, since=rec.since, retry_at=rec.retry_at,
                owned=rec.owned, message=message,
            )
        return out


def with_entries(observed: Observed, entries: dict) -> Observed:
    return attrs.evolve(observed, entries=entries)
