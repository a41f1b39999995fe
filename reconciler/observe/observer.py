"""Build Observed for this node: process records, the kernel's mounts and addresses, and
what the executor remembers (failures, retry times, which resources are ours)."""

from __future__ import annotations

import concurrent.futures
import logging

import attrs

from reconciler.observe import EntryState, Observed

log = logging.getLogger("reconciler.observe")

# pyroute2's synchronous IPRoute runs an event loop of its own and refuses to start inside a
# running one ("This event loop is already running"), which is where `observe` is called
# from: the kernel is read on this one worker thread instead (a netlink dump takes ~1 ms).
_KERNEL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="observe-kernel")
KERNEL_TIMEOUT = 2.0


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
            kernel = _KERNEL.submit(a.resources.observe, [e for _, e in wanted]).result(KERNEL_TIMEOUT)
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
            wanted_here = group in my_claims and g is not None and e.active_at(g.runlevel)
            if state == "running" and wanted_here:
                rec.owned = True  # present while we own and want it: ours to remove on stop
                if rec.since == 0.0 and e in g.entries:
                    # Found present, never started by this agent (a restart, or there before
                    # the claim): assume it came before anything this agent started, in file
                    # order, so that the reverse-`since` stop order is still reverse file order.
                    rec.since = (g.entries.index(e) + 1) * 1e-6
            elif state == "stopped" and group not in my_claims and not rec.applying:
                rec.owned = False  # gone (the keeper removed it) and the group is not ours: nothing to remove
            if rec.retry_at is not None and state != "running":
                state, message = "error", rec.message or message
            elif state != "stopped" and not wanted_here and not rec.owned:
                # Not ours and not wanted here (a standby node; a missing interface, an IP on
                # another interface, someone else's filesystem at the target): nothing to
                # remove. Any other state makes the plan "reset" it on every pass, forever.
                if state == "running":
                    message = "present, but not applied by this node: left alone"
                state = "stopped"
            out[(group, e.tag)] = EntryState(
                group=group, tag=e.tag, kind=e.kind, state=state, since=rec.since, retry_at=rec.retry_at,
                owned=rec.owned, message=message,
            )
        return out


def with_entries(observed: Observed, entries: dict) -> Observed:
    return attrs.evolve(observed, entries=entries)
