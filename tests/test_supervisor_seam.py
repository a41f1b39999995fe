"""The process supervisor's state machine, driven through its system-call seam (act/syscalls.Sys).

A fake Sys plays the kernel: spawns hand out pids that no process has (above pid_max), exits
are delivered as SIGCHLD would deliver them (Supervisor.reap), signals are recorded and may
make the process exit. No process is spawned and no cgroup is used (tree=False); only the
adoption tests look at a real process: this one, whose start time the table gets right or
wrong. The same behaviours with real processes and cgroups: test_cgroups.py, test_agent.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from reconciler import spec as specmod
from reconciler.act import process
from reconciler.host import procfs

from helpers import until

FIRST_PID = 5_000_000  # above the kernel's pid_max (at most 2**22): never a real process


class FakePopen:
    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None


class FakeSys(process.Sys):
    """The kernel, as the supervisor sees it. `events` is what happened, in order:
    ("spawn", pid, argv), ("signal", pgid, sig), ("exit", pid, code), ("cgroup_kill", group, tag)."""

    def __init__(self):
        self.next_pid = FIRST_PID
        self.events: list[tuple] = []
        self.fail: BaseException | None = None  # raised by the next spawn
        self.exit_on: dict[int, int] = {}  # a signal that makes the process exit, and its exit code
        self.exit_at_spawn: int | None = None  # a process that exits with this code as soon as it runs
        self.pending: dict[int, int] = {}  # exited, not reaped yet: pid -> exit code
        self.zombie_pids: set[int] = set()
        self.reaped_any: list[int] = []
        self.tables: list[str] = []
        self.disk_full = False
        self.sup: process.Supervisor | None = None

    # --- the seam ---

    def spawn(self, argv, *, env, cwd, user, log_path, creds=None, cgroup_fd=None, cgroup_path=""):
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        pid = self.next_pid
        self.next_pid += 1
        self.events.append(("spawn", pid, tuple(argv)))
        if self.exit_at_spawn is not None:
            asyncio.get_running_loop().call_soon(self.exit, pid, self.exit_at_spawn)
        return FakePopen(pid)

    def killpg(self, pgid, sig):
        self.events.append(("signal", pgid, sig))
        if sig in self.exit_on and pgid not in self.pending and not self._exited(pgid):
            asyncio.get_running_loop().call_soon(self.exit, pgid, self.exit_on[sig])
        return True

    def cgroup_kill(self, tree, group, tag):
        self.events.append(("cgroup_kill", group, tag))
        return True

    def write_table(self, path, text):
        if self.disk_full:
            raise OSError(28, "No space left on device")
        self.tables.append(text)
        super().write_table(path, text)

    def reap(self, pids=()):
        out = [(pid, self.pending.pop(pid)) for pid in pids if pid in self.pending]
        return out

    def zombies(self):
        return set(self.zombie_pids)

    def reap_any(self, pid):
        self.reaped_any.append(pid)
        self.zombie_pids.discard(pid)

    def pidfd(self, pid):
        return None  # no pidfd: nothing to watch (the supervisor copes, as on an old kernel)

    # --- the test's side ---

    def _exited(self, pid: int) -> bool:
        return any(e[0] == "exit" and e[1] == pid for e in self.events)

    def exit(self, pid: int, code: int) -> None:
        """The process exits: SIGCHLD makes the supervisor reap it."""
        self.events.append(("exit", pid, code))
        self.pending[pid] = code
        assert self.sup is not None
        self.sup.reap()

    def signals(self) -> list[tuple]:
        return [e for e in self.events if e[0] in ("signal", "exit")]


def entry(tag: str = "t", mode: str = "respawn", command=("server", "--flag"), **kw) -> specmod.Entry:
    return specmod.Entry(tag=tag, mode=mode, command=tuple(command), runlevels=("run",), **kw)


def supervisor(tmp_path, fake: FakeSys, node: str = "n1") -> process.Supervisor:
    sup = process.Supervisor(node=node, state_dir=tmp_path / "state", on_change=lambda: None, sys=fake, tree=False)
    fake.sup = sup
    return sup


def table(sup: process.Supervisor) -> dict:
    return {(r["group"], r["tag"]): r for r in json.loads(sup.state_file.read_text())["records"]}


# --- spawning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault, words", [
    (FileNotFoundError(2, "No such file or directory", "server"), "cannot start server: No such file or directory"),
    (PermissionError(13, "Permission denied", "server"), "cannot start server: Permission denied"),
])
def test_a_spawn_that_fails_is_an_error_with_the_os_message_and_a_retry_time(tmp_path, fault, words):
    fake = FakeSys()

    async def go():
        sup = supervisor(tmp_path, fake)
        for attempt in (1, 2):
            fake.fail = fault
            before = time.monotonic()
            with pytest.raises(process.StartError, match=words):
                await sup.start("g", entry(), level="run", env={})
            st = sup.snapshot()[("g", "t")]
            assert (st.state, st.pid, st.message, st.rapid_exits) == ("error", None, words, attempt)
            assert st.retry_at >= before + 1.0  # never retried at once
        assert sup.dirty  # saved with the agent's next save
        sup.save()
        assert table(sup)[("g", "t")]["state"] == "error"
        # the command appears: the next try runs it, counted as a respawn
        pid = await sup.start("g", entry(), level="run", env={})
        st = sup.snapshot()[("g", "t")]
        assert (st.state, st.pid, st.message, st.retry_at) == ("running", pid, "", None)
        assert sup.records[("g", "t")].respawns == 1
        assert table(sup)[("g", "t")]["pid"] == pid  # saved at once

    asyncio.run(go())
    assert [e[0] for e in fake.events] == ["spawn"]


def test_an_unknown_user_is_refused_before_any_spawn(tmp_path):
    fake = FakeSys()

    async def go():
        sup = supervisor(tmp_path, fake)
        with pytest.raises(process.StartError, match="unknown user 'no-such-user-x'"):
            await sup.start("g", entry(user="no-such-user-x"), level="run", env={})
        assert sup.snapshot()[("g", "t")].state == "error"

    asyncio.run(go())
    assert fake.events == []  # never run as anyone else (root)


def test_the_child_gets_the_entry_and_node_markers_in_its_environment(tmp_path):
    seen = {}

    class Spy(FakeSys):
        def spawn(self, argv, *, env, **kw):
            seen.update(env)
            return super().spawn(argv, env=env, **kw)

    fake = Spy()

    async def go():
        sup = supervisor(tmp_path, fake)
        await sup.start("g", entry(env=(("A", "1"),)), level="run", env={"RECONCILER_GROUP": "g"})
        return sup

    sup = asyncio.run(go())
    assert seen["A"] == "1" and seen["RECONCILER_GROUP"] == "g"
    assert seen["RECONCILER_ENTRY"] == "g/t" and seen["RECONCILER_NODE_DIR"] == str(sup.dir)


# --- exits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, code, state, message", [
    ("respawn", 3, "exited", "exit 3"),
    ("respawn", -9, "exited", "exit -9"),
    ("once", 0, "done", "exit 0"),
    ("once", 1, "done", "exit 1"),
])
def test_a_background_exit_moves_the_entry_by_its_mode(tmp_path, mode, code, state, message):
    fake = FakeSys()

    async def go():
        sup = supervisor(tmp_path, fake)
        pid = await sup.start("g", entry(mode=mode), level="run", env={})
        fake.exit(pid, code)
        st = sup.snapshot()[("g", "t")]
        assert (st.state, st.pid, st.exit_code, st.message) == (state, None, code, message)
        assert sup.dirty  # saved with the agent's next save
        sup.save()
        assert table(sup)[("g", "t")]["state"] == state
        return pid

    pid = asyncio.run(go())
    # a respawn's leader takes its process group with it (the next one must not meet its
    # predecessor's orphans); a `once` that exits is done, its group left alone
    assert (("signal", pid, signal.SIGKILL) in fake.events) == (mode == "respawn")


@pytest.mark.parametrize("mode, code, state, message", [
    ("test", 0, "passed", ""),
    ("test", 2, "failed", "test failed: exit 2"),
    ("wait", 0, "done", "exit 0"),
    ("wait", 5, "done", "exit 5"),
])
def test_a_foreground_start_returns_the_exit_code(tmp_path, mode, code, state, message):
    fake = FakeSys()
    fake.exit_at_spawn = code

    async def go():
        sup = supervisor(tmp_path, fake)
        assert await sup.start("g", entry(mode=mode), level="run", env={}) == code
        st = sup.snapshot()[("g", "t")]
        assert (st.state, st.exit_code, st.message) == (state, code, message)

    asyncio.run(go())


def test_a_foreground_entry_over_its_timeout_is_stopped(tmp_path):
    fake = FakeSys()
    fake.exit_on = {signal.SIGTERM: -15}

    async def go():
        sup = supervisor(tmp_path, fake)
        assert await sup.start("g", entry(mode="wait", timeout=0.05, stop_timeout=5.0), level="run", env={}) is None
        rec = sup.records[("g", "t")]
        assert rec.state == "stopped" and rec.message == "timed out after 0.05s"

    asyncio.run(go())
    pid = FIRST_PID
    assert fake.signals() == [("signal", pid, signal.SIGTERM), ("exit", pid, -15), ("signal", pid, signal.SIGKILL)]


def test_rapid_exits_back_off_exponentially_to_a_cap_and_never_give_up(tmp_path):
    """Three rapid exits in a row restart at once; then 0.25 s, doubling, up to 60 s."""
    fake = FakeSys()
    expected = [0, 0, 0, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    told: list[str] = []

    async def go():
        sup = supervisor(tmp_path, fake)
        sup.on_backoff = lambda g, t, why: told.append(why)  # the history's hook
        for n, delay in enumerate(expected, start=1):
            pid = await sup.start("g", entry(min_uptime=10.0), level="run", env={})
            fake.exit(pid, 1)
            rec = sup.records[("g", "t")]
            assert rec.state == "exited" and rec.rapid_exits == n
            if delay:
                assert rec.retry_at - rec.since == pytest.approx(delay)
                assert rec.message == f"exit 1; respawning too rapidly, next try in {delay:.2f}s"
            else:
                assert rec.retry_at is None and rec.message == "exit 1"
        assert rec.respawns == len(expected) - 1
        # The history hears of each step up of the backoff, not of every respawn (none at the cap)
        steps = [(n, d) for n, d in enumerate(expected, start=1) if d and d != expected[n - 2]]
        assert told == [f"exit 1; respawning too rapidly, next try in {d:.2f}s ({n} rapid exits in a row)" for n, d in steps]

    asyncio.run(go())


def test_an_exit_after_min_uptime_starts_the_count_again(tmp_path):
    fake = FakeSys()

    async def go():
        sup = supervisor(tmp_path, fake)
        for _ in range(5):
            fake.exit(await sup.start("g", entry(min_uptime=0.05), level="run", env={}), 1)
        assert sup.records[("g", "t")].rapid_exits == 5
        pid = await sup.start("g", entry(min_uptime=0.05), level="run", env={})
        await asyncio.sleep(0.06)  # the process runs longer than min_uptime: the time passing is the test
        fake.exit(pid, 1)
        rec = sup.records[("g", "t")]
        assert rec.rapid_exits == 0 and rec.retry_at is None and rec.message == "exit 1"

    asyncio.run(go())


# --- stopping ------------------------------------------------------------------------------------------------


def test_a_stop_that_sigterm_answers_needs_no_escalation(tmp_path):
    fake = FakeSys()
    fake.exit_on = {signal.SIGTERM: -15}

    async def go():
        sup = supervisor(tmp_path, fake)
        pid = await sup.start("g", entry(), level="run", env={})
        t0 = time.monotonic()
        await sup.stop("g", "t", sig=signal.SIGTERM, timeout=30)
        assert time.monotonic() - t0 < 5  # not the timeout
        st = sup.snapshot()[("g", "t")]
        assert (st.state, st.pid, st.message) == ("stopped", None, "stopped (exit -15)")
        return pid

    pid = asyncio.run(go())
    # SIGTERM, the exit, then SIGKILL for whatever the leader left in its process group
    assert fake.signals() == [("signal", pid, signal.SIGTERM), ("exit", pid, -15), ("signal", pid, signal.SIGKILL)]


@pytest.mark.parametrize("how", ["timeout", "deadline"])
def test_a_stop_escalates_to_sigkill_at_the_timeout_or_the_deadline(tmp_path, how):
    fake = FakeSys()
    fake.exit_on = {signal.SIGKILL: -9}  # ignores SIGTERM

    async def go():
        sup = supervisor(tmp_path, fake)
        pid = await sup.start("g", entry(), level="run", env={})
        t0 = time.monotonic()
        if how == "timeout":
            await sup.stop("g", "t", sig=signal.SIGTERM, timeout=0.1)
        else:  # a deadline sooner than the timeout wins (the lease runs out)
            await sup.stop("g", "t", sig=signal.SIGTERM, timeout=30, deadline=t0 + 0.1)
        took = time.monotonic() - t0
        assert 0.1 <= took < 5, took
        st = sup.snapshot()[("g", "t")]
        assert (st.state, st.message) == ("stopped", "stopped (exit -9)")
        return pid

    pid = asyncio.run(go())
    assert fake.signals() == [("signal", pid, signal.SIGTERM), ("signal", pid, signal.SIGKILL), ("exit", pid, -9),
                              ("signal", pid, signal.SIGKILL)]


def test_the_stop_signal_is_the_entrys(tmp_path):
    fake = FakeSys()
    fake.exit_on = {signal.SIGINT: 0}

    async def go():
        sup = supervisor(tmp_path, fake)
        pid = await sup.start("g", entry(), level="run", env={})
        await sup.stop("g", "t", sig=signal.SIGINT, timeout=30)
        assert sup.snapshot()[("g", "t")].message == "stopped (exit 0)"
        return pid

    pid = asyncio.run(go())
    assert fake.signals()[0] == ("signal", pid, signal.SIGINT)


def test_reset_never_forgets_a_live_process(tmp_path):
    fake = FakeSys()

    async def go():
        sup = supervisor(tmp_path, fake)
        pid = await sup.start("g", entry(), level="run", env={})
        sup.reset("g", "t")
        assert sup.snapshot()[("g", "t")].pid == pid
        fake.exit(pid, 0)
        sup.reset("g", "t")
        assert ("g", "t") not in sup.snapshot()

    asyncio.run(go())


# --- the table, orphans ----------------------------------------------------------------------------------------


def test_a_failed_save_keeps_the_record_and_is_retried(tmp_path):
    fake = FakeSys()

    async def go():
        sup = supervisor(tmp_path, fake)
        first = await sup.start("g", entry(), level="run", env={})
        fake.disk_full = True
        fake.exit(first, 1)
        second = await sup.start("g", entry(), level="run", env={})
        assert "No space left on device" in sup.save_error and sup.dirty
        assert sup.snapshot()[("g", "t")].pid == second  # tracked though the save failed
        assert table(sup)[("g", "t")]["pid"] == first  # the table is stale
        fake.disk_full = False
        sup.save()
        assert sup.save_error == "" and not sup.dirty
        assert table(sup)[("g", "t")]["pid"] == second

    asyncio.run(go())


def test_an_orphan_zombie_is_reaped_a_sweep_later_and_ours_never(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "ORPHAN_GRACE", 0.01)
    fake = FakeSys()

    async def go():
        sup = supervisor(tmp_path, fake)
        sup.attach(asyncio.get_running_loop())
        try:
            ours = await sup.start("g", entry(), level="run", env={})
            fake.zombie_pids = {ours, 4242}  # ours is reaped by its own record's reap
            sup.reap()  # SIGCHLD
            await until(lambda: fake.reaped_any, 5, what="the orphan reaped")
            assert fake.reaped_any == [4242]
        finally:
            sup.detach()

    asyncio.run(go())


def test_no_transition_outside_the_table():
    rec = process.Record(group="g", tag="t")
    for state in ("exited", "stopping", "done", "passed"):
        with pytest.raises(RuntimeError, match=f"no transition stopped -> {state}"):
            rec.move(state, 1.0)
    rec.move("running", 1.0)
    with pytest.raises(RuntimeError, match="no transition running -> error"):
        rec.move("error", 2.0)


# --- adoption ----------------------------------------------------------------------------------------------------


def write_table(sup: process.Supervisor, *records: dict) -> None:
    sup.state_file.write_text(json.dumps({"node": sup.node, "records": list(records)}))


@pytest.mark.parametrize("mode, state", [("respawn", "exited"), ("once", "done"), ("wait", "done"), ("test", "stopped")])
def test_a_recorded_pid_whose_start_time_differs_is_not_adopted(tmp_path, mode, state):
    """The table's pid is alive but is another process (the pid was reused): never adopted,
    never signalled; the entry is over, as its mode says."""
    me = os.getpid()
    fake = FakeSys()
    sup = supervisor(tmp_path, fake)
    write_table(sup, {"group": "g", "tag": "t", "state": "running", "pid": me, "pgid": me, "mode": mode,
                      "ticks": procfs.start_ticks(me) + 1, "rapid_exits": 2, "level": "run"})
    assert sup.adopt() == []
    rec = sup.records[("g", "t")]
    assert (rec.state, rec.pid) == (state, None)
    assert rec.message == "exited while the agent was down"
    assert (rec.mode, rec.rapid_exits, rec.level) == (mode, 2, "run")  # what the kernel cannot tell
    assert fake.events == []


def test_a_recorded_pid_with_its_start_time_is_adopted(tmp_path):
    me = os.getpid()
    fake = FakeSys()
    sup = supervisor(tmp_path, fake)
    write_table(sup, {"group": "g", "tag": "t", "state": "running", "pid": me, "pgid": me, "mode": "respawn",
                      "ticks": procfs.start_ticks(me), "respawns": 4, "level": "run"})
    (adopted,) = sup.adopt()
    assert (adopted.group, adopted.tag, adopted.pid, adopted.state) == ("g", "t", me, "running")
    assert adopted.message == "adopted after agent restart" and adopted.respawns == 4
    assert sup.snapshot()[("g", "t")].pid == me
    assert fake.events == []


@pytest.mark.parametrize("damage", ["missing", "garbage", "not a list"])
def test_a_damaged_table_adopts_nothing_it_cannot_prove(tmp_path, damage):
    fake = FakeSys()
    sup = supervisor(tmp_path, fake)
    if damage == "garbage":
        sup.state_file.write_bytes(b"\0" * 40)
    elif damage == "not a list":
        sup.state_file.write_text('{"node": "n1", "records": {"g": 1}}')
    assert sup.adopt() == [] and sup.records == {}
