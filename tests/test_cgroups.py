"""Every entry's processes known from the kernel: a cgroup (v2) per entry, and where cgroups
cannot be used, the environment marker with a table that fails closed.

Real processes and real cgroups (as root), one Supervisor on a real event loop; the
reproductions with real agents and two nodes are in test_cgroup_cluster.py; the state
machine alone, through the syscall seam, in test_supervisor_seam.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from reconciler import keeper
from reconciler.host import cgroups
from reconciler import spec as specmod
from reconciler.act import process
from reconciler.host import procfs

from helpers import alive, read_pid, until, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "cgroup2", "mount")]  # cgroups, users, /proc/PID/environ

# A daemon: the leader's child calls setsid() and double-forks; the leader itself execs sleep.
DAEMON = "(setsid sh -c 'sleep 300 & echo $! > {pidfile}; wait' &); exec sleep 301"


def entry(tag: str, command: str | list[str], mode: str = "respawn", **kw) -> specmod.Entry:
    argv = ("/bin/sh", "-c", command) if isinstance(command, str) else tuple(command)
    return specmod.Entry(tag=tag, mode=mode, command=argv, runlevels=("run",), **kw)


class Harness:
    """A supervisor for a node named uniquely for this test, cleaned up after it."""

    def __init__(self, tmp_path, *, tree=True, sys_=None, node=None):
        self.tmp = tmp_path
        self.node = node or f"t{os.getpid()}-{time.monotonic_ns() % 10**9}"
        self.sup = process.Supervisor(node=self.node, state_dir=tmp_path / "state", on_change=lambda: None, tree=tree, sys=sys_)
        self.pidfile = tmp_path / "daemon.pid"  # where DAEMON's daemon writes its pid

    def again(self, *, tree=True) -> process.Supervisor:
        """A second supervisor for the same node: the agent restarted."""
        return process.Supervisor(node=self.node, state_dir=self.tmp / "state", on_change=lambda: None, tree=tree)

    @contextlib.asynccontextmanager
    async def attached(self, sup: process.Supervisor | None = None):
        """The supervisor on the running loop (its SIGCHLD handler), detached after."""
        sup = sup or self.sup
        sup.attach(asyncio.get_running_loop())
        try:
            yield sup
        finally:
            sup.detach()

    async def start_daemon(self, what: str = "the daemon") -> tuple[int, int]:
        """Entry g/d runs DAEMON: (the leader's pid, the daemon's, once it has written it)."""
        pid = await self.sup.start("g", entry("d", DAEMON.format(pidfile=self.pidfile)), level="run", env={})
        return pid, await until(lambda: read_pid(self.pidfile), what=what)

    async def start_leaving(self, tag: str, cmd: str, *, mode: str, what: str = "the daemon") -> int:
        """Entry g/TAG runs CMD, which leaves a daemon behind that writes its pid to the
        pidfile (cleared first): the daemon's pid, once written."""
        self.pidfile.unlink(missing_ok=True)
        await self.sup.start("g", entry(tag, cmd.format(p=self.pidfile), mode=mode), level="run", env={})
        return await until(lambda: read_pid(self.pidfile), what=what)

    def cleanup(self):
        for pids in procfs.marked_processes(str(self.sup.dir)).values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        root = cgroups.node_root(self.node)
        if root and os.path.isdir(root):
            cgroups.kill(root)
            with contextlib.suppress(AssertionError):  # best effort: remove() keeps what still runs
                wait_until(lambda: not cgroups.populated(root), 5, what=f"{root} empty")
            cgroups.remove(root)


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(**kw):
        h = Harness(tmp_path, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()


def run(coro):
    return asyncio.run(coro)


# --- layout -------------------------------------------------------------------------------------


def test_the_node_subtree_is_under_our_own_cgroup_and_names_cannot_meet_interface_files(tmp_path):
    point, _root = cgroups.mount()
    own = cgroups.own_cgroup()
    root = cgroups.node_root("n1")
    assert root == os.path.join(point, own.strip("/"), "reconciler-n1").replace("//", "/")
    tree = cgroups.Tree(root)
    # a group or tag named like an interface file gets a directory of its own
    assert tree.path("cgroup.procs", "memory.max") == os.path.join(root, "g-cgroup.procs", "e-memory.max")
    made = tree.ensure("cgroup.procs", "cgroup.kill")
    try:
        assert os.path.isfile(os.path.join(made, "cgroup.procs"))
        assert tree.entries() == [("cgroup.procs", "cgroup.kill", made)]
    finally:
        cgroups.remove(root)
    assert not os.path.exists(root)


def test_cgroups_off_and_an_unwritable_hierarchy_fall_back(monkeypatch, tmp_path):
    monkeypatch.setenv("RECONCILER_CGROUPS", "off")
    tree, why = cgroups.Tree.open("n1")
    assert tree is None and "RECONCILER_CGROUPS=off" in why
    monkeypatch.delenv("RECONCILER_CGROUPS")
    monkeypatch.setattr(cgroups, "mount", lambda: None)
    tree, why = cgroups.Tree.open("n1")
    assert tree is None and "no cgroup2" in why
    monkeypatch.setattr(cgroups, "mount", lambda: (str(tmp_path / "ro"), "/"))
    (tmp_path / "ro").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(tmp_path / "ro")], check=True)
    try:
        os.makedirs(tmp_path / "ro" / cgroups.own_cgroup().strip("/"), exist_ok=True)
    except OSError:
        pass  # read-only: the agent's cgroup directory cannot even be there; the root is then missing too
    try:
        tree, why = cgroups.Tree.open("n1")
        assert tree is None and "cannot create" in why, why
        sup = process.Supervisor(node="n1", state_dir=tmp_path / "state", on_change=lambda: None)
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], check=True)
    assert sup.tree is None and sup.cgroup_note


# --- spawn, stop, respawn, once --------------------------------------------------------------------


def test_each_entry_runs_in_its_cgroup_and_a_daemon_is_stopped_with_it(harness):
    h = harness()

    async def go():
        async with h.attached() as sup:
            pid, daemon = await h.start_daemon()
            cg = sup.tree.path("g", "d")
            assert cgroups.own_cgroup(pid).endswith("/reconciler-" + h.node + "/g-g/e-d")
            assert cgroups.own_cgroup(daemon) == cgroups.own_cgroup(pid)  # born inside, setsid or not
            assert os.getsid(daemon) != os.getsid(pid)
            await sup.stop("g", "d", sig=signal.SIGTERM, timeout=2)
            assert not alive(pid) and not alive(daemon)
            assert sup.records[("g", "d")].state == "stopped"
            assert not os.path.exists(cg), "an entry stopped for good leaves no cgroup"

    run(go())


def test_a_respawn_kills_what_the_dead_leader_left_in_its_cgroup(harness):
    h = harness()

    async def go():
        async with h.attached() as sup:
            pid, daemon = await h.start_daemon()
            os.kill(pid, signal.SIGKILL)
            await until(lambda: sup.records[("g", "d")].state == "exited", what="the leader's exit")
            await until(lambda: not alive(daemon), 2, what="the leftover daemon killed")

    run(go())


def test_a_once_entry_that_daemonizes_stays_running_and_is_stopped_with_its_group(harness):
    h = harness()

    async def go():
        async with h.attached() as sup:
            cmd = "(setsid sh -c 'echo $$ > {p}; exec sleep 302' &); exit 0"
            daemon = await h.start_leaving("o", cmd, mode="once")
            rec = sup.records[("g", "o")]
            await until(lambda: rec.pid == daemon, what="the entry to follow the daemon")
            assert rec.state == "running" and "following pid" in rec.message
            # the daemon exiting by itself is noticed (pidfd): the entry is done
            os.kill(daemon, signal.SIGKILL)
            await until(lambda: rec.state == "done", what="done once the daemon is gone")
            daemon = await h.start_leaving("o", cmd, mode="once", what="the second daemon")
            await until(lambda: rec.pid == daemon, what="the entry to follow the daemon")
            await sup.stop("g", "o", sig=signal.SIGTERM, timeout=2)
            assert not alive(daemon) and rec.state == "stopped"

    run(go())


def test_reset_stops_what_a_finished_entry_left_behind(harness):
    h = harness()

    async def go():
        async with h.attached() as sup:
            cmd = "(setsid sh -c 'echo $$ > {p}; exec sleep 303' &); while [ ! -s {p} ]; do sleep 0.01; done"
            daemon = await h.start_leaving("w", cmd, mode="wait")
            assert sup.records[("g", "w")].state == "done" and alive(daemon)
            sup.reset("g", "w")  # the group stopped: the entry is forgotten, and what it left goes
            await until(lambda: not alive(daemon), 2, what="the leftover killed")
            await until(lambda: not os.path.exists(sup.tree.path("g", "w")), 2, what="its cgroup removed")

    run(go())


# --- adoption ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage", "stale"])
def test_adoption_reads_the_cgroups_not_the_table(harness, damage):
    h = harness()

    async def first():
        async with h.attached() as sup:
            pid = await sup.start("g", entry("d", DAEMON.format(pidfile=h.pidfile)), level="run", env={})
            await sup.start("g", entry("gone", ["sleep", "304"]), level="run", env={})
            sup.records[("g", "gone")].popen = None
            await until(lambda: read_pid(h.pidfile), what="the daemon")
        return pid

    pid = run(first())
    table = h.sup.state_file
    if damage == "truncated":
        table.write_text(table.read_text()[: len(table.read_text()) // 2])
    elif damage == "deleted":
        table.unlink()
    elif damage == "garbage":
        table.write_bytes(b"\0" * 40)
    else:  # saved before the spawn: lists nothing
        table.write_text(json.dumps({"node": h.node, "records": []}))
    gone = h.sup.records[("g", "gone")].pid
    cgroups.kill(h.sup.tree.path("g", "gone"))
    os.waitpid(gone, 0)

    async def second():
        async with h.attached(h.again()) as sup:
            adopted = sup.adopt()
            assert [(r.group, r.tag, r.pid) for r in adopted] == [("g", "d", pid)]  # the leader, not the daemon
            assert sup.records[("g", "d")].state == "running"
            assert not os.path.exists(sup.tree.path("g", "gone")), "an empty entry cgroup of a dead agent is removed"
            # an adopted leader's exit is noticed (pidfd), and what it left is killed before a respawn
            daemon = read_pid(h.pidfile)
            os.kill(pid, signal.SIGKILL)
            await until(lambda: sup.records[("g", "d")].state == "exited", what="the adopted leader's exit")
            await until(lambda: not alive(daemon), 2, what="its leftovers killed")

    run(second())


# --- the keeper ----------------------------------------------------------------------------------


def test_keeper_fire_kills_the_whole_subtree(harness):
    h = harness()

    async def go():
        async with h.attached():
            return await h.start_daemon()

    pid, daemon = run(go())
    h.sup.state_file.unlink()  # the keeper needs no table
    killed = keeper.fire(str(h.sup.dir))
    assert pid in killed and daemon in killed
    os.waitpid(pid, 0)
    wait_until(lambda: not alive(daemon), 2, what="the daemon killed")


# --- without cgroups: the marker, a table that fails closed ----------------------------------------


class FullDisk(process.Sys):
    def __init__(self):
        self.full = False

    def write_table(self, path, text):
        if self.full:
            raise OSError(28, "No space left on device")
        super().write_table(path, text)


def test_without_cgroups_a_failed_save_loses_nothing_and_the_keeper_finds_the_marker(harness, monkeypatch):
    monkeypatch.setenv("RECONCILER_CGROUPS", "off")  # the keeper's view too
    disk = FullDisk()
    h = harness(sys_=disk)
    assert h.sup.tree is None and "RECONCILER_CGROUPS=off" in h.sup.cgroup_note

    async def go():
        async with h.attached() as sup:
            first, _ = await h.start_daemon()
            disk.full = True
            os.kill(first, signal.SIGKILL)
            rec = sup.records[("g", "d")]
            await until(lambda: rec.state == "exited", what="the exit")
            h.pidfile.unlink()
            new, daemon = await h.start_daemon("the new daemon")
            assert rec.pid == new and rec.state == "running"  # tracked though the save failed
            assert "No space left" in sup.save_error
            assert json.loads(sup.state_file.read_text())["records"][0]["pid"] == first  # the table is stale
            environ = open(f"/proc/{daemon}/environ", "rb").read().split(b"\0")
            assert b"RECONCILER_ENTRY=g/d" in environ
        return new, daemon

    new, daemon = run(go())
    # an agent restarted now would find them by their marker, the table notwithstanding
    again = h.again(tree=False)
    adopted = again.adopt()
    assert [(r.tag, r.pid) for r in adopted] == [("d", new)]
    # and the keeper kills them all, the stale table notwithstanding
    killed = keeper.fire(str(h.sup.dir))
    assert {new, daemon} <= set(killed)
    os.waitpid(new, 0)
    wait_until(lambda: not alive(daemon), 2, what="the daemon killed")


def test_without_cgroups_a_lost_table_is_rebuilt_from_the_markers(harness):
    h = harness(tree=False)

    async def go():
        async with h.attached() as sup:
            pid = await sup.start("g", entry("s", ["sleep", "305"]), level="run", env={})
            # Popen returns when the exec began (close-on-exec); /proc/PID/environ is readable
            # once the new image is set up
            await until(lambda: open(f"/proc/{pid}/cmdline", "rb").read() == b"sleep\x00305\x00", what="the exec")
        return pid

    pid = run(go())
    h.sup.state_file.write_text('{"node": "x", "rec')
    again = h.again(tree=False)
    adopted = again.adopt()
    assert [(r.group, r.tag, r.pid, r.state) for r in adopted] == [("g", "s", pid, "running")]
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# --- users and modes --------------------------------------------------------------------------------


def _id_output(h, tmp_path, **kw) -> str:
    async def go():
        async with h.attached() as sup:
            await sup.start("g", entry("id", "id; echo HOME=$HOME USER=$USER LOGNAME=$LOGNAME", mode="wait", **kw), level="run", env={})

    run(go())
    return h.sup.log_path("g", "id").read_text()


def test_user_gets_its_groups_and_home(harness, tmp_path):
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    out = _id_output(harness(), tmp_path, user="nobody")
    names = {grp.getgrgid(g).gr_name for g in os.getgrouplist("nobody", nobody.pw_gid)}
    assert f"uid={nobody.pw_uid}(nobody) gid={nobody.pw_gid}({grp.getgrgid(nobody.pw_gid).gr_name})" in out
    assert "groups=" + ",".join(f"{g}({grp.getgrgid(g).gr_name})" for g in sorted(os.getgrouplist("nobody", nobody.pw_gid))) in out, out
    assert "gid=0" not in out and "(root)" not in out, out
    assert f"HOME={nobody.pw_dir} USER=nobody LOGNAME=nobody" in out
    assert names  # nobody's own group at least


def test_group_sets_the_primary_group(harness, tmp_path):
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    other = grp.getgrnam("daemon")
    out = _id_output(harness(), tmp_path, user="nobody", group="daemon")
    assert f"uid={nobody.pw_uid}(nobody) gid={other.gr_gid}(daemon)" in out, out
    assert "(root)" not in out


def test_unknown_user_or_group_is_an_error_never_root(harness, tmp_path):
    for kw, word in (({"user": "no-such-user-x"}, "unknown user 'no-such-user-x'"), ({"user": "nobody", "group": "no-such-group-x"}, "unknown group")):
        h = harness()

        async def go():
            async with h.attached() as sup:
                with pytest.raises(process.StartError, match=word):
                    await sup.start("g", entry("x", "touch {}".format(tmp_path / "ran"), **kw), level="run", env={})

        run(go())
        assert h.sup.records[("g", "x")].state == "error"
        assert word in h.sup.records[("g", "x")].message
        assert not (tmp_path / "ran").exists()


def test_state_and_log_modes_whatever_the_umask(harness, tmp_path):
    old = os.umask(0)
    try:
        h = harness()
        out = _id_output(h, tmp_path)
    finally:
        os.umask(old)
    assert "uid=0" in out
    assert os.stat(h.sup.dir).st_mode & 0o777 == 0o700
    assert os.stat(h.sup.logs).st_mode & 0o777 == 0o700
    assert os.stat(h.sup.log_path("g", "id")).st_mode & 0o777 == 0o640


def test_the_table_lists_a_new_pid_only_once_it_runs_the_command(harness):
    """The child joins its cgroup through a shell before the exec (the join may wait for an
    RCU grace period): start() returns, and the table names the pid, only after the exec."""
    h = harness()

    async def go():
        async with h.attached() as sup:
            for _ in range(3):
                pid = await sup.start("g", entry("s", ["sleep", "306"]), level="run", env={})
                assert open(f"/proc/{pid}/cmdline", "rb").read() == b"sleep\0" + b"306\0"
                saved = {r["tag"]: r for r in json.loads(sup.state_file.read_text())["records"]}
                assert saved["s"]["pid"] == pid and saved["s"]["state"] == "running"
                # a quiet spell, the thing under test: the next join waits for a grace period again
                await asyncio.sleep(0.1)
                await sup.stop("g", "s", sig=signal.SIGTERM, timeout=2)

    run(go())

