"""An entry's process record: its state machine (TRANSITIONS), what an exit or a failed
start does to it (the respawn backoff: decide/backoff.py), and the fields saved in the
process table (_SAVED)."""

from __future__ import annotations

import asyncio
import json
import operator
import subprocess

import attrs

from reconciler.decide import backoff
from reconciler.observe import EntryState

# state -> states it may move to. "stopped" is also the state of an entry never started.
TRANSITIONS: dict[str, frozenset[str]] = {
    "stopped": frozenset({"running", "error"}),
    "running": frozenset({"stopping", "exited", "done", "passed", "failed"}),
    "stopping": frozenset({"stopped"}),
    "exited": frozenset({"running", "error", "stopped"}),
    "error": frozenset({"running", "error", "stopped"}),
    "done": frozenset({"running", "stopped"}),
    "passed": frozenset({"running", "stopped"}),
    "failed": frozenset({"running", "stopped"}),
}


@attrs.define
class Record:
    group: str
    tag: str
    state: str = "stopped"
    pid: int | None = None
    pgid: int | None = None
    ticks: int | None = None
    since: float = 0.0
    started: float = 0.0
    exit_code: int | None = None
    rapid_exits: int = 0
    retry_at: float | None = None
    level: str = ""
    message: str = ""
    mode: str = "respawn"
    min_uptime: float = 1.0
    respawns: int = 0
    popen: subprocess.Popen | None = attrs.field(default=None, repr=False)
    exited: asyncio.Future[int | None] | None = attrs.field(default=None, repr=False)  # its exit code
    pidfd: int | None = attrs.field(default=None, repr=False)

    def move(self, state: str, now: float) -> None:
        if state != self.state and state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.group}/{self.tag}: no transition {self.state} -> {state}")
        self.state = state
        self.since = now

    def ended(self, code: int | None, now: float) -> None:
        """The process exited (`code`: its status, None if unknown): the state its mode leads
        to; a respawn entry counts a rapid exit and waits as the backoff says."""
        if self.state == "stopping":
            self.move("stopped", now)
            self.message = f"stopped (exit {code})" if code is not None else "stopped"
        elif self.mode == "test":
            self.move("passed" if code == 0 else "failed", now)
            self.message = "" if code == 0 else f"test failed: exit {code}"
        elif self.mode in ("once", "wait"):
            self.move("done", now)
            self.message = f"exit {code}" if code is not None else "exited"
        else:
            uptime = now - self.started
            self.rapid_exits = self.rapid_exits + 1 if uptime < self.min_uptime else 0
            delay = backoff.RESPAWN.delay(self.rapid_exits)
            self.retry_at = now + delay if delay else None
            self.move("exited", now)
            what = f"exit {code}" if code is not None else "exited"
            self.message = f"{what}; respawning too rapidly, next try in {delay:.2f}s" if delay else what

    def start_failed(self, message: str, now: float) -> None:
        """The command could not be started: an error, tried again as the backoff says."""
        self.rapid_exits += 1
        self.retry_at = backoff.SPAWN.retry_at(self.rapid_exits, now)
        self.message = message
        self.move("error", now)

    def view(self) -> EntryState:
        return EntryState(
            group=self.group,
            tag=self.tag,
            state=self.state,
            pid=self.pid if self.state in ("running", "stopping") else None,
            since=self.since,
            exit_code=self.exit_code,
            rapid_exits=self.rapid_exits,
            retry_at=self.retry_at,
            level=self.level,
            message=self.message,
        )


_SAVED = ("group", "tag", "state", "pid", "pgid", "ticks", "since", "started", "exit_code", "rapid_exits", "level", "mode", "min_uptime", "respawns")
_saved_fields = operator.attrgetter(*_SAVED)  # a record's saved fields as a tuple




def table_records(records: dict, saved: dict, *, hold=frozenset()) -> tuple[str, dict]:
    """The process table's records as JSON text, and the cache for the next call.

    Every spawn saves the whole table (the keeper must know the pid at once), so a cold start
    of N processes saves N records N times: each record's JSON is kept (`saved`: key ->
    (saved fields, their JSON)) and encoded again only when one of its saved fields (all
    immutable scalars) changed. A key in `hold` keeps its last saved text (or is left out).
    """
    texts = {}
    for key, r in records.items():
        if key in hold:
            if key in saved:
                texts[key] = saved[key]
            continue
        values = _saved_fields(r)
        known = saved.get(key)
        texts[key] = known if known is not None and known[0] == values else (values, json.dumps(dict(zip(_SAVED, values))))
    return ", ".join(text for _values, text in texts.values()), texts
