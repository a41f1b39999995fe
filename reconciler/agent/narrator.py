"""The narrator: tells the operator what changed, in the log and in systemd's status line.

The loop hands it every planning view; decide/transitions.py says what changed since the
last one (the store lost or back, a peer dead or back, a claim won or lost, the membership
unreadable), and each change is logged once, at its severity. The summary ("owning 3
groups, 5 members live") goes to systemd as STATUS= with READY=1 and whenever it changes
(host/notify.py's StatusLine: at most once a second). It runs on the loop, never on the
renewer's thread: nothing here may delay a renewal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from reconciler.decide import transitions
from reconciler.host.notify import StatusLine
from reconciler.model import ClusterView

log = logging.getLogger("reconciler.agent")
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}


class Narrator:
    """`send_status`: systemd's STATUS= (None: not under systemd)."""

    def __init__(self, node: str, *, dead_after: Callable[[], float], send_status: Callable[[str], bool] | None = None):
        self.node = node
        self._dead_after = dead_after
        self._seen = transitions.Seen()  # what the last view said
        self._status_line = StatusLine(send=send_status) if send_status is not None else None

    def ready(self, view: ClusterView, now: float) -> str:
        """Start-up is done: the ready line, and the summary that goes with READY=1."""
        text = transitions.summary(view, now, self._dead_after())
        if self._status_line is not None:
            self._status_line.sent(text, now)
        log.info("ready: %s", text)
        return text

    def tell(self, view: ClusterView, now: float) -> None:
        """Log what changed since the last view, each change once; offer systemd the summary."""
        dead_after = self._dead_after()
        self._seen, changes = transitions.step(self._seen, view, now=now, dead_after=dead_after)
        for c in changes:
            # (`node` in a JSON line is the agent's own, as in the action lines: a peer is `peer`)
            about = {"group": c.subject} if c.kind.startswith("claim") else {"peer": c.subject} if c.subject else {}
            log.log(LEVELS[transitions.severity(c)], "%s", transitions.describe(c, node=self.node), extra=about)
        if self._status_line is not None:
            self._status_line.offer(transitions.summary(view, now, dead_after), now)
