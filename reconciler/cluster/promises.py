"""The promises this member gave, STATE/NODE/promises.json: written (and fsynced) before the
answer leaves, loaded at agent start, so a restarted agent still honours them.

Deadlines are CLOCK_MONOTONIC seconds, which every process of one boot shares; the file
records the boot id (/proc/sys/kernel/random/boot_id) and a file of another boot is ignored
(its clock restarted: a promise never outlives a reboot, and the reboot itself took longer
than any promise, which lasts one lease). A file that cannot be read is no promise to honour
beyond this process; one that cannot be written means no promise is given (the answer is a
refusal), so nothing is promised that a restart would forget.

The endpoint thread writes and the event loop reads: `lock` guards both, and the loop holds
it from its planning view to the dispatch of the plan's takeovers, so a request is either
answered before a plan (which then honours the promise) or after its takeovers are known
(and refused for them).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

from reconciler.decide import failsafe as rules

log = logging.getLogger("reconciler.agent")


class PromiseBook:
    """The promises of the member whose state directory holds `path`."""

    def __init__(self, path: str, *, boot: str, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.boot = boot
        self._clock = clock
        self.lock = threading.RLock()
        self.promises: dict[str, float] = {}  # owner -> deadline (monotonic), replaced whole
        self.taking_over: frozenset[str] = frozenset()  # owners whose claims this node is breaking

    def load(self, dead_after: float) -> None:
        """The promises a predecessor of this boot gave and that still bind."""
        try:
            with open(self.path, "rb") as fh:
                doc = json.loads(fh.read(1 << 20))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("failsafe: cannot read %s (%s): no earlier promise is honoured", self.path, exc)
            return
        if not isinstance(doc, dict) or doc.get("boot") != self.boot or not isinstance(doc.get("promises"), dict):
            return
        found = {o: float(d) for o, d in doc["promises"].items() if isinstance(o, str) and isinstance(d, (int, float))}
        with self.lock:
            self.promises = rules.live(found, self._clock(), dead_after=dead_after)
        if self.promises:
            log.warning("failsafe: honouring promises given before this agent started: %s",
                        ", ".join(f"{o} until {d - self._clock():+.2f}s" for o, d in sorted(self.promises.items())))

    def give(self, promise: rules.Promise, *, dead_after: float) -> bool:
        """Record `promise` durably; False (and nothing promised) if it cannot be written."""
        with self.lock:
            new = rules.live(self.promises, self._clock(), dead_after=dead_after)
            new[promise.owner] = max(new.get(promise.owner, promise.deadline), promise.deadline)
            try:
                self._write(new)
            except OSError as exc:
                log.error("failsafe: cannot record a promise in %s: %s (refusing)", self.path, exc.strerror or exc)
                return False
            self.promises = new
            return True

    def binding(self, dead_after: float) -> dict[str, float]:
        """The promises that still bind (owner -> deadline)."""
        return rules.live(self.promises, self._clock(), dead_after=dead_after)

    def _write(self, promises: dict[str, float]) -> None:
        data = json.dumps({"boot": self.boot, "promises": promises}).encode()
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
