"""Node identity bookkeeping: this agent's instance id and what it has seen of its own node
record, the observations decide/identity.py judges (is another agent publishing under this
node's name?).

Called from the renewer thread (before each publish and after each read); the loop only
reads `verdict` and `published_at`, which are replaced whole.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from reconciler.cluster.lease import Lease
from reconciler.decide import identity
from reconciler.model import Snapshot
from reconciler.spec import Timing
from reconciler.store import records

log = logging.getLogger("reconciler.agent")


class Instance:
    """This agent's identity under the node name `node`; its id is recorded in the file at
    `record` (STATE/NODE/instance) for the next agent of this state directory."""

    def __init__(self, node: str, record: str, *, lease: Lease, timing: Callable[[], Timing],
                 on_first_publish: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.record = record
        self._lease = lease
        self._timing = timing
        self._on_first_publish = on_first_publish
        self._clock = clock
        self.id = uuid.uuid4().hex[:16]  # published with every heartbeat
        self.predecessor = ""  # the instance id the last agent of this state directory recorded
        self.watch_from = clock()
        self.watch_until: float | None = None  # set at the first read (identity.watch_until)
        self.foreign: identity.Foreign | None = None
        self.published_at: float | None = None  # the first successful publish of this instance
        self.continuous_since: float | None = None  # the start of the lease, unbroken since
        self.verdict = identity.Verdict("watch", publish=False, claim=False, run=True, twin="")
        self._twin_logged: str | None = None  # the other instance the last log line was about

    def start(self) -> None:
        """Under the node's lock: read the predecessor's instance id, record ours."""
        try:
            with open(self.record, "rb") as fh:
                text = fh.read(64).decode("ascii", "replace").strip()
            self.predecessor = text if records.INSTANCE_RE.match(text) else ""
        except OSError:
            self.predecessor = ""
        try:
            tmp = self.record + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(self.id + "\n")
            os.replace(tmp, self.record)
        except OSError as exc:  # the next agent then watches before it publishes: slower, not unsafe
            log.warning("cannot record this agent's instance id in %s: %s", self.record, exc.strerror or exc)
        self.watch_from = self._clock()

    def judge(self, now: float) -> identity.Verdict:
        """identity.decide on what has been seen so far; logs every change of state."""
        t = self._timing()
        obs = identity.Observations(
            instance=self.id,
            watch_until=float("inf") if self.watch_until is None else self.watch_until,
            published_at=self.published_at,
            continuous_since=self.continuous_since if self._lease.until > now else None,
            yielded=self.verdict.state == "yield",
            foreign=self.foreign,
        )
        verdict = identity.decide(obs, now, dead_after=t.dead_after, heartbeat=t.heartbeat)
        last, self.verdict = self.verdict, verdict
        who = self.foreign.instance if self.foreign is not None else None
        # Logged when the state or the other agent changes (the text carries ages: not each time).
        if verdict.state != last.state or bool(verdict.twin) != bool(last.twin) or who != self._twin_logged:
            self._twin_logged = who
            if verdict.twin:
                log.warning("node name %s: %s", self.node, verdict.twin)
            elif last.state in ("yield", "incumbent"):
                log.warning("node name %s: the other agent under this name is gone: claiming again", self.node)
            elif last.state == "watch" and verdict.state != "watch" and self.published_at is None:
                log.info("no other agent publishes as %s: publishing (instance %s)", self.node, self.id)
        return verdict

    def may_publish(self) -> bool:
        """Before each publish: may this instance publish now?"""
        if self.verdict.state == "ok" and self.foreign is None:
            return True  # the usual case, ten times a second: nothing to judge
        return self.judge(self._clock()).publish

    def note_published(self, started: float) -> None:
        """A publish that began at `started` succeeded."""
        if self.published_at is None or self.continuous_since is None:
            self.continuous_since = started
        if self.published_at is None:
            self.published_at = started
            self._on_first_publish()  # (the lease file exists from now on)

    def lease_broken(self, started: float) -> None:
        """The lease lapsed and was renewed again at `started`: continuous from then on."""
        self.continuous_since = started

    def may_release(self) -> bool:
        """May this agent end the claims under its node name at a clean shutdown?"""
        return identity.may_release(self.verdict, published=self.published_at is not None)

    def fold(self, snap: Snapshot, now: float) -> identity.Verdict:
        """Fold this node's own record (and the one the last publish replaced) into what is
        known of other writers under this name, then judge."""
        own = snap.members.get(self.node)
        if (self.foreign is None and self.verdict.state == "ok" and not snap.displaced
                and (own is None or own.instance == self.id)):
            return self.verdict  # the usual case: only this agent writes its record
        t = self._timing()
        if self.watch_until is None:
            self.watch_until = identity.watch_until(self.watch_from, own, self.predecessor, dead_after=t.dead_after,
                                                    heartbeat=t.heartbeat)
        foreign = self.foreign
        for record in (snap.displaced.get(self.node), own):
            foreign = identity.observe(foreign, record, me=self.id, predecessor=self.predecessor, now=now,
                                       published=self.published_at is not None)
        self.foreign = foreign
        return self.judge(now)


class AlreadyRunning(Exception):
    """Another agent holds this node's lock on this machine (one line, for the CLI)."""


def identity_lock(node: str, path: Path) -> int:
    """Take the node's agent lock (flock, held until this process exits) or raise
    AlreadyRunning: two agents under one node name on one machine would both adopt and
    respawn the same processes. The descriptor is close-on-exec: no child inherits it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"node {node}: another agent already runs under this name here (it holds {path})") from None
    return fd
