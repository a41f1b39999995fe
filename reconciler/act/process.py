"""Process supervision: spawn, watch exits, stop with escalation, adopt after a restart.

Each entry's process is an explicit state machine (TRANSITIONS); every system call goes
through `Sys`, the one seam tests can observe. Exits are noticed at once: SIGCHLD wakes the
reaper for our own children, a pidfd for adopted processes (which are not our children).
There is no terminal FATAL: a process that keeps dying backs off exponentially to a cap and
is tried again.

Each entry runs in a cgroup of its own (reconciler/host/cgroups.py): the kernel knows every
process an entry started, also those that double-forked or called setsid(), so stops,
respawns and adoption do not depend on the process table. Where cgroups cannot be written
(or with RECONCILER_CGROUPS=off) the table is trusted only with the environment marker
every child carries (RECONCILER_NODE_DIR, RECONCILER_ENTRY), read back from /proc.

Adoption is act/adoption.py; what an exit or a failed start does to a record, and the
table encoding, act/records.py; the backoff, decide/backoff.py.

(About 450 lines: the state machine's transitions, spawn, stop and the reaper are one
object's, and the crash-loop and failed-start log lines belong with the exits and spawns
they describe.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, cast

from reconciler.host import cgroups
from reconciler.host import notify
from reconciler import spec as specmod
from reconciler.act import adoption
from reconciler.decide import backoff
from reconciler.act.records import _SAVED, TRANSITIONS, Record, table_records  # noqa: F401 (re-exported)
from reconciler.act.syscalls import MARK_DIR, MARK_ENTRY, Sys, credentials, joining, pgid_of, start_ticks  # process.Sys: the seam tests subclass
from reconciler.host import procfs
from reconciler.observe import EntryState

log = logging.getLogger("reconciler.process")
ORPHAN_GRACE = 1.0  # an unknown child still a zombie this long after SIGCHLD has no waiter: reap it
DRAIN_TIMEOUT = 2.0  # after cgroup.kill, how long a stop waits for the cgroup to empty
JOIN_TIMEOUT = 5.0  # how long start() waits for a child to join its cgroup and exec


class Supervisor:
    def __init__(
        self, *, node: str, state_dir: str | os.PathLike, on_change: Callable[[], None], sys: Sys | None = None, create: bool = True,
        tree: cgroups.Tree | None | bool = True, on_failure: Callable[[str, str, str, str], None] = lambda g, t, cause, msg: None,
        on_backoff: Callable[[str, str, str], None] = lambda g, t, why: None,
    ):
        """`tree`: True finds the node's cgroup subtree (under this process's cgroup; for a
        `create=False` observer such as --dry-run, under the running agent's), False or
        None runs without cgroups (the fail-closed table and environment markers)."""
        self.node = node
        self.dir = Path(os.path.abspath(Path(state_dir) / node))  # as the keeper spells it (the marker)
        self.logs = self.dir / "logs"
        self.create = create
        if create:
            # 0700: the table, the lease and the logs are the agent's alone
            for d in (self.dir, self.logs):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)
        self.cgroup_note = ""  # why cgroups are not used ("": they are)
        if tree is True:
            tree, self.cgroup_note = cgroups.Tree.open(node, pid="self" if create else (procfs.agent_pid(str(self.dir)) or "self"))
        elif not tree:
            tree, self.cgroup_note = None, "cgroups not used"
        self.tree: cgroups.Tree | None = tree
        self.save_error = ""  # the last failed save of the table ("": saved)
        self.records: dict[tuple[str, str], Record] = {}
        self.sys = sys or Sys()
        self.on_change = on_change
        # (group, tag, cause, message): a rapid exit or a failed start, one failure of the
        # group on this node (act/ledger.py; decide/health.py counts them)
        self.on_failure = on_failure
        self.on_backoff = on_backoff  # a respawn entry's backoff stepped up (group, tag, why): the history
        self.dirty = False
        self._saved_texts: dict[tuple[str, str], tuple[tuple, str]] = {}  # key -> (saved fields, their JSON)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweep_at: asyncio.TimerHandle | None = None
        self._zombies: set[int] = set()  # unknown zombie children seen by the last sweep
        # One spawn per turn of the event loop: a burst of starts (a node taking over 100
        # groups) must not hold the loop for the whole burst, or the heartbeat cannot renew
        # the lease in time and the node demotes itself.
        self._spawn_turn = asyncio.Lock()
        self._joining: set[tuple[str, str]] = set()  # spawned, still joining their cgroup
        self._drains: set[asyncio.Task] = set()

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
        if self.tree is not None and self.create:
            cgroups.remove(self.tree.root)  # only what is empty: nothing that still runs

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
        if not stopping and rec.mode == "once" and self._follow(rec, code):
            return  # it daemonized: the entry runs on in its cgroup
        # Whatever the leader left behind goes with it on a planned stop, and before a
        # respawn: the new leader must not meet its predecessor's orphans. Its process
        # group, and (also those that called setsid()) its cgroup.
        if stopping or rec.mode == "respawn":
            if rec.pgid:
                self.sys.killpg(rec.pgid, signal.SIGKILL)
            self.kill_entry(rec.group, rec.tag)
        rec.ended(code, now)
        if rec.state == "exited":
            self._log_exit(rec, now)
            if rec.rapid_exits:
                self.on_failure(rec.group, rec.tag, "rapid_exit", rec.message)
        self._close_pidfd(rec)
        if rec.exited is not None and not rec.exited.done():
            rec.exited.set_result(code)
        self.dirty = True

    def _log_exit(self, rec: Record, now: float) -> None:
        """A respawn entry exited: at INFO while it is respawned at once, at WARNING once per
        step of the rapid-exit backoff, at DEBUG once the backoff stays at its cap (not at
        every respawn of a crash loop)."""
        where = f"{rec.group}/{rec.tag}"
        extra = {"group": rec.group, "tag": rec.tag}
        if rec.retry_at is None:
            log.info("%s exited after %.1fs: %s; respawning", where, now - rec.started, rec.message, extra=extra)
        elif backoff.RESPAWN.steps_up(rec.rapid_exits):
            log.warning("%s: %s (%d rapid exits in a row; each further step of the backoff is logged)", where,
                        rec.message, rec.rapid_exits, extra=extra)
            self.on_backoff(rec.group, rec.tag, f"{rec.message} ({rec.rapid_exits} rapid exits in a row)")
        else:
            log.debug("%s: %s (%d rapid exits in a row)", where, rec.message, rec.rapid_exits, extra=extra)

    @staticmethod
    def _log_start_failed(rec: Record, now: float, *, first: bool) -> None:
        """A start failed: at WARNING the first time in a row and at each step of the spawn
        backoff, at DEBUG otherwise (a missing program is retried for ever; the operator needs
        the news, not a line per retry). The executor leaves this failure to us."""
        where = f"{rec.group}/{rec.tag}"
        extra = {"group": rec.group, "tag": rec.tag}
        delay = (rec.retry_at or now) - now
        if first or backoff.SPAWN.steps_up(rec.rapid_exits):
            log.warning("%s: %s (%d failures in a row, next try in %.2fs; each further step of the backoff is logged)",
                        where, rec.message, rec.rapid_exits, delay, extra=extra)
        else:
            log.debug("%s: %s (%d failures in a row, next try in %.2fs)", where, rec.message, rec.rapid_exits, delay, extra=extra)

    def _follow(self, rec: Record, code: int | None) -> bool:
        """A `once` leader exited while its cgroup still holds processes (a daemon that forked
        into the background): follow the oldest of them as the entry's process."""
        if self.tree is None:
            return False
        leader = adoption.choose_leader([p for p in self.tree.procs(rec.group, rec.tag) if p != rec.pid])
        if leader is None:
            return False
        self._close_pidfd(rec)
        rec.popen, rec.pid, rec.pgid, rec.ticks = None, leader, pgid_of(leader) or leader, start_ticks(leader)
        rec.message = f"leader exited ({'exit ' + str(code) if code is not None else 'exited'}); following pid {leader} in its cgroup"
        self.watch(rec)
        self.dirty = True
        return True

    def kill_entry(self, group: str, tag: str) -> None:
        """SIGKILL every process of the entry: its cgroup, or (without cgroups) every process
        carrying its environment marker (a scan of /proc)."""
        if self.tree is not None:
            self.sys.cgroup_kill(self.tree, group, tag)
            return
        for pid in procfs.marked_processes(str(self.dir)).get(f"{group}/{tag}", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def watch(self, rec: Record) -> None:
        """Notice the exit of a process that is not our child (adopted, followed): its pidfd."""
        fd = self.sys.pidfd(rec.pid) if rec.pid else None
        if fd is None:
            return
        if self.loop is None:
            os.close(fd)
            return
        rec.pidfd = fd
        self.loop.add_reader(fd, self._pidfd_ready, rec)

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
        if (group, entry.tag) in self._joining:
            await self._until_joined(group, entry.tag, popen.pid)
        rec = self.records[(group, entry.tag)]
        if not entry.foreground:
            return popen.pid
        exited = cast("asyncio.Future[int | None]", rec.exited)  # _spawn gave it one; nothing takes it away
        try:
            return await asyncio.wait_for(asyncio.shield(exited), entry.timeout)
        except TimeoutError:
            await self.stop(group, entry.tag, sig=entry.stop_signal, timeout=entry.stop_timeout)
            rec.message = f"timed out after {entry.timeout:g}s"
            return None

    def _spawn(self, group: str, entry: specmod.Entry, *, level: str, env: dict[str, str]) -> subprocess.Popen:
        """Spawn and record the process (synchronous: nothing runs between the two)."""
        rec = self.record(group, entry.tag)
        now = time.monotonic()
        rec.mode, rec.min_uptime, rec.level = entry.mode, entry.min_uptime, level
        cgroup_fd = None
        try:
            creds = credentials(entry.user, getattr(entry, "group", None))
            if self.tree is not None:
                if self.tree.populated(group, entry.tag):  # what a dead leader left behind
                    self.sys.cgroup_kill(self.tree, group, entry.tag)
                cgroup_fd = self.tree.open_procs(group, entry.tag)
            # without NOTIFY_SOCKET and WATCHDOG_*: those are systemd's words to the agent
            # alone; the user's HOME, USER, LOGNAME unless the entry sets them; the marker last
            full_env = {
                **notify.child_environ(), **(creds.env() if creds else {}), **dict(entry.env), **env,
                MARK_DIR: str(self.dir), MARK_ENTRY: f"{group}/{entry.tag}",
            }
            popen = self.sys.spawn(
                entry.command, env=full_env, cwd=entry.cwd, user=entry.user, log_path=self.log_path(group, entry.tag),
                creds=creds, cgroup_fd=cgroup_fd, cgroup_path=self.tree.path(group, entry.tag) if self.tree else "",
            )
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            argv0 = cast(tuple[str, ...], entry.command)[0]  # a process entry: the loader requires its command
            first = rec.state != "error"
            rec.start_failed(f"cannot start {argv0}: {getattr(exc, 'strerror', None) or exc}", now)
            self._log_start_failed(rec, now, first=first)
            self.dirty = True
            self.on_failure(group, entry.tag, "start_failed", rec.message)
            raise StartError(rec.message) from None
        finally:
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        if rec.state in ("exited", "error"):
            rec.respawns += 1
        rec.popen, rec.pid, rec.pgid = popen, popen.pid, popen.pid
        rec.ticks = start_ticks(popen.pid)
        rec.started, rec.exit_code, rec.retry_at, rec.message = now, None, None, ""
        rec.exited = asyncio.get_running_loop().create_future()
        rec.move("running", now)
        self.dirty = True
        if cgroup_fd is not None:
            # The table shows the new pid once it runs the command (not the shell joining the
            # cgroup): meanwhile the keeper finds it among the agent's children, and from
            # then on in its cgroup.
            self._joining.add((group, entry.tag))
        self.save()  # before anything else: the keeper must know this pid if we freeze now
        return popen

    async def _until_joined(self, group: str, tag: str, pid: int) -> None:
        """Wait until the child has joined its cgroup and exec'd the command (the join may
        wait for an RCU grace period: docs/performance.md), or exited; then save it."""
        key, until = (group, tag), time.monotonic() + JOIN_TIMEOUT
        try:
            while time.monotonic() < until:
                rec = self.records.get(key)
                if rec is None or rec.pid != pid or rec.state not in ("running", "stopping") or not joining(pid):
                    break
                await asyncio.sleep(0.001)
        finally:
            self._joining.discard(key)
            self.dirty = True
            self.save()

    async def stop(self, group: str, tag: str, *, sig: int, timeout: float, deadline: float | None = None,
                   resume: bool = False) -> None:
        """Signal the process group; SIGKILL it after `timeout` (or at `deadline`, if sooner).
        Once the leader is gone, everything left in the entry's cgroup is killed and the
        stop returns when the cgroup is empty (then removed). `resume`: SIGCONT after the
        signal (a restart of an unhealthy entry: a stopped process would hold the signal
        pending until SIGKILL; systemd sends SIGCONT after its stop signal for this reason)."""
        rec = self.records.get((group, tag))
        if rec is None or rec.state not in ("running", "stopping"):
            await self._drain(group, tag)
            return
        loop = asyncio.get_running_loop()
        if rec.exited is None:
            rec.exited = loop.create_future()
        if rec.state == "running":
            rec.move("stopping", time.monotonic())
            self.dirty = True
            # cast: a running (or stopping) record has a pid: _spawn, adoption and _follow set
            # one; only adoption clears it, of a record that no longer runs
            self.sys.killpg(cast(int, rec.pgid or rec.pid), sig)
            if resume:
                self.sys.killpg(cast(int, rec.pgid or rec.pid), signal.SIGCONT)
        kill_at = time.monotonic() + timeout
        if deadline is not None:
            kill_at = min(kill_at, deadline)
        try:
            await asyncio.wait_for(asyncio.shield(rec.exited), max(0.0, kill_at - time.monotonic()))
        except TimeoutError:
            self.sys.killpg(cast(int, rec.pgid or rec.pid), signal.SIGKILL)  # (has a pid: above)
            self.kill_entry(group, tag)
            try:
                await asyncio.wait_for(asyncio.shield(rec.exited), 10.0)
            except TimeoutError:
                rec.message = "did not exit 10s after SIGKILL (uninterruptible sleep?)"
                return
        await self._drain(group, tag)

    async def _drain(self, group: str, tag: str) -> None:
        """Kill what is left in the entry's cgroup, wait (a little) until it is empty, remove it."""
        if self.tree is None or not os.path.isdir(self.tree.path(group, tag)):
            return
        if self.tree.populated(group, tag):
            self.sys.cgroup_kill(self.tree, group, tag)
            until = time.monotonic() + DRAIN_TIMEOUT
            while self.tree.populated(group, tag) and time.monotonic() < until:
                await asyncio.sleep(0.005)
        rec = self.records.get((group, tag))
        if rec is None or rec.state not in ("running", "stopping"):
            self.tree.remove(group, tag)

    def reset(self, group: str, tag: str) -> None:
        rec = self.records.pop((group, tag), None)
        if rec is not None and rec.state in ("running", "stopping"):
            self.records[(group, tag)] = rec  # never forget a live process
            return
        self.dirty = True
        if self.tree is None and rec is not None and rec.mode != "respawn":
            self.kill_entry(group, tag)  # what a `once` or `wait` entry left running
        elif self.tree is not None and os.path.isdir(self.tree.path(group, tag)):
            # stopped for good: what a `once` or `wait` entry left running goes too
            if self.tree.populated(group, tag) and self.loop is not None:
                task = self.loop.create_task(self._drain(group, tag))
                self._drains.add(task)  # (a task nobody references may be collected mid-way)
                task.add_done_callback(self._drains.discard)
            else:
                self.tree.remove(group, tag)

    def kill_all_now(self) -> None:
        for rec in self.records.values():
            if rec.state in ("running", "stopping") and rec.pgid:
                self.sys.killpg(rec.pgid, signal.SIGKILL)
        if self.tree is not None:
            self.tree.kill_all()

    # --- persistence and adoption ------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "processes.json"

    def save(self) -> None:
        if not self.dirty:
            return
        records, self._saved_texts = table_records(self.records, self._saved_texts, hold=self._joining)
        try:
            self.sys.write_table(self.state_file, f'{{"node": {json.dumps(self.node)}, "records": [{records}]}}')
        except OSError as exc:
            # Not fatal, and never a reason to forget a process: the record stays in memory
            # (dirty: saved again next time), the keeper and a successor find the processes
            # in their cgroups (or by their environment marker) without the table.
            if not self.save_error:
                log.error("cannot save the process table %s: %s (the cgroups/markers still tell)", self.state_file, exc.strerror or exc)
            self.save_error = f"cannot save {self.state_file}: {exc.strerror or exc}"
            return
        if self.save_error:
            log.warning("process table saved again")
            self.save_error = ""
        self.dirty = False

    def adopt(self) -> list[Record]:
        """Take over the processes a previous agent started that are still alive: from the
        entries' cgroups (or, without cgroups, the environment markers in /proc) and the
        table, which need not be intact. Returns the adopted records."""
        adopted = adoption.adopt(self)
        for rec in adopted:
            self.watch(rec)
        self.dirty = True
        return adopted


class StartError(Exception):
    """The command could not be started (missing binary, bad cwd or user)."""
