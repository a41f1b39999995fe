"""Process supervision: spawn, watch exits, stop with escalation, adopt after a restart.

Each entry's process is an explicit state machine (TRANSITIONS); every system call goes
through `Sys`, the one seam tests can observe. Exits are noticed at once: SIGCHLD wakes the
reaper for our own children, a pidfd for adopted processes (which are not our children).
There is no terminal FATAL: a process that keeps dying backs off exponentially to a cap and
is tried again.
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import attrs

from reconciler import notify
from reconciler import spec as specmod
from reconciler.act.syscalls import Sys, start_ticks  # process.Sys: the seam tests subclass
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
RAPID_FREE = 3  # this many rapid exits in a row restart at once; then the backoff starts
BACKOFF_BASE = 0.25
BACKOFF_CAP = 60.0
ORPHAN_GRACE = 1.0  # an unknown child still a zombie this long after SIGCHLD has no waiter: reap it


def backoff(rapid_exits: int) -> float:
    if rapid_exits <= RAPID_FREE:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (rapid_exits - RAPID_FREE - 1))


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
    exited: asyncio.Future | None = attrs.field(default=None, repr=False)
    pidfd: int | None = attrs.field(default=None, repr=False)

    def move(self, state: str, now: float) -> None:
        if state != self.state and state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.group}/{self.tag}: no transition {self.state} -> {state}")
        self.state = state
        self.since = now

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


class Supervisor:
    def __init__(
        self, *, node: str, state_dir: str | os.PathLike, on_change: Callable[[], None], sys: Sys | None = None, create: bool = True
    ):
        self.node = node
        self.dir = Path(state_dir) / node
        self.logs = self.dir / "logs"
        if create:
            self.logs.mkdir(parents=True, exist_ok=True)
        self.records: dict[tuple[str, str], Record] = {}
        self.sys = sys or Sys()
        self.on_change = on_change
        self.dirty = False
        self._saved_texts: dict[tuple[str, str], tuple[tuple, str]] = {}  # key -> (saved fields, their JSON)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweep_at: asyncio.TimerHandle | None = None
        self._zombies: set[int] = set()  # unknown zombie children seen by the last sweep
        # One spawn per turn of the event loop: a burst of starts (a node taking over 100
        # groups) must not hold the loop for the whole burst, or the heartbeat cannot renew
        # the lease in time and the node demotes itself.
        self._spawn_turn = asyncio.Lock()

    # --- exits ----------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def detach(self) -> None:
        if self.loop is not None:
            self.loop.remove_signal_handler(signal.SIGCHLD)
            if self._sweep_at is not None:
                self._sweep_at.cancel()
                self._sweep_at = None
            for rec in self.records.values():
                self._close_pidfd(rec)

    def reap(self) -> None:
        by_pid = {r.pid: r for r in self.records.values() if r.pid and r.state in ("running", "stopping")}
        changed = False
        if self.loop is not None and self._sweep_at is None:
            self._sweep_at = self.loop.call_later(ORPHAN_GRACE, self._sweep)
        for pid, code in self.sys.reap(list(by_pid)):
            rec = by_pid.get(pid)
            if rec is not None:
                if rec.popen is not None:
                    rec.popen.returncode = code  # we reaped it; keep Popen from waiting again
                self._exited(rec, code)
                changed = True
        if changed:
            self.on_change()

    def _sweep(self) -> None:
        """Reap children nobody waits for (orphans re-parented to us when we are PID 1 of a
        namespace, a helper whose waiter gave up): zombies still unreaped a sweep later."""
        self._sweep_at = None
        ours = {r.pid for r in self.records.values() if r.pid and r.state in ("running", "stopping")}
        now = self.sys.zombies() - ours
        for pid in now & self._zombies:
            self.sys.reap_any(pid)
        self._zombies = now - self._zombies
        if self._zombies and self.loop is not None:
            self._sweep_at = self.loop.call_later(ORPHAN_GRACE, self._sweep)

    def _pidfd_ready(self, rec: Record) -> None:
        self._close_pidfd(rec)
        if rec.state in ("running", "stopping"):
            self._exited(rec, None)
            self.on_change()

    def _close_pidfd(self, rec: Record) -> None:
        if rec.pidfd is not None:
            if self.loop is not None:
                self.loop.remove_reader(rec.pidfd)
            os.close(rec.pidfd)
            rec.pidfd = None

    def _exited(self, rec: Record, code: int | None) -> None:
        now = time.monotonic()
        rec.exit_code = code
        stopping = rec.state == "stopping"
        if rec.pgid:
            # Whatever the leader left behind in its group goes with it on a planned stop, and
            # before a respawn: the new leader must not meet its predecessor's orphans, and
            # neither stops nor the keeper would ever find them (only the new group is recorded).
            if stopping or rec.mode == "respawn":
                self.sys.killpg(rec.pgid, signal.SIGKILL)
        if stopping:
            rec.move("stopped", now)
            rec.message = f"stopped (exit {code})" if code is not None else "stopped"
        elif rec.mode == "test":
            rec.move("passed" if code == 0 else "failed", now)
            rec.message = "" if code == 0 else f"test failed: exit {code}"
        elif rec.mode in ("once", "wait"):
            rec.move("done", now)
            rec.message = f"exit {code}" if code is not None else "exited"
        else:
            uptime = now - rec.started
            rec.rapid_exits = rec.rapid_exits + 1 if uptime < rec.min_uptime else 0
            delay = backoff(rec.rapid_exits)
            rec.retry_at = now + delay if delay else None
            rec.move("exited", now)
            what = f"exit {code}" if code is not None else "exited"
            rec.message = f"{what}; respawning too rapidly, next try in {delay:.2f}s" if delay else what
        self._close_pidfd(rec)
        if rec.exited is not None and not rec.exited.done():
            rec.exited.set_result(code)
        self.dirty = True

    # --- actions --------------------------------------------------------------------------

    def snapshot(self) -> dict[tuple[str, str], EntryState]:
        return {k: r.view() for k, r in self.records.items()}

    def record(self, group: str, tag: str) -> Record:
        key = (group, tag)
        if key not in self.records:
            self.records[key] = Record(group=group, tag=tag)
        return self.records[key]

    def log_path(self, group: str, tag: str) -> Path:
        return self.logs / f"{group}.{tag}.log"

    async def start(self, group: str, entry: specmod.Entry, *, level: str, env: dict[str, str]) -> int | None:
        """Start the entry's process; for wait/test entries, wait for it to exit (foreground).

        Returns the pid (background) or the exit code (foreground). A command that cannot be
        started moves the entry to `error` with the OS's message and a retry time.
        """
        async with self._spawn_turn:
            await asyncio.sleep(0)
            popen = self._spawn(group, entry, level=level, env=env)
        rec = self.records[(group, entry.tag)]
        if not entry.foreground:
            return popen.pid
        try:
            return await asyncio.wait_for(asyncio.shield(rec.exited), entry.timeout)
        except TimeoutError:
            await self.stop(group, entry.tag, sig=entry.stop_signal, timeout=entry.stop_timeout)
            rec.message = f"timed out after {entry.timeout:g}s"
            return None

    def _spawn(self, group: str, entry: specmod.Entry, *, level: str, env: dict[str, str]) -> subprocess.Popen:
        """Spawn and record the process (synchronous: nothing runs between the two)."""
        rec = self.record(group, entry.tag)
        now = time.monotonic()
        rec.mode, rec.min_uptime, rec.level = entry.mode, entry.min_uptime, level
        # without NOTIFY_SOCKET and WATCHDOG_*: those are systemd's words to the agent alone
        full_env = {**notify.child_environ(), **dict(entry.env), **env}
        try:
            popen = self.sys.spawn(entry.command, env=full_env, cwd=entry.cwd, user=entry.user, log_path=self.log_path(group, entry.tag))
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            rec.rapid_exits += 1
            rec.retry_at = now + max(1.0, backoff(rec.rapid_exits))
            rec.message = f"cannot start {entry.command[0]}: {getattr(exc, 'strerror', None) or exc}"
            rec.move("error", now)
            self.dirty = True
            raise StartError(rec.message) from None
        if rec.state in ("exited", "error"):
            rec.respawns += 1
        rec.popen, rec.pid, rec.pgid = popen, popen.pid, popen.pid
        rec.ticks = start_ticks(popen.pid)
        rec.started, rec.exit_code, rec.retry_at, rec.message = now, None, None, ""
        rec.exited = asyncio.get_running_loop().create_future()
        rec.move("running", now)
        self.dirty = True
        self.save()  # before anything else: the keeper must know this pid if we freeze now
        return popen

    async def stop(self, group: str, tag: str, *, sig: int, timeout: float, deadline: float | None = None) -> None:
        """Signal the process group; SIGKILL it after `timeout` (or at `deadline`, if sooner)."""
        rec = self.records.get((group, tag))
        if rec is None or rec.state not in ("running", "stopping"):
            return
        loop = asyncio.get_running_loop()
        if rec.exited is None:
            rec.exited = loop.create_future()
        if rec.state == "running":
            rec.move("stopping", time.monotonic())
            self.dirty = True
            self.sys.killpg(rec.pgid or rec.pid, sig)
        kill_at = time.monotonic() + timeout
        if deadline is not None:
            kill_at = min(kill_at, deadline)
        try:
            await asyncio.wait_for(asyncio.shield(rec.exited), max(0.0, kill_at - time.monotonic()))
            return
        except TimeoutError:
            pass
        self.sys.killpg(rec.pgid or rec.pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(rec.exited), 10.0)
        except TimeoutError:
            rec.message = "did not exit 10s after SIGKILL (uninterruptible sleep?)"

    def reset(self, group: str, tag: str) -> None:
        rec = self.records.pop((group, tag), None)
        if rec is not None and rec.state in ("running", "stopping"):
            self.records[(group, tag)] = rec  # never forget a live process
            return
        self.dirty = True

    def kill_all_now(self) -> None:
        for rec in self.records.values():
            if rec.state in ("running", "stopping") and rec.pgid:
                self.sys.killpg(rec.pgid, signal.SIGKILL)

    # --- persistence and adoption ------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "processes.json"

    def save(self) -> None:
        if not self.dirty:
            return
        # Every spawn saves the whole table (the keeper must know the pid at once), so a
        # cold start of N processes saves N records N times: each record's JSON is kept and
        # encoded again only when one of its saved fields (all immutable scalars) changed.
        texts = {}
        for key, r in self.records.items():
            values = _saved_fields(r)
            known = self._saved_texts.get(key)
            texts[key] = known if known is not None and known[0] == values else (values, json.dumps(dict(zip(_SAVED, values))))
        self._saved_texts = texts
        records = ", ".join(text for _values, text in texts.values())
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(f'{{"node": {json.dumps(self.node)}, "records": [{records}]}}')
        os.replace(tmp, self.state_file)
        self.dirty = False

    def adopt(self) -> list[Record]:
        """Take over the processes a previous agent started that are still alive.

        A process is ours only if both its pid and its start time match the record, so a
        recycled pid is never mistaken for it. Returns the adopted records.
        """
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return []
        adopted = []
        now = time.monotonic()
        for raw in data.get("records", []):
            rec = Record(**{k: raw.get(k) for k in _SAVED if k in raw})
            if rec.state in ("running", "stopping"):
                if rec.pid and rec.ticks is not None and start_ticks(rec.pid) == rec.ticks:
                    rec.state = "running"
                    rec.message = "adopted after agent restart"
                    fd = self.sys.pidfd(rec.pid)
                    if fd is not None and self.loop is not None:
                        rec.pidfd = fd
                        self.loop.add_reader(fd, self._pidfd_ready, rec)
                    adopted.append(rec)
                else:
                    rec.state, rec.pid, rec.since = "exited", None, now
                    rec.message = "exited while the agent was down"
                    if rec.mode == "test":
                        rec.state = "stopped"
                    elif rec.mode in ("once", "wait"):
                        rec.state = "done"
            rec.since = min(rec.since, now) if rec.since else now
            self.records[(rec.group, rec.tag)] = rec
        self.dirty = True
        return adopted


class StartError(Exception):
    """The command could not be started (missing binary, bad cwd or user)."""
