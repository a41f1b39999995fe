"""What `plan` returns: Actions (each with its reason) and the Plan they make up; and the
Part each group contributes while a plan is made (reconciler/decide/plan.py, reconciler/decide/entries.py)."""

from __future__ import annotations

import attrs

from reconciler.model import Claim
from reconciler.published import Intent

# restart: an unhealthy entry (decide/health.py); handover: give the claim to `target` (a move,
# standby); forget: remove the operator's `intent` (a move done, refused or timed out)
KINDS = ("start", "stop", "restart", "reset", "claim", "release", "takeover", "handover", "forget")


@attrs.frozen
class Action:
    kind: str  # one of KINDS
    group: str
    tag: str = ""
    reason: str = ""
    urgent: bool = False  # self-demotion: SIGKILL no later than `deadline`
    deadline: float | None = None
    claim: Claim | None = None  # release / takeover: the claim instance to end
    fence: tuple[str, ...] = ()  # takeover: the fence hook argv, "{node}" filled in
    # restart, stop: the failure of the group here that this action records (decide/health.py:
    # an unhealthy entry; "" none): the executor counts it before acting
    failure: str = ""
    target: str = ""  # handover: the node the claim goes to
    intent: Intent | None = None  # handover (a move's), forget: the operator's intent concerned

    def describe(self) -> str:
        what = f"{self.group}/{self.tag}" if self.tag else self.group
        return f"{self.kind} {what}: {self.reason}"


@attrs.frozen
class Plan:
    actions: tuple[Action, ...] = ()
    wake_at: float | None = None  # the plan changes by itself then, with no event
    notes: dict[str, str] = attrs.field(factory=dict)  # per group: why nothing happens yet

    @property
    def empty(self) -> bool:
        return not self.actions

    def for_group(self, group: str) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.group == group)


@attrs.define
class Part:
    """One group's contribution to the plan. Never changed once made: not frozen only
    because a frozen class's __init__ costs twice as much, once per group per call."""

    actions: tuple[Action, ...] = ()
    wake_at: float | None = None
    note: str = ""


def noted(part: Part, note: str) -> Part:
    """`part` with `note` (attrs.evolve, without its cost)."""
    return Part(part.actions, part.wake_at, note)


def earliest(*times: float | None) -> float | None:
    """The smallest time that is not None (min()'s choice among equals), or None."""
    best = None
    for t in times:
        if t is not None and (best is None or t < best):
            best = t
    return best
