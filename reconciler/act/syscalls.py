"""The system calls of process supervision, in one class: the seam tests subclass to observe
them or inject faults (Supervisor(sys=...)), and /proc parsing that goes with them."""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess

import attrs

from reconciler.host import cgroups
from reconciler.host import procfs

LOG_MODE = 0o640
# Moves the child into its entry's cgroup before the command is exec'd (so everything it
# forks is born inside), through a write fd of cgroup.procs the agent opened, given as the
# shell's stdin (dash knows fds 0-9 only) and replaced by /dev/null before the exec: the
# kernel checks the opener's credentials, so the child may already have dropped root. A
# shell, not a preexec_fn: Python forks (instead of vfork) for a preexec_fn, which costs
# ~3 ms for an agent of ~60 MB; dash's exec costs ~0.5 ms (docs/performance.md, "cgroups").
_JOIN = 'echo 0 >&0 2>/dev/null || {{ echo "reconciler: cannot join cgroup {path}" >&2; exit 126; }}; exec </dev/null; exec "$@"'
MARK_DIR = "RECONCILER_NODE_DIR"  # with RECONCILER_ENTRY: in every child's environment
MARK_ENTRY = "RECONCILER_ENTRY"


@attrs.frozen
class Credentials:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def credentials(user: str | None, group: str | None) -> Credentials | None:
    """The uid, primary and supplementary groups and home of `user` (with `group` as the
    primary group, if given); None to keep the agent's. ValueError names what is unknown:
    never fall back to root."""
    if user is None and group is None:
        return None
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, ValueError):
            raise ValueError(f"unknown user {user!r}") from None
    else:
        pw = pwd.getpwuid(os.getuid())
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except (KeyError, ValueError):
            raise ValueError(f"unknown group {group!r}") from None
    groups = os.getgrouplist(pw.pw_name, gid) if user is not None else os.getgroups()
    if gid not in groups:
        groups = [gid, *groups]
    return Credentials(name=pw.pw_name, uid=pw.pw_uid, gid=gid, groups=tuple(groups), home=pw.pw_dir or "/")


def open_log(log_path) -> int:
    """The entry's log, opened for appending, mode 0640 whatever the umask (and an older
    file's mode corrected)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    try:
        os.fchmod(fd, LOG_MODE)
    except OSError:
        pass
    return fd


def _check_command(argv, env, cwd) -> None:
    """Raise FileNotFoundError/PermissionError as Popen would, before the shell that joins
    the cgroup runs (it would only exit 127)."""
    cmd = argv[0]
    if "/" in cmd:
        path = cmd if os.path.isabs(cmd) or cwd is None else os.path.join(cwd, cmd)
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", cmd)
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            raise PermissionError(13, "Permission denied", cmd)
    elif shutil.which(cmd, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(2, "No such file or directory", cmd)


class Sys:
    """Every system call the supervisor makes. Subclass to observe or fault-inject in tests."""

    def spawn(self, argv, *, env, cwd, user, log_path, creds: Credentials | None = None, cgroup_fd: int | None = None,
              cgroup_path: str = "") -> subprocess.Popen:
        argv = list(argv)
        stdin = subprocess.DEVNULL
        if cgroup_fd is not None:
            _check_command(argv, env, cwd)
            argv = ["/bin/sh", "-c", _JOIN.format(path=shlex.quote(cgroup_path)), "sh", *argv]
            stdin = cgroup_fd
        log = open_log(log_path)
        try:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop signals reach the whole tree
                close_fds=True,
                # None: Popen's defaults (the agent's own credentials)
                user=None if creds is None else creds.uid,
                group=None if creds is None else creds.gid,
                extra_groups=None if creds is None else list(creds.groups),
            )
        finally:
            os.close(log)

    def killpg(self, pgid: int, sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def cgroup_kill(self, tree: cgroups.Tree, group: str, tag: str) -> bool:
        return tree.kill(group, tag)

    def cgroup_signal(self, tree: cgroups.Tree, group: str, tag: str, sig: int) -> list[int]:
        return tree.signal(group, tag, sig)

    def write_table(self, path, text: str) -> None:
        """Write the process table atomically (a seam: tests make it fail as a full disk would)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def reap(self, pids=()) -> list[tuple[int, int]]:
        """Collect the exits of `pids` (children we spawned): [(pid, status)].

        Never waitpid(-1): other parts of the agent run children of their own and wait for
        them (mount(8)/umount(8) through subprocess, fence hooks through asyncio); reaping
        one of those here steals its exit status (subprocess then reports 0, asyncio 255).
        """
        out = []
        for pid in pids:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid:
                out.append((pid, os.waitstatus_to_exitcode(status)))
        return out

    def zombies(self) -> set[int]:
        """Children of this process that have exited and are not reaped yet (from /proc)."""
        me = os.getpid()
        return {pid for pid, fields in procfs.proc_stats() if fields[0] == b"Z" and int(fields[1]) == me}

    def reap_any(self, pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def pidfd(self, pid: int) -> int | None:
        try:
            return os.pidfd_open(pid)
        except OSError:
            return None


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (its identity, with the pid); None
    once it has exited, even while it is a zombie."""
    return procfs.start_ticks(pid, live=True)


def joining(pid: int) -> bool:
    """True while the process is still the shell that joins its cgroup (before the exec),
    or between two images (an empty command line: Popen returns as the exec begins)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    return head == b"" or head.startswith(b"/bin/sh\0-c\0echo 0 >&0 ")


def pgid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2 :].split()[2])
    except (OSError, ValueError, IndexError):
        return None
