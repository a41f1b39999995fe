"""A cgroup (v2) per process entry, so the kernel, not a pid file, knows what each entry runs.

Layout: the node's subtree lives under the cgroup the agent itself runs in,

    MOUNT/AGENT_CGROUP/reconciler-NODE/g-GROUP/e-TAG

(under systemd with `Delegate=yes`: inside the service's own cgroup). The keeper, a child
of the agent in the agent's cgroup, computes the same path from its own /proc/self/cgroup
and the node name: no pid or path file. The `g-`/`e-` prefixes keep a group or tag called
`cgroup.procs` (or `memory.max`) from ever meeting an interface file. No controller is
enabled anywhere, so the no-internal-processes rule does not apply: the agent may stay in
the parent of its subtree.

Standard library only: the keeper imports this module.

`RECONCILER_CGROUPS=off` in the agent's environment disables cgroups (the supervisor then
falls back to its table and the environment marker, as on a machine whose cgroup hierarchy
cannot be written); tests use it to exercise that fallback.
"""

from __future__ import annotations

import os
import re
import signal
import time

PREFIX = "reconciler-"
GROUP_PREFIX = "g-"
ENTRY_PREFIX = "e-"
SWITCH = "RECONCILER_CGROUPS"  # "off": never use cgroups


def enabled() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() not in ("off", "0", "no", "false")


def unescape(field: str) -> str:
    """A /proc/self/mountinfo field with the kernel's octal escapes undone ('\\040' -> ' ');
    the one implementation (the keeper and observe/mounts.py use it too)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount() -> tuple[str, str] | None:
    """(mount point, root within the hierarchy) of the first cgroup2 mount, or None."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
                    return unescape(fields[4]), unescape(fields[3])
    except (OSError, IndexError):
        pass
    return None


def favors_dynmods() -> bool:
    """Is the cgroup2 hierarchy mounted with `favordynmods`? Without it, moving a process
    into a cgroup waits for an RCU grace period (~10-20 ms) whenever no move happened just
    before: the time every isolated start and respawn pays (docs/performance.md)."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                _, _, right = line.partition(" - ")
                fields = right.split()
                if fields[:1] == ["cgroup2"]:
                    return len(fields) >= 3 and "favordynmods" in fields[2].split(",")
    except OSError:
        pass
    return False


def own_cgroup(pid: int | str = "self") -> str | None:
    """The process's cgroup v2 path ("0::PATH" in /proc/PID/cgroup), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    path = line[3:].rstrip("\n")
                    return None if path.endswith(" (deleted)") else path
    except OSError:
        pass
    return None


def node_root(node: str, pid: int | str = "self") -> str | None:
    """MOUNT/CGROUP-OF-PID/reconciler-NODE: where the node's subtree is (or would be)."""
    if not enabled() or not node:
        return None
    found, cg = mount(), own_cgroup(pid)
    if found is None or cg is None:
        return None
    point, root = found
    if root != "/":
        if not (cg == root or cg.startswith(root.rstrip("/") + "/")):
            return None  # our cgroup is not visible through that mount
        cg = cg[len(root.rstrip("/")) :] or "/"
    return os.path.join(point, cg.strip("/"), PREFIX + node) if cg.strip("/") else os.path.join(point, PREFIX + node)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def procs(path: str, *, recursive: bool = False) -> list[int]:
    """The pids in a cgroup (and its descendants, with `recursive`); [] if it is gone."""
    out = []
    try:
        out = [int(x) for x in _read(os.path.join(path, "cgroup.procs")).split()]
    except (OSError, ValueError):
        pass
    if recursive:
        for sub in _children(path):
            out.extend(procs(sub, recursive=True))
    return out


def populated(path: str) -> bool:
    """True while the cgroup or any descendant holds a process (False if it is gone)."""
    try:
        for line in _read(os.path.join(path, "cgroup.events")).splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() == "1"
    except OSError:
        return False
    return bool(procs(path, recursive=True))


def kill(path: str) -> bool:
    """SIGKILL everything in the cgroup and its descendants (`cgroup.kill`: the kernel also
    catches processes forking meanwhile). Without cgroup.kill (kernels before 5.14), the
    processes are frozen while they are killed one by one. True if the cgroup existed."""
    if not os.path.isdir(path):
        return False
    try:
        _write(os.path.join(path, "cgroup.kill"), "1")
        return True
    except FileNotFoundError:
        if not os.path.isdir(path):
            return False
    except OSError:
        pass
    frozen = _freeze(path, True)
    try:
        for _ in range(100):
            pids = procs(path, recursive=True)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if frozen:
                break
            time.sleep(0.001)
    finally:
        if frozen:
            _freeze(path, False)
    return True


def _freeze(path: str, on: bool) -> bool:
    try:
        _write(os.path.join(path, "cgroup.freeze"), "1" if on else "0")
        return True
    except OSError:
        return False


def signal_all(path: str, sig: int) -> list[int]:
    """Send `sig` to every process in the cgroup and its descendants; the pids signalled."""
    sent = []
    for pid in procs(path, recursive=True):
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except OSError:
            pass
    return sent


def children(path: str) -> list[str]:
    """The cgroups directly below `path` (their paths)."""
    return _children(path)


def _children(path: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def remove(path: str) -> bool:
    """rmdir the cgroup, its empty descendants first; False if something still runs in it."""
    for sub in _children(path):
        remove(sub)
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


class Tree:
    """The node's subtree: one cgroup per entry, MOUNT/.../reconciler-NODE/g-GROUP/e-TAG."""

    def __init__(self, root: str):
        self.root = root

    @classmethod
    def open(cls, node: str, *, create: bool = True, pid: int | str = "self") -> tuple["Tree | None", str]:
        """(the tree, "") if cgroups can be used here, else (None, why not). With `create`
        the node's root is made, and must be writable."""
        if not enabled():
            return None, f"cgroups disabled ({SWITCH}=off)"
        root = node_root(node, pid)
        if root is None:
            return None, "no cgroup2 hierarchy (or this process's cgroup is not in it)"
        if not create:
            return (cls(root), "") if os.path.isdir(root) else (None, f"{root} does not exist")
        # Made when the first entry starts (ensure); here only: could it be?
        if os.path.isdir(root):
            if not os.access(os.path.join(root, "cgroup.procs"), os.W_OK):
                return None, f"{root}/cgroup.procs is not writable"
        elif not os.access(os.path.dirname(root), os.W_OK):
            return None, f"cannot create {root}: {os.path.dirname(root)} is not writable"
        return cls(root), ""

    def path(self, group: str, tag: str) -> str:
        return os.path.join(self.root, GROUP_PREFIX + group, ENTRY_PREFIX + tag)

    def ensure(self, group: str, tag: str) -> str:
        path = self.path(group, tag)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(path, exist_ok=True)  # the node's root or the group's: made on first use
        return path

    def open_procs(self, group: str, tag: str) -> int:
        """A write fd of the entry's cgroup.procs (made if missing): a child writes "0" to it
        before exec to move itself in. The kernel checks the opener's credentials, so the
        child may already have dropped root."""
        return os.open(os.path.join(self.ensure(group, tag), "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)

    def entries(self) -> list[tuple[str, str, str]]:
        """(group, tag, path) of every entry cgroup in the tree."""
        out = []
        for gpath in _children(self.root):
            gname = os.path.basename(gpath)
            if not gname.startswith(GROUP_PREFIX):
                continue
            for epath in _children(gpath):
                ename = os.path.basename(epath)
                if ename.startswith(ENTRY_PREFIX):
                    out.append((gname[len(GROUP_PREFIX) :], ename[len(ENTRY_PREFIX) :], epath))
        return out

    def procs(self, group: str, tag: str) -> list[int]:
        return procs(self.path(group, tag), recursive=True)

    def populated(self, group: str, tag: str) -> bool:
        return populated(self.path(group, tag))

    def kill(self, group: str, tag: str) -> bool:
        return kill(self.path(group, tag))

    def signal(self, group: str, tag: str, sig: int) -> list[int]:
        return signal_all(self.path(group, tag), sig)

    def remove(self, group: str, tag: str) -> bool:
        """Remove the entry's cgroup (if empty), and its group's (if then empty)."""
        path = self.path(group, tag)
        done = remove(path)
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass  # another entry of the group still has its cgroup (or it is gone already)
        return done

    def kill_all(self) -> bool:
        return kill(self.root)
