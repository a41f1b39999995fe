"""Whose is a mount or an address: the one rule the agent's observer and `--dry-run` apply.

Only what this node applied is ever removed by it. The kernel shows a mount or an address,
not who put it there, so the executor's book remembers what this node applied ("owned"),
and this rule turns what the kernel shows into the state the planner sees:

- present while this node holds the group's claim and its runlevel wants the entry: ours
  (found there without having been applied by this agent, after a restart or from before
  the claim, it is given a `since` in file order, before anything this agent started, so
  that the reverse-`since` stop order is still the reverse file order);
- absent while the group is not claimed here (and no start is in flight): not ours any more
  (the keeper removed it, or it was never ours);
- a failed attempt with a retry time shows as "error" (the executor's message) until the
  entry is present;
- present but neither wanted here nor ours (a standby node; someone else's filesystem at the
  target; the IP on another interface): shown as stopped, so the plan leaves it alone
  instead of resetting it on every pass.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import attrs

from reconciler.model import EntryState
from reconciler.spec import Entry, Group

LEFT_ALONE = "present, but not applied by this node: left alone"


@attrs.frozen
class Held:
    """What the executor's book remembers of one resource entry (the defaults: nothing)."""

    owned: bool = False  # applied by this node: only what it applied is removed
    applying: bool = False  # a start is in flight
    since: float = 0.0  # when it became ours (0.0: never, as far as this agent knows)
    retry_at: float | None = None  # the last attempt failed; the next is not before this
    message: str = ""  # why the last attempt failed


NOTHING_HELD = Held()


@attrs.frozen
class Decision:
    state: EntryState  # what the planner is shown
    owned: bool  # the book's new `owned` for the entry
    since: float  # the book's new `since` for the entry


def decide(
    group: str,
    entry: Entry,
    spec_group: Group | None,
    *,
    kernel: tuple[str, str],
    claimed: bool,
    held: Held = NOTHING_HELD,
) -> Decision:
    """`kernel`: (state, message) as observed ("running", "stopped", "mismatch", "error");
    `claimed`: this node holds the group's claim; `spec_group`: the group in the spec (None:
    removed from it); `entry`: the spec's entry, or the book's if it was removed."""
    state, message = kernel
    owned, since = held.owned, held.since
    wanted_here = claimed and spec_group is not None and entry.active_at(spec_group.runlevel)
    if state == "running" and wanted_here and spec_group is not None:
        owned = True
        if since == 0.0 and entry in spec_group.entries:
            since = (spec_group.entries.index(entry) + 1) * 1e-6
    elif state == "stopped" and not claimed and not held.applying:
        owned = False
    if held.retry_at is not None and state != "running":
        state, message = "error", held.message or message
    elif state != "stopped" and not wanted_here and not owned:
        if state == "running":
            message = LEFT_ALONE
        state = "stopped"
    shown = EntryState(
        group=group, tag=entry.tag, kind=entry.kind, state=state, since=since, retry_at=held.retry_at, owned=owned,
        message=message,
    )
    return Decision(state=shown, owned=owned, since=since)
