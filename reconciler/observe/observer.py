"""Build Observed for this node: process records, the kernel's mounts and addresses, and
what the executor remembers (failures, retry times, which resources are ours).

Whose a mount or address is, and so what the planner is shown for it, is decided by the
pure rule in reconciler/decide/ownership.py (which `--dry-run` applies too); the observer
reads the kernel and the resource book, calls it, and gives its conclusion back to the book.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Mapping

from reconciler import spec as specmod
from reconciler.decide import ownership
from reconciler.observe import EntryState, Observed

log = logging.getLogger("reconciler.observe")

# pyroute2's synchronous IPRoute runs an event loop of its own and refuses to start inside a
# running one ("This event loop is already running"), which is where `observe` is called
# from: the kernel is read on this one worker thread instead (a netlink dump takes ~1 ms).
_KERNEL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="observe-kernel")
KERNEL_TIMEOUT = 2.0

Key = tuple[str, str]


class Observer:
    def __init__(
        self,
        *,
        node: str,
        supervisor,
        book,
        read_kernel: Callable[[list[specmod.Entry]], Mapping[str, tuple[str, str]]],
        spec: Callable[[], specmod.Spec],
        claimed: Callable[[], Iterable[str]],
        busy: Callable[[], Iterable[str]],
        blocked: Callable[[], Mapping[str, tuple[float, str]]],
        prober=None,
        ledger=None,
    ):
        """`supervisor`: its snapshot() of the process records; `book`: the resource book
        (act/book.py); `read_kernel`: tag -> (state, message) of mount and address entries
        (act/resources.observe); `spec`, `claimed` (the groups this node holds the claim
        of), `busy` and `blocked` (the executor's group retry times): read at each call.
        `prober`: the health probes (observe/probes.py), told which entries run at each call;
        `ledger`: the failure ledger (act/ledger.py: each group's failures here, its bans)."""
        self.prober = prober
        self.ledger = ledger
        self.node = node
        self.supervisor = supervisor
        self.book = book
        self.read_kernel = read_kernel
        self.spec = spec
        self.claimed = claimed
        self.busy = busy
        self.blocked = blocked

    def observe(self, now: float) -> Observed:
        entries = self.supervisor.snapshot()
        probes = self.prober.sync(self.spec(), entries) if self.prober is not None else {}
        entries.update(self._resources())
        failures: dict = {}
        bans: dict = {}
        if self.ledger is not None:
            spec = self.spec()
            self.ledger.prune(spec, now)
            failures, bans = dict(self.ledger.failures), self.ledger.bans(spec, now)
        return Observed(node=self.node, entries=entries, busy=frozenset(self.busy()), blocked=dict(self.blocked()),
                        probes=probes, failures=failures, bans=bans)

    def _resources(self) -> dict[Key, EntryState]:
        spec = self.spec()
        wanted = []
        for g in spec.groups.values():
            for e in g.entries:
                if e.kind != "process":
                    wanted.append((g.name, e))
        for group, e in self.book.owned_entries():
            if spec.entry(group, e.tag) is None:
                wanted.append((group, e))  # removed from the spec but still applied
        if not wanted:
            return {}
        try:
            kernel = _KERNEL.submit(self.read_kernel, [e for _, e in wanted]).result(KERNEL_TIMEOUT)
        except Exception as exc:  # observation must never stop the loop
            log.warning("cannot observe mounts/addresses: %s", exc)
            kernel = {}
        claimed = frozenset(self.claimed())
        out = {}
        for group, e in wanted:
            decision = ownership.decide(
                group, e, spec.groups.get(group), kernel=kernel.get(e.tag, ("stopped", "")), claimed=group in claimed,
                held=self.book.held(group, e.tag),
            )
            self.book.note_observed(group, e, decision)
            out[(group, e.tag)] = decision.state
        return out
