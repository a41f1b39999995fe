"""What many tests need: waiting on a condition, free ports, process checks, spec files.

Waits poll the condition itself, never a fixed time: a test that must let time pass (to
prove something does NOT happen) sleeps and says so in a comment.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from reconciler import spec as specmod
from reconciler.host import procfs

# --- what tests need (tests/conftest.py: the needs(...) marker) -----------------------------------


def _which(tool: str) -> Callable[[], bool]:
    return lambda: shutil.which(tool) is not None


def _cgroup2() -> bool:
    from reconciler.host import cgroups

    found = cgroups.mount()
    return found is not None and os.access(found[0], os.W_OK)


def _loop() -> bool:
    return os.path.exists("/dev/loop-control") and shutil.which("mkfs.ext4") is not None


def _accept_untracked_na() -> bool:
    return os.path.exists("/proc/sys/net/ipv6/conf/all/accept_untracked_na")


# name -> (is it there?, how to get it)
REQUIREMENTS: dict[str, tuple[Callable[[], bool], str]] = {
    "root": (lambda: os.geteuid() == 0, "run pytest as root"),
    "unshare": (_which("unshare"), "apt-get install util-linux"),
    "nsenter": (_which("nsenter"), "apt-get install util-linux"),
    "ip": (_which("ip"), "apt-get install iproute2"),
    "mount": (lambda: shutil.which("mount") is not None and shutil.which("umount") is not None, "apt-get install mount"),
    "curl": (_which("curl"), "apt-get install curl"),
    "etcd": (lambda: shutil.which("etcd") is not None and importlib.util.find_spec("aetcd") is not None,
             "apt-get install etcd-server and pip install -e '.[etcd]'"),
    "keepalived": (_which("keepalived"), "apt-get install keepalived"),
    "fence-agents": (lambda: os.access("/usr/sbin/fence_ipmilan", os.X_OK),
                     "apt-get install --no-install-recommends fence-agents"),
    "promtool": (_which("promtool"), "apt-get install prometheus"),
    "prometheus": (_which("prometheus"), "apt-get install prometheus"),
    "supervisord": (_which("supervisord"), "pip install -e '.[test]' (the supervisor package)"),
    "reconcile": (_which("reconcile"), "pip install -e . and put the venv's bin on PATH"),
    "cgroup2": (_cgroup2, "a writable cgroup2 hierarchy (mount -t cgroup2 none /sys/fs/cgroup; as root)"),
    "loop": (_loop, "loop devices (modprobe loop) and mkfs.ext4 (apt-get install e2fsprogs)"),
    "accept_untracked_na": (_accept_untracked_na, "Linux 5.18 or later (net.ipv6.conf.*.accept_untracked_na)"),
}

def missing(*needs: str) -> list[str]:
    """'NAME (how to install it)' for each requirement that is not met."""
    return [f"{n} ({REQUIREMENTS[n][1]})" for n in needs if not REQUIREMENTS[n][0]()]


def require(*needs: str) -> None:
    """Fail the test at once, naming what is missing and how to install it (never a skip)."""
    absent = missing(*needs)
    if absent:
        pytest.fail("missing requirement: " + "; ".join(absent), pytrace=False)


# What reading a file another process is writing may raise before it is complete.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError)


def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "", step: float = 0.02, *,
               tolerate: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll cond() until it returns something truthy, and return that. An exception in
    `tolerate` counts as "not yet" (the last one is named if the wait times out)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except tolerate as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}" + (f" (last error: {last})" if last else ""))
        time.sleep(step)


async def until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition", step: float = 0.01) -> Any:
    """wait_until on a running event loop (the loop goes on while we wait)."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)
    return value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int | None) -> bool:
    """The process exists and has not exited (a zombie has)."""
    return bool(pid) and procfs.start_ticks(pid, live=True) is not None


def handles(pid: int, sig: int) -> bool:
    """The process catches or ignores `sig` (a shell has set its trap): /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return False
    mask = int(fields.get("SigCgt", "0"), 16) | int(fields.get("SigIgn", "0"), 16)
    return bool(mask & (1 << (sig - 1)))


def read_pid(path: Path) -> int | None:
    """The pid a process wrote to `path`, or None until it has written it whole."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def load_test_module(name: str) -> Any:
    """Another test file's module, by its name (for its constants: not collected twice)."""
    spec = importlib.util.spec_from_file_location(f"_{name}", Path(__file__).resolve().parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kill_and_reap(pid: int) -> None:
    """SIGKILL a child of ours and collect its exit."""
    os.kill(pid, 9)
    os.waitpid(pid, 0)


# --- specs ---------------------------------------------------------------------------------------


def write_file(path: Path, text: str | bytes, mode: int = 0o644, *, uid: int | None = None, gid: int | None = None) -> Path:
    """Write a spec (or any) file with the mode (and owner) the loader's trust checks look at."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)
    return path


def good_spec(*, runlevels: tuple[str, ...] = ("run",), command: tuple[str, ...] = ("sleep", "100"), mode: str | None = None) -> str:
    """A small valid spec: cluster "t", group "web" at runlevel "run", one entry "server"."""
    levels = ", ".join(f'"{lvl}"' for lvl in runlevels)
    argv = ", ".join(f'"{a}"' for a in command)
    mode_line = f'mode = "{mode}"\n' if mode is not None else ""
    return (
        '[cluster]\nname = "t"\n\n[groups.web]\nrunlevel = "run"\n\n'
        f'[[groups.web.entries]]\ntag = "server"\n{mode_line}runlevels = [{levels}]\ncommand = [{argv}]\n'
    )


def spec_error(path: Path) -> str:
    """The loader's refusal of `path`: one line (a traceback or a multi-line message fails)."""
    with pytest.raises(specmod.SpecError) as info:
        specmod.load(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def reconcile(*args: str, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
    """`python -m reconciler.cli ARGS` (this interpreter: no `reconcile` on PATH needed)."""
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], capture_output=True, text=True, timeout=timeout, **kw)
