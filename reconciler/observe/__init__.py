"""What is really there on this node: Observed, built by the observers in this package.

Observed is a frozen value: the planner reads it, never the kernel.
"""

from __future__ import annotations

import attrs

# Entry states. Processes: stopped, running, stopping, done (once/wait exited), passed and
# failed (test), exited (respawn waiting for its next attempt). Resources (mount, address):
# stopped (absent), running (present as specified), mismatch (present but different),
# error (the last attempt failed; retry_at says when the next one is).
STATES = ("stopped", "running", "stopping", "done", "passed", "failed", "exited", "mismatch", "error")


@attrs.frozen
class EntryState:
    group: str
    tag: str
    kind: str = "process"  # process | mount | address
    state: str = "stopped"
    pid: int | None = None
    since: float = 0.0  # monotonic time the entry entered this state
    exit_code: int | None = None  # last exit status (negative = killed by that signal)
    rapid_exits: int = 0  # consecutive exits sooner than min_uptime (respawn backoff)
    retry_at: float | None = None  # the next attempt is not before this monotonic time
    level: str = ""  # the runlevel it was started for
    owned: bool = True  # resources: we applied it (only what we applied is removed)
    message: str = ""  # why, for status: "exit 1", "busy: pids 12 13", kernel errors

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.tag)

    @property
    def active(self) -> bool:
        """Something exists that a stop would have to remove."""
        if self.kind == "process":
            return self.state in ("running", "stopping")
        return self.state in ("running", "mismatch", "stopping") and self.owned


@attrs.frozen
class Observed:
    node: str
    entries: dict[tuple[str, str], EntryState] = attrs.field(factory=dict)
    busy: frozenset[str] = frozenset()  # groups whose previous actions are still in flight
    # group-level attempts that failed (fence hook, claim): {group: (retry_at, message)}
    blocked: dict[str, tuple[float, str]] = attrs.field(factory=dict)

    def get(self, group: str, tag: str, kind: str = "process") -> EntryState:
        return self.entries.get((group, tag)) or EntryState(group=group, tag=tag, kind=kind)

    def groups(self) -> set[str]:
        return {g for g, _ in self.entries}
