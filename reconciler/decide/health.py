"""The health rules (issue 16), pure: when a probed entry is unhealthy, which probe failures
count, and when the failures of a group on this node make it give the group up and ban it.

The probes themselves are observe/probes.py; the failures are recorded by act/ledger.py
(restarts, rapid exits, failed starts); plan.py and entries.py act on what these say.
"""

from __future__ import annotations

from collections.abc import Sequence

from reconciler import spec as specmod
from reconciler.model import EntryState, Failure, Probe

CAUSES = ("unhealthy", "rapid_exit", "start_failed")  # what counts as one failure of a group


def counts(h: specmod.Health, *, started: float, at: float, passed: bool) -> bool:
    """Whether a probe failing at `at` counts towards `failures`: not within the start period
    after the process started at `started`, unless a probe has passed since (the service
    is up: as Docker does)."""
    return passed or at >= started + h.start_period


def unhealthy(e: specmod.Entry, st: EntryState, probe: Probe | None) -> str:
    """Why the running entry must be restarted ("": it need not): its probe failed
    `failures` times in a row. Only a probe of the very process that runs counts."""
    h = e.health
    if h is None or probe is None or st.state != "running" or probe.pid != st.pid or probe.failures < h.failures:
        return ""
    return f"unhealthy: {h.kind} probe {h.target} failed {probe.failures} times in a row: {probe.message or 'failed'}"


def ban_until(g: specmod.Group, failures: Sequence[Failure]) -> float | None:
    """When the latest ban of this node from `g` ends (None: it never was banned): `ban`
    after the latest failure that made max_failures within failure_window.

    Nothing runs on a banned node, so no failure falls within a ban in practice; a ban ends
    when it ends, and a failure after it bans again only with max_failures in the window
    again (with `ban` longer than `failure_window`, as by default, only new failures count).
    Failures before keep_since() change no answer from `now` on: the ledger drops them."""
    if g.max_failures is None:
        return None
    m, window = g.max_failures, g.failure_window
    until: float | None = None
    first = 0  # failures[first:i+1] are those within the window ending at failures[i]
    for i, f in enumerate(failures):
        while failures[first].at <= f.at - window:
            first += 1
        if i + 1 - first >= m:
            until = f.at + g.ban
    return until


def recent(g: specmod.Group, failures: Sequence[Failure], now: float) -> int:
    """The group's failures on this node within failure_window before `now` (for status)."""
    return sum(1 for f in failures if f.at > now - g.failure_window)


def keep_since(g: specmod.Group, now: float) -> float:
    """Failures before this time change no current or future answer of ban_until or recent:
    a ban they could start has ended and they left the window (the ledger drops them)."""
    return now - g.failure_window - g.ban


def give_up_reason(g: specmod.Group, failures: Sequence[Failure]) -> str:
    """Why the node gives `g` up (no clock in it: a plan's notes are published, and an idle
    node's status must not change from pass to pass; the ban's end is published apart)."""
    text = (f"gave up: {g.max_failures} failures within {specmod.format_duration(g.failure_window)} (max_failures),"
            f" banned here for {specmod.format_duration(g.ban)}")
    if failures:
        last = failures[-1]
        text += f"; the last: {last.tag} {last.cause.replace('_', ' ')}" + (f" ({last.message})" if last.message else "")
    return text


def ban_note(g: specmod.Group) -> str:
    """What a banned node says about the group (published: no clock in it)."""
    return (f"banned here: {g.max_failures} failures within {specmod.format_duration(g.failure_window)};"
            f" `reconcile clear {g.name}` lifts it")
