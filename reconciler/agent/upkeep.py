"""The loop's beat: the chores that prove the event loop alive and keep its helpers going.

After every reconcile pass and whenever the renewer posts (at least every
renewal.POST_AFTER), the loop stamps its Pulse (the renewer renews only while the loop is
alive), tells systemd's watchdog, makes sure the keeper runs (about once a second: it reads
a file and /proc) and rotates the entry logs that are due (at most once a tick: a chatty
entry must not fill the state directory, which holds the lease file).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.act import logs, process
from reconciler.cluster.renewal import Pulse

KEEPER_CHECK_EVERY = 1.0  # seconds: how often the loop makes sure the keeper runs


class Upkeep:
    def __init__(self, node_dir: Path, *, once: bool, pulse: Pulse, logs_dir: Path, tick: Callable[[], float],
                 notify=None, clock: Callable[[], float] = time.monotonic):
        self.node_dir = node_dir
        self.once = once
        self.pulse = pulse
        self.logs_dir = logs_dir
        self.notify = notify
        self.notified_ready = False  # READY=1 sent to systemd
        self._tick = tick
        self._clock = clock
        self._keeper_checked_at = float("-inf")  # the last look at the keeper
        self._logs_rotated_at = float("-inf")  # the last look at the entry logs' sizes
        self._rotator: logs.Rotator | None = None  # (its policy from the environment)

    def beat(self) -> None:
        """On the loop: proof that it runs (for the renewer and systemd's watchdog), and a
        look at the keeper and the logs now and then."""
        self.pulse.stamp()
        if self.notify and self.notified_ready:  # (systemd wants READY=1 first)
            self.notify.watchdog()
        self._ensure_keeper_cheap()
        self._rotate_logs_cheap()

    def ready(self, status_text: str | None = None) -> None:
        """Start-up is done: tell systemd (READY=1, with the status line)."""
        if self.notify:
            self.notify.ready(status_text)
            self.notified_ready = True

    def start_keeper(self) -> None:
        """At start-up: the keeper, now (it writes keeper.pid once it runs)."""
        self.ensure_keeper()
        self._keeper_checked_at = self._clock()

    def keeper_due(self) -> None:
        """The lease file exists from now on: the loop's next beat starts the keeper (one
        started before it, at start-up, found none and exited)."""
        self._keeper_checked_at = float("-inf")

    def ensure_keeper(self) -> None:
        if self.once:
            return
        try:
            pid, ticks = (self.node_dir / "keeper.pid").read_text().split()
            if process.start_ticks(int(pid)) == int(ticks):
                return
        except (OSError, ValueError):
            pass
        subprocess.Popen(
            [sys.executable, "-m", "reconciler.keeper", str(self.node_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def _ensure_keeper_cheap(self) -> None:
        now = self._clock()
        if now - self._keeper_checked_at >= KEEPER_CHECK_EVERY:
            self._keeper_checked_at = now
            self.ensure_keeper()

    def _rotate_logs_cheap(self) -> None:
        now = self._clock()
        if self.once or now - self._logs_rotated_at < self._tick():
            return
        self._logs_rotated_at = now
        if self._rotator is None:
            self._rotator = logs.Rotator(self.logs_dir, logs.Policy.from_env())
        self._rotator.look()
