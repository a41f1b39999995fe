"""`reconcile events`: the cluster's history as the store keeps it (Store.events_read),
filtered and shown one line an event, from any machine that reaches the store.

The store pages by seq; a filter by group, node or age (--since: by the writer's wall clock)
is applied here. `follow` polls the store for events past the last one shown.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import attrs

from reconciler.published import Event
from reconciler.store import Store

PAGE = 1000
FOLLOW_POLL = 0.5  # seconds between two reads of a follow
_SINCE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PHASES = ("detect", "fence", "claim", "start")  # a takeover's, in the order they happen


def parse_since(text: str) -> float:
    """'90s', '10m', '2h', '1d' -> seconds; ValueError (one line) otherwise."""
    m = _SINCE_RE.match(text.strip())
    if not m:
        raise ValueError(f"--since {text!r}: not a duration like 30s, 10m, 2h or 1d")
    return float(m.group(1)) * _UNIT[m.group(2)]


@attrs.frozen
class Filter:
    group: str | None = None
    node: str | None = None
    since: float | None = None  # wall time: events older than this are left out

    def __call__(self, ev: Event) -> bool:
        return ((self.group is None or ev.group == self.group) and (self.node is None or ev.node == self.node)
                and (self.since is None or ev.wall >= self.since))


async def read(store: Store, keep: Filter, *, after: int = 0) -> tuple[list[Event], int]:
    """(the events past seq `after` that `keep` keeps, the last seq read)."""
    out: list[Event] = []
    while True:
        page = await store.events_read(after=after, limit=PAGE)
        if not page:
            return out, after
        after = page[-1].seq
        out.extend(ev for ev in page if keep(ev))
        if len(page) < PAGE:
            return out, after


async def follow(store: Store, keep: Filter, after: int, *, poll: float = FOLLOW_POLL) -> AsyncIterator[Event]:
    """The events appended after seq `after`, as they come (until cancelled)."""
    while True:
        events, after = await read(store, keep, after=after)
        for ev in events:
            yield ev
        await asyncio.sleep(poll)


def stamp(wall: float) -> str:
    """Local time, to the millisecond."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


def phases_text(phases: dict[str, float]) -> str:
    order = [p for p in PHASES if p in phases] + sorted(set(phases) - set(PHASES))
    return ", ".join(f"{p} {phases[p]:.3f}s" for p in order)


def line(ev: Event) -> str:
    """One event, as `reconcile events` prints it."""
    text = f"{stamp(ev.wall)}  {ev.node}  {ev.group or '-'}  {ev.kind}: {ev.reason}"
    if ev.phases:
        text += f"  [{phases_text(ev.phases)}]"
    return text


def doc(ev: Event) -> str:
    """One event as a line of JSON (--json: one object a line, also with --follow)."""
    return json.dumps({"seq": ev.seq, "wall": ev.wall, "time": stamp(ev.wall), "node": ev.node, "group": ev.group,
                       "kind": ev.kind, "reason": ev.reason, "phases": ev.phases}, sort_keys=True)
