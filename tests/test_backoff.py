"""The one backoff policy (reconciler/decide/backoff.py), tested directly: every use gives
the numbers it gave before there was one policy (the formulas are written out here)."""

from __future__ import annotations

import pytest

from reconciler.decide import backoff
from reconciler.decide.backoff import Backoff


# (failures in a row, delay): the table docs/spec.md states for respawns
@pytest.mark.parametrize(
    "n, delay",
    [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (4, 0.25), (5, 0.5), (6, 1.0), (7, 2.0), (11, 32.0), (12, 60.0), (13, 60.0)],
)
def test_respawn_table(n, delay):
    assert backoff.RESPAWN.delay(n) == delay


@pytest.mark.parametrize("n", range(0, 40))
def test_each_use_keeps_its_formula(n):
    # act/records.py backoff(): a respawn entry's rapid exits
    assert backoff.RESPAWN.delay(n) == (0.0 if n <= 3 else min(60.0, 0.25 * 2 ** (n - 3 - 1)))
    # act/process.py: a command that cannot be started
    assert backoff.SPAWN.delay(n) == max(1.0, 0.0 if n <= 3 else min(60.0, 0.25 * 2 ** (n - 3 - 1)))
    if n >= 1:  # the executor counts from one (the failure just seen)
        # act/executor.py block(): a group's fence hook or store call
        assert backoff.GROUP.delay(n) == min(30.0, 0.5 * 2 ** min(n, 6))
        # act/executor.py _resource(): a mount or address
        for permanent in (False, True):
            expected = min(30.0, 0.5 * 2 ** min(n, 6)) * (4 if permanent else 1)
            assert backoff.for_resource(permanent=permanent).delay(n) == expected


def test_retry_at_adds_now():
    assert backoff.GROUP.retry_at(3, 100.0) == 104.0
    assert backoff.RESPAWN.retry_at(2, 7.5) == 7.5


def test_grows_monotonically_to_the_cap_and_stays():
    for policy in (backoff.RESPAWN, backoff.SPAWN, backoff.GROUP, backoff.RESOURCE_PERMANENT):
        delays = [policy.delay(n) for n in range(0, 200)]
        assert delays == sorted(delays)
        assert delays[-1] == policy.cap


def test_a_count_that_never_stops_growing_stays_at_the_cap():
    # a process respawned every minute for weeks: no float overflow
    assert backoff.RESPAWN.delay(100_000) == 60.0
    assert Backoff(base=1e300, cap=float("inf")).delay(10_000) == float("inf")


def test_floor_applies_to_free_failures():
    p = Backoff(base=0.1, cap=5.0, free=2, floor=0.3)
    assert [p.delay(n) for n in range(7)] == [0.3, 0.3, 0.3, 0.3, 0.3, 0.4, 0.8]
