"""Mount and unmount entries with mount(8) and umount(8).

Guarantees:
- `mount` returns only when mountinfo shows the entry as specified ("running"): it mounts
  when nothing is at the target, remounts (`-o remount,OPTS`) when only options differ,
  and refuses (permanent error) to stack on top of a different filesystem at the target.
- `unmount` returns only when the entry's mount is gone from the target. A different
  filesystem at the target is not this entry's and is left mounted.
- A busy target: with `kill_users` the processes of this mount namespace that hold it
  (cwd, root, open files or directories, memory maps under the target) get SIGTERM, then
  SIGKILL after a short wait, and the unmount is retried; without it the error is
  transient and names them: "busy: pids 12 13". This process and pid 1 are never killed.
- Errors are ResourceError carrying mount(8)'s own message; transient ones are retried
  (tenacity) until `deadline` seconds have passed since the call.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import psutil
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_exponential

from reconciler.act.errors import ResourceError
from reconciler.observe import mounts as observed
from reconciler.spec import Entry, Mount

TERM_WAIT = 2.0  # seconds between SIGTERM and SIGKILL for processes holding a target
KILL_WAIT = 1.0  # seconds to wait for SIGKILLed processes to release the target
MIN_COMMAND_TIME = 0.5  # a command always gets this long, even when the deadline is close
MAX_ATTEMPTS = 20

# mount(8)/umount(8) messages (LC_ALL=C) that the same spec will keep getting on this node.
PERMANENT = (
    "does not exist", "unknown filesystem type", "wrong fs type", "bad option", "not a block device",
    "permission denied", "must be superuser", "not a directory", "can't find in", "no medium found",
    "bad usage", "can't read superblock", "not permitted", "no such file", "invalid argument",
    "refusing", "not replacing",
)
TRANSIENT = ("busy", "temporarily unavailable", "timed out", "interrupted", "cannot allocate memory")


def _spec(entry: Entry | Mount) -> Mount:
    if not isinstance(entry, Entry):
        return entry
    if entry.mount is None:
        raise ValueError(f"{entry.tag}: not a mount entry")
    return entry.mount


def _permanent(message: str) -> bool:
    low = message.lower()
    if any(t in low for t in TRANSIENT):
        return False
    return any(p in low for p in PERMANENT)


def _message(stderr: str, fallback: str) -> str:
    # mount(8) adds a second line pointing at dmesg(1); the first line is the error.
    for line in stderr.splitlines():
        line = line.strip()
        if line and not line.startswith("dmesg(1)"):
            return line.rstrip(".")
    return fallback


def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    """(exit status, first line of stderr) of mount(8)/umount(8) in the C locale."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=max(timeout, MIN_COMMAND_TIME), env=env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ResourceError(f"{argv[0]} {argv[-1]}: did not finish within {max(timeout, MIN_COMMAND_TIME):.1f}s",
                            permanent=False) from None
    except FileNotFoundError:
        raise ResourceError(f"{argv[0]}: not installed", permanent=True) from None
    return r.returncode, _message(r.stderr, f"{argv[0]} {argv[-1]}: exit status {r.returncode}")


def _retrying(deadline: float, attempt) -> None:
    """Run attempt(remaining_seconds), retrying transient ResourceErrors until the deadline."""
    start = time.monotonic()
    retryer = Retrying(
        retry=retry_if_exception(lambda e: isinstance(e, ResourceError) and not e.permanent),
        stop=stop_before_delay(deadline) | stop_after_attempt(MAX_ATTEMPTS),
        wait=wait_exponential(multiplier=0.05, max=0.5),
        reraise=True,
    )
    retryer(lambda: attempt(max(0.0, deadline - (time.monotonic() - start))))


# --- mount ---------------------------------------------------------------------------------


def mount(entry: Entry | Mount, *, deadline: float = 10.0) -> None:
    """Make the mount present as specified; see the module docstring."""
    m = _spec(entry)
    _retrying(deadline, lambda remaining: _mount_once(m, remaining))


def _remount_options(m: Mount) -> str:
    keep = [o for o in observed.split_options(m.options)
            if o not in observed.IGNORED and not o.startswith(observed.IGNORED_PREFIXES)]
    # For a bind mount, "remount,bind" changes only the per-mount flags (ro, nosuid, ...).
    return ",".join(["remount", *(["bind"] if observed.is_bind(m) else []), *keep])


def _make_target(m: Mount) -> None:
    if os.path.lexists(m.target) or not m.mkdir:
        return  # a missing target with mkdir = false is reported by mount(8) itself
    try:
        src = os.stat(m.source) if observed.is_bind(m) else None
        if src is not None and not stat.S_ISDIR(src.st_mode):
            # A bind of a file needs a file to mount on.
            os.makedirs(os.path.dirname(m.target), exist_ok=True)
            with open(m.target, "a"):
                pass
        else:
            os.makedirs(m.target, exist_ok=True)
    except OSError as exc:
        raise ResourceError(f"mount: {m.target}: cannot create mount point: {exc.strerror}", permanent=True) from None


def _mount_once(m: Mount, remaining: float) -> None:
    table = observed.read()
    now = observed.check(m, table)
    if now.state == "running":
        return
    if now.state == "mismatch" and not now.options_only:
        raise ResourceError(f"{now.message}: not replacing a different filesystem", permanent=True)
    if now.state == "mismatch":
        argv = ["mount", "-o", _remount_options(m), m.target]
    else:
        _make_target(m)
        argv = ["mount"]
        if m.fstype and not observed.is_bind(m):
            argv += ["-t", m.fstype]
        if m.options:
            argv += ["-o", m.options]
        argv += [m.source, m.target]
    rc, msg = _run(argv, remaining)
    if rc != 0:
        raise ResourceError(msg, permanent=_permanent(msg))
    after = observed.check(m, observed.read())
    if after.state != "running":
        what = "remount" if now.state == "mismatch" else "mount"
        raise ResourceError(f"{what} did not take effect: {after.message or 'nothing is mounted at ' + m.target}",
                            permanent=True)


# --- unmount -------------------------------------------------------------------------------


def unmount(entry: Entry | Mount, *, deadline: float = 10.0) -> None:
    """Make the entry's mount absent; see the module docstring."""
    m = _spec(entry)
    _retrying(deadline, lambda remaining: _unmount_once(m, remaining))


def _ours(m: Mount) -> bool:
    c = observed.check(m, observed.read())
    return c.state == "running" or (c.state == "mismatch" and c.options_only)


def _unmount_once(m: Mount, remaining: float) -> None:
    start = time.monotonic()
    killed = False
    # Each round removes one layer: the same mount may be stacked on itself.
    for _ in range(MAX_ATTEMPTS):
        if not _ours(m):
            return
        rc, msg = _run(["umount", m.target], remaining - (time.monotonic() - start))
        if rc == 0:
            continue
        if "busy" not in msg.lower():
            if "not mounted" in msg.lower():
                continue  # raced with someone else's unmount
            raise ResourceError(msg, permanent=_permanent(msg))
        pids = holders(m.target)
        subs = observed.submounts(observed.read(), m.target)
        if m.kill_users and pids and not killed:
            left = remaining - (time.monotonic() - start)
            terminate(pids, term_wait=min(TERM_WAIT, max(left / 2, 0.1)), kill_wait=min(KILL_WAIT, max(left / 4, 0.1)))
            killed = True  # once per attempt: the retry loop comes back for stubborn holders
            continue
        if subs:
            raise ResourceError(f"busy: submounts {' '.join(subs)}", permanent=False)
        if pids:
            raise ResourceError(f"busy: pids {' '.join(map(str, pids))}", permanent=False)
        raise ResourceError(f"busy: {m.target} is held, but by no process of this mount namespace", permanent=False)
    raise ResourceError(f"umount {m.target}: still mounted after {MAX_ATTEMPTS} unmounts", permanent=False)


def _under(path: str, target: str) -> bool:
    path = path.removesuffix(" (deleted)")
    return path == target or path.startswith(target.rstrip("/") + "/")


def _maps(pid: int) -> list[str]:
    # /proc/PID/maps directly: psutil.memory_maps reads smaps, which is far slower.
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.append(parts[5].rstrip("\n"))
    return out


def holders(target: str) -> list[int]:
    """Pids of this mount namespace whose cwd, root, open fds or maps are under `target`.

    Processes of other mount namespaces are skipped: they see their own copy of the
    mount, so they neither make this unmount busy nor are they this node's users of it.
    """
    t = observed.canonical(target)
    own_ns = os.readlink("/proc/self/ns/mnt")
    found = []
    for proc in psutil.process_iter():
        pid = proc.pid
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") != own_ns:
                continue
            paths = [proc.cwd(), os.readlink(f"/proc/{pid}/root")]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass  # closed meanwhile
            paths += _maps(pid)
        except (psutil.Error, OSError):
            continue  # exited meanwhile, or a kernel thread
        if any(_under(p, t) for p in paths):
            found.append(pid)
    return sorted(found)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            # A zombie has already released its files and cwd: it no longer holds the mount.
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _wait(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    end = time.monotonic() + seconds
    alive = _alive(procs)
    while alive and time.monotonic() < end:
        time.sleep(0.02)
        alive = _alive(alive)
    return alive


def terminate(pids: list[int], *, term_wait: float = TERM_WAIT, kill_wait: float = KILL_WAIT) -> list[int]:
    """SIGTERM `pids`, SIGKILL those left after term_wait; return pids still alive after kill_wait."""
    procs = []
    for pid in pids:
        if pid in (os.getpid(), 1):
            continue
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    _signal(procs, signal.SIGTERM)
    alive = _wait(procs, term_wait)
    if alive:
        _signal(alive, signal.SIGKILL)
        alive = _wait(alive, kill_wait)
    return [p.pid for p in alive]
