"""The keeper: a tiny per-node process that stops the node's processes when the agent can't.

The agent renews a deadline (CLOCK_MONOTONIC seconds, shared by every process on the
machine) in STATE/NODE/lease each time it renews its lease. If the agent dies, is paused
(SIGSTOP, a frozen VM) or hangs, the deadline passes and the keeper SIGKILLs every process
group the agent recorded as running, so no group outlives its owner's lease. Then it takes
away the virtual IPs (`ip addr del`) and lazily unmounts the mounts (`umount -l`) the agent
listed in STATE/NODE/resources.json, so that a peer taking the group over never finds the
address still answered for here. It is kept too simple to fail: no imports beyond the
standard library, no store, no spec.

    python3 -m reconciler.keeper STATE/NODE

The lease file fails closed. It holds one 30-byte record with a CRC32 (`host/leaserecord.py`):
either a deadline, or "released", which the agent writes as the last thing of a clean
shutdown, once nothing of the node runs any more. A file that is missing (deleted),
truncated, replaced by anything else, or unreadable is no renewal: the last deadline the
keeper read stands, and when it passes the keeper kills as on any expiry; a keeper that has
never read a valid deadline (started while the file was missing or corrupt) counts the
lease as lapsed at once. The agent, for its part, notices a deleted or replaced file and
writes a new one (reconciler/cluster/leasefile.py), and never counts on a renewal the file does not
show.

It exits only on the "released" record AND when nothing it guards is alive
(`anything_alive`) AND no agent of the node is (a new agent reuses a live keeper:
`Watch.hand_over`): deleting or corrupting the file can never switch it off; it keeps
enforcing while anything of the node lives. It also steps aside if another keeper
already watches the same directory (it holds STATE/NODE/keeper.lock): two keepers would
each count the other among the agent's children and SIGKILL it at expiry, leaving none.
No write of its own (keeper.log, keeper.pid) can stop it: a full, read-only or failing
disk costs the log line, never the kill.

(Longer than the house's ~400 lines on purpose: the keeper is one file that imports nothing
of the package, so that it runs from any release and nothing it needs can break.)
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

from reconciler.host import cgroups, leaserecord, procfs

POLL = 0.01  # while the lease file is unreadable, and between kills after expiry
IDLE_MAX = 0.5  # longest sleep before the deadline: how soon a "released" record is seen
LOCK_WAIT = 2.0  # seconds a new keeper waits for the lock of one that is handing over
TORN_GRACE = 0.05  # an unreadable record is read again for this long before it counts as one


def exempt(node_dir: str) -> frozenset[str]:
    """The groups in maintenance the agent listed in STATE/NODE/maintenance.json (issue 15):
    their processes, mounts and addresses are left alone at expiry. Anything but a valid list
    of names reads as none (the fail-closed default: kill everything)."""
    try:
        with open(os.path.join(node_dir, "maintenance.json")) as fh:
            groups = json.load(fh).get("groups", [])
    except (OSError, ValueError, AttributeError):
        return frozenset()
    return frozenset(g for g in groups if isinstance(g, str) and g) if isinstance(groups, list) else frozenset()


def fire(node_dir: str) -> list[int]:
    """SIGKILL everything the agent runs: the node's cgroup subtree (cgroup.kill: also what
    double-forked or called setsid()); the process groups the table records; (for a process
    spawned a moment before the agent froze, not yet recorded) the agent's own children;
    and, where cgroups cannot be used, every process carrying the node's environment marker
    (the table may be lost or stale). Returns the pids and process groups killed. The groups
    in maintenance (`exempt`) are spared: their group cgroups, recorded process groups and
    marked processes."""
    spared = exempt(node_dir)
    try:
        with open(os.path.join(node_dir, "processes.json")) as fh:
            records = json.load(fh).get("records", [])
    except (OSError, ValueError, AttributeError):
        records = []
    groups: set[int] = set()
    kept: set[int] = set()  # the recorded process groups of the spared groups
    for r in records if isinstance(records, list) else []:
        if not isinstance(r, dict):
            continue
        pid, pgid = r.get("pid"), r.get("pgid") or r.get("pid")
        if r.get("state") not in ("running", "stopping") or not isinstance(pid, int) or not isinstance(pgid, int):
            continue
        if procfs.start_ticks(pid) != r.get("ticks"):
            continue  # gone, or the pid was recycled: not ours
        (kept if r.get("group") in spared else groups).add(pgid)
    agent = procfs.agent_pid(node_dir)
    if agent is not None:
        groups.update(p for p in procfs.children_of(agent) if p != os.getpid() and p not in kept)
    killed = []
    root = cgroups.node_root(os.path.basename(os.path.normpath(node_dir)))
    by_cgroup = root is not None and bool(spared) and os.path.isdir(root)
    if root is not None and by_cgroup:
        # Each group's cgroup but the spared ones (the agent itself is not in the subtree).
        for sub in cgroups.children(root):
            name = os.path.basename(sub)
            if name.startswith(cgroups.GROUP_PREFIX) and name[len(cgroups.GROUP_PREFIX):] in spared:
                continue
            inside = cgroups.procs(sub, recursive=True)
            if cgroups.kill(sub):
                killed.extend(inside)
    elif root is not None:
        inside = cgroups.procs(root, recursive=True)
        by_cgroup = cgroups.kill(root)
        if by_cgroup:
            killed.extend(inside)
    if not by_cgroup:
        for entry, pids in procfs.marked_processes(node_dir).items():
            if entry.partition("/")[0] in spared:
                continue
            for pid in pids:
                if pid != agent:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except OSError:
                        pass
    for pgid in sorted(groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed.append(pgid)
        except OSError:
            pass
    return sorted(set(killed))


COMMAND_TIMEOUT = 2.0
IP = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
UMOUNT = ("/usr/bin/umount", "/bin/umount", "/usr/sbin/umount", "/sbin/umount")


def _tool(candidates: tuple[str, ...]) -> str:
    return next((c for c in candidates if os.access(c, os.X_OK)), os.path.basename(candidates[0]))


def read_resources(node_dir: str) -> str:
    try:
        with open(os.path.join(node_dir, "resources.json")) as fh:
            return fh.read()
    except OSError:
        return ""


def release(listing: str, spared: frozenset[str] = frozenset()) -> list[str]:
    """Remove the addresses, then lazily unmount the mounts, of a resources.json text (but
    those of the `spared` groups: in maintenance).

    Addresses first: a peer may add the same address as soon as our lease has run out.
    A mount is unmounted only while the filesystem at its target is still of its type (a
    bind mount: any type); `umount -l` detaches it at once even if a process we could not
    kill still holds it. Returns a line per command run, for the log.
    """
    try:
        items = json.loads(listing).get("resources", []) if listing else []
    except (ValueError, AttributeError):
        return []
    items = [it for it in items if isinstance(it, dict) and it.get("group") not in spared]
    done = []
    env = {**os.environ, "LC_ALL": "C"}

    def run(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=env, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(argv)}: {exc}"
        err = (r.stderr.strip().splitlines() or [""])[0]
        return " ".join(argv) + (f": {err}" if r.returncode else "")

    for it in reversed(items):  # reverse start order, as a stop would
        if it.get("kind") == "address" and it.get("ip") and it.get("interface"):
            done.append(run([_tool(IP), "addr", "del", str(it["ip"]), "dev", str(it["interface"])]))
    for it in reversed(items):
        if it.get("kind") == "mount" and it.get("target"):
            target = os.path.normpath(str(it["target"]))
            have = procfs.top_fstype(target)
            bind = any(o in ("bind", "rbind") for o in str(it.get("options", "")).split(","))
            fstype = it.get("fstype") if it.get("fstype") != "auto" else ""
            if have is None or (fstype and not bind and have != fstype):
                continue  # not mounted, or something else is mounted there now
            done.append(run([_tool(UMOUNT), "-l", target]))
    return done


def _records(node_dir: str) -> list[dict[str, object]]:
    try:
        with open(os.path.join(node_dir, "processes.json")) as fh:
            records = json.load(fh).get("records", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in records if isinstance(r, dict)]


def anything_alive(node_dir: str) -> bool:
    """Is anything this keeper guards alive? A process the agent recorded as running or
    stopping (the same pid and start time, not a zombie), or a live child of the agent other
    than this keeper, or anything in the node's cgroup subtree (where cgroups are used), or
    any process carrying the node's environment marker (where they are not: the table may be
    lost). The keeper exits only when this is False (and the lease is released)."""
    root = cgroups.node_root(os.path.basename(os.path.normpath(node_dir)))
    if root is not None and cgroups.populated(root):
        return True
    if root is None and procfs.marked_processes(node_dir):
        return True
    for r in _records(node_dir):
        pid = r.get("pid")
        if r.get("state") in ("running", "stopping") and isinstance(pid, int) and pid > 0:
            if procfs.start_ticks(pid, live=True) == r.get("ticks"):
                return True
    agent = procfs.agent_pid(node_dir)
    if agent is None:
        return False
    me = os.getpid()
    return any(int(f[1]) == agent and pid != me and f[0] != b"Z" for pid, f in procfs.proc_stats())


class Log:
    """keeper.log, appended to; a write that fails (ENOSPC, EROFS, EIO) costs the line, never
    the keeper. The first failure is remembered and reported with the next line that fits."""

    def __init__(self, node_dir: str):
        self.path = os.path.join(node_dir, "keeper.log")
        self.lost = 0

    def write(self, *lines: str) -> None:
        if not lines:
            return
        now = f"{time.time():.3f}"
        text = "".join(f"{now} {line}\n" for line in lines)
        if self.lost:
            text = f"{now} ({self.lost} earlier lines could not be written)\n" + text
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            self.lost = 0
        except OSError:
            self.lost += len(lines)


def _take_lock(node_dir: str, log: Log) -> bool:
    """One keeper per node directory: the agent may start a second one while the first is
    still starting up (keeper.pid not written yet). Held until this process exits. False:
    another keeper holds it. A lock file that cannot be opened (a full or read-only disk)
    does not stop this keeper: two keepers are a smaller risk than none."""
    try:
        fd = os.open(os.path.join(node_dir, "keeper.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.write(f"cannot open keeper.lock ({exc.strerror}): running without it")
        return True
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # A keeper that is handing over (Watch.hand_over) holds it for a moment more;
            # one that stays holds it on: step aside then.
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            time.sleep(POLL)
            continue
        except OSError as exc:
            log.write(f"cannot lock keeper.lock ({exc.strerror}): running without it")
        return True  # (fd stays open: the lock lives as long as this process)


def _unlink_pid(node_dir: str) -> None:
    try:
        os.unlink(os.path.join(node_dir, "keeper.pid"))
    except OSError:
        pass


def _write_pid(node_dir: str, log: Log) -> None:
    try:
        with open(os.path.join(node_dir, "keeper.pid"), "w") as fh:
            fh.write(f"{os.getpid()} {procfs.start_ticks(os.getpid())}\n")
    except OSError as exc:  # the agent then starts keepers that step aside: harmless
        log.write(f"cannot write keeper.pid ({exc.strerror}): keeping watch anyway")


def main(argv: list[str]) -> int:
    node_dir = argv[1]
    lease = os.path.join(node_dir, "lease")
    log = Log(node_dir)
    if not _take_lock(node_dir, log):
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the lease file decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch = Watch(node_dir, lease, log)
    pid_written = False
    while True:
        try:
            pause = watch.step()
        except Exception as exc:  # never die: an unexpected error costs one round, not the guard
            log.write(f"error: {type(exc).__name__}: {exc}")
            pause = POLL * 5
        if not pid_written:  # after the first look: keeper.pid says "it has read the lease file"
            _write_pid(node_dir, log)
            pid_written = True
        if pause is None:
            return 0
        time.sleep(pause)


class Watch:
    """The keeper's state between two looks at the lease file (see the module docstring)."""

    def __init__(self, node_dir: str, lease: str, log: Log):
        self.node_dir, self.lease, self.log = node_dir, lease, log
        self.known: float | None = None  # the last valid record read (leaserecord.RELEASED: released)
        self.unreadable_since: float | None = None  # the file has been missing or invalid since
        self.unreadable_logged = False
        self.released_listing: str | None = None  # resources.json as last released, during this expiry
        self.logged_kills: set[int] = set()  # process groups already logged during this expiry

    def step(self) -> float | None:
        """One look: the seconds to sleep before the next, or None to exit (released, and
        nothing guarded alive)."""
        now = time.monotonic()
        read = leaserecord.read_deadline(self.lease)
        if read is not None:
            if self.unreadable_logged:
                self.log.write("lease file readable again")
            self.known, self.unreadable_since, self.unreadable_logged = read, None, False
        else:
            if self.unreadable_since is None:
                self.unreadable_since = now
            if now - self.unreadable_since < TORN_GRACE:
                return POLL  # most likely a record caught mid-write: read it again
            if not self.unreadable_logged:
                self.unreadable_logged = True
                until = "lapsed" if self.known is None or self.known <= now else f"lapses at {self.known:.3f}"
                self.log.write(f"lease file {self.lease} missing or not a valid record: no renewal counts; the lease {until}")
        known = self.known
        if known is not None and now < known:
            self.released_listing = None
            self.logged_kills.clear()
            # Sleep until the deadline itself rather than polling: the agent only ever moves
            # it later (lease_until never decreases, also across a restart), so waking at the
            # deadline last read and reading it again is exact, and costs a wake-up per
            # renewal instead of a hundred a second. (While the file is unreadable, only a
            # new file can change anything, and it is read at the next wake-up.)
            return min(known - now, IDLE_MAX)
        if known is None:
            why = "no valid lease record"
        elif known == leaserecord.RELEASED:
            why = "lease released"
        else:
            why = f"lease deadline {known:.3f} passed"
        self.expire(why)
        if known == leaserecord.RELEASED and not anything_alive(self.node_dir) and self.hand_over():
            self.log.write("lease released and nothing of the node alive: exiting")
            return None
        return POLL * 5

    def hand_over(self) -> bool:
        """May this keeper exit? Not while an agent of the node is alive: a new agent that
        started after the release reuses the live keeper it finds (keeper.pid), and would
        then run its groups unguarded. keeper.pid goes first, then the agent is looked for
        again: the agent writes agent.pid before it looks at keeper.pid, so either this
        keeper sees the new agent (and stays), or the agent finds no keeper.pid and starts a
        keeper of its own (which waits for this one's lock: _take_lock)."""
        if procfs.agent_pid(self.node_dir) is not None:
            return False
        _unlink_pid(self.node_dir)
        if procfs.agent_pid(self.node_dir) is not None:
            _write_pid(self.node_dir, self.log)
            return False
        return True

    def expire(self, why: str) -> None:
        """Kill, and keep killing whatever still or newly runs until the agent renews (a
        paused agent may resume mid-spawn); release the node's addresses and mounts."""
        killed = fire(self.node_dir)
        # A killed but not yet reaped leader keeps its group "alive": log each group once.
        fresh_kills = [g for g in killed if g not in self.logged_kills]
        self.logged_kills.update(killed)
        # Mounts and addresses: once per expiry, and again whenever the agent lists
        # something new (it writes the list before it applies anything).
        listing = read_resources(self.node_dir)
        released = release(listing, exempt(self.node_dir)) if listing != self.released_listing else []
        self.released_listing = listing
        lines = [f"{why}: SIGKILL process groups {fresh_kills}"] if fresh_kills else []
        self.log.write(*lines, *(f"{why}: released: {line}" for line in released))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
