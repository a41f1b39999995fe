"""How long to wait before trying again after failures in a row: one policy, pure.

Every retry the agent schedules comes from here: a process that keeps exiting rapidly
(act/process.py), a command that cannot be started, a group whose fence hook or store call
failed (act/executor.py), a mount or address that could not be applied. Each use is one
parameterisation of `Backoff`, so the numbers are read in one place (docs/spec.md,
"Respawn backoff").
"""

from __future__ import annotations

import attrs

# Past this many doublings every policy here is long at its cap; the exponent stops growing
# so that a count that keeps climbing (a process respawned every minute for weeks) never
# makes a float out of an enormous integer.
_MAX_DOUBLINGS = 64


@attrs.frozen
class Backoff:
    """The n-th failure in a row waits `base * 2**(n - free - 1)`, at most `cap`, at least
    `floor`; the first `free` failures wait nothing (but `floor`)."""

    base: float
    cap: float
    free: int = 0  # this many failures in a row are retried at once
    floor: float = 0.0  # never less than this, even for a free failure

    def delay(self, failures: int) -> float:
        if failures <= self.free:
            return self.floor
        doublings = min(failures - self.free - 1, _MAX_DOUBLINGS)
        return max(self.floor, min(self.cap, self.base * 2.0**doublings))

    def retry_at(self, failures: int, now: float) -> float:
        return now + self.delay(failures)

    def steps_up(self, failures: int) -> bool:
        """Does the `failures`-th failure in a row wait longer than the one before? (Once per
        step of the backoff: what the log reports, not every retry.)"""
        return self.delay(failures) > self.delay(failures - 1)


# A respawn entry exiting sooner than min_uptime: three rapid exits restart at once, then
# 0.25 s, 0.5 s, 1 s, ... up to a minute, for ever.
RESPAWN = Backoff(base=0.25, cap=60.0, free=3)
# A command that could not be started at all (missing program, unknown user): as RESPAWN,
# counted in the same rapid exits, but never sooner than a second.
SPAWN = Backoff(base=0.25, cap=60.0, free=3, floor=1.0)
# A group-level failure (fence hook, store unreachable for a claim): 1 s, 2 s, ... 30 s.
GROUP = Backoff(base=1.0, cap=30.0)
# A mount or address that could not be applied or removed: as a group; an error that the
# same spec will meet again on this node (missing device or interface) waits four times as long.
RESOURCE = GROUP
RESOURCE_PERMANENT = Backoff(base=4.0, cap=120.0)


def for_resource(*, permanent: bool) -> Backoff:
    """The policy for a failed mount or address action."""
    return RESOURCE_PERMANENT if permanent else RESOURCE
