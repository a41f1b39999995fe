"""Mount entries as the kernel sees them: /proc/self/mountinfo, compared with the spec.

Guarantees:
- `parse` reads every mountinfo line, undoing the kernel's octal escapes (\\040 for a
  space, \\011, \\012, \\134), skipping optional fields, keeping super options apart.
- `check` reports one of "running" (the topmost mount at the target is the entry's
  source, fstype and options), "stopped" (nothing mounted at the target) or "mismatch"
  (something is mounted there but differs; the message says what).
- Only the caller's mount namespace is read: a mount elsewhere is not this node's view.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from collections.abc import Iterable, Mapping

import attrs

from reconciler.host import cgroups
from reconciler.observe import EntryState
from reconciler.spec import Entry, Mount

MOUNTINFO = "/proc/self/mountinfo"

# Requested options that never show in mountinfo: fstab/mount(8)-only words, or defaults.
IGNORED = frozenset(
    {"defaults", "auto", "noauto", "nofail", "user", "nouser", "users", "owner", "group", "_netdev",
     "bind", "rbind", "loop", "remount", "silent", "loud", "nostrictatime", "iversion", "noiversion"}
)
IGNORED_PREFIXES = ("x-", "X-", "comment=", "loop=", "offset=", "sizelimit=", "encryption=", "helper=")
# A requested default flag is in effect when its opposite is absent (mountinfo only shows the opposite).
ABSENT = {
    "exec": ("noexec",), "suid": ("nosuid",), "dev": ("nodev",), "atime": ("noatime",),
    "diratime": ("nodiratime",), "async": ("sync",), "nomand": ("mand",), "norelatime": ("relatime",),
    "nolazytime": ("lazytime",), "strictatime": ("relatime", "noatime"), "nodirsync": ("dirsync",),
}
PROPAGATION = {"shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable", "runbindable"}
_SIZE = re.compile(r"^(\d+)([kmgtpe]?)$", re.IGNORECASE)
_PAGE = 4096


@attrs.frozen
class MountInfo:
    """One line of mountinfo. `options` are per-mount, `super_options` per-filesystem."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # the directory of the filesystem that is mounted here ("/" unless a bind)
    target: str
    options: tuple[str, ...]
    optional: tuple[str, ...]  # shared:N, master:N, propagate_from:N, unbindable
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def all_options(self) -> tuple[str, ...]:
        return self.options + self.super_options


@attrs.frozen
class Check:
    """The outcome of comparing one Mount with the table."""

    state: str  # running | stopped | mismatch
    message: str = ""
    options_only: bool = False  # a mismatch that a remount can fix
    info: MountInfo | None = None


unescape = cgroups.unescape  # the kernel's octal escapes (show_path/seq_escape): '\\040' -> ' '


def parse(text: str) -> list[MountInfo]:
    """Parse mountinfo text; lines that do not have the documented shape are skipped."""
    out = []
    for line in text.splitlines():
        # split(" "), not split(): an empty source shows as two adjacent spaces.
        f = line.split(" ")
        if len(f) < 10 or "-" not in f[6:]:
            continue
        sep = f.index("-", 6)
        if len(f) < sep + 4:
            continue
        major, _, minor = f[2].partition(":")
        out.append(
            MountInfo(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                major=int(major),
                minor=int(minor),
                root=unescape(f[3]),
                target=unescape(f[4]),
                options=tuple(f[5].split(",")),
                optional=tuple(f[6:sep]),
                fstype=unescape(f[sep + 1]),
                source=unescape(f[sep + 2]),
                super_options=tuple(unescape(o) for o in f[sep + 3].split(",") if o),
            )
        )
    return out


def read(path: str = MOUNTINFO) -> list[MountInfo]:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        return parse(fh.read())


def canonical(path: str) -> str:
    """The path as mount(8) records it: symlinks resolved (when they exist), no trailing '/'."""
    return os.path.realpath(path)


def _topmost(candidates: list[MountInfo]) -> MountInfo | None:
    # Stacked mounts: the visible one is the one no other candidate sits on.
    parents = {c.parent_id for c in candidates}
    top = [c for c in candidates if c.mount_id not in parents]
    return (top or candidates)[-1] if candidates else None


def find(table: Iterable[MountInfo], target: str) -> MountInfo | None:
    """The mount visible at `target` (the topmost when several are stacked), or None."""
    table = list(table)
    # The spelled path first: resolving symlinks means stat(2)ing the mount point, which
    # hangs on a dead network filesystem; only a path not found as written is resolved.
    t = os.path.normpath(target)
    found = _topmost([m for m in table if m.target == t])
    if found is None and canonical(target) != t:
        t = canonical(target)
        found = _topmost([m for m in table if m.target == t])
    return found


def containing(table: Iterable[MountInfo], path: str) -> MountInfo | None:
    """The mount whose filesystem holds `path` (longest mount point that is a prefix)."""
    p = canonical(path)
    best: list[MountInfo] = []
    best_len = -1
    for m in table:
        t = m.target
        if p == t or p.startswith(t.rstrip("/") + "/"):
            if len(t) > best_len:
                best, best_len = [m], len(t)
            elif len(t) == best_len:
                best.append(m)
    return _topmost(best)


def submounts(table: Iterable[MountInfo], target: str) -> list[str]:
    """Mount points strictly below `target` (they make an unmount of target busy)."""
    t = canonical(target).rstrip("/") + "/"
    return [m.target for m in table if m.target.startswith(t)]


def is_bind(m: Mount) -> bool:
    return bool({"bind", "rbind"} & set(split_options(m.options)))


def split_options(options: str) -> list[str]:
    return [o.strip() for o in options.split(",") if o.strip()]


def _size(value: str) -> int | None:
    m = _SIZE.match(value)
    if not m:
        return None
    return int(m.group(1)) * 1024 ** " kmgtpe".index(m.group(2).lower() or " ")


def _id(value: str, lookup) -> int | None:
    if value.isdigit():
        return int(value)
    try:
        return lookup(value)
    except (KeyError, ValueError):
        return None


def _same_value(key: str, want: str, have: str) -> bool:
    if want == have:
        return True
    if key == "mode":
        try:
            return int(want, 8) == int(have, 8)
        except ValueError:
            return False
    if key == "uid":
        return _id(want, lambda n: pwd.getpwnam(n).pw_uid) == _id(have, int)
    if key == "gid":
        return _id(want, lambda n: grp.getgrnam(n).gr_gid) == _id(have, int)
    if want.endswith("%"):
        return True  # a share of memory (tmpfs size=50%) is shown converted: nothing to compare
    w, h = _size(want), _size(have)
    # tmpfs and friends round sizes up to whole pages and print them in k.
    return w is not None and h is not None and 0 <= h - w < _PAGE


def option_differences(requested: str, info: MountInfo) -> list[str]:
    """Requested options not in effect on `info`, each as 'X requested, Y in effect'."""
    per_mount = set(info.options)
    flags = set(info.all_options)
    values: dict[str, str] = {}
    for o in info.all_options:
        k, eq, v = o.partition("=")
        if eq:
            values[k] = v
    diffs = []
    for opt in split_options(requested):
        if opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        if opt in ("ro", "rw"):
            # The per-mount flag decides: a read-only bind of a read-write filesystem is "ro".
            if opt not in per_mount:
                diffs.append(f"{opt} requested, {'rw' if opt == 'ro' else 'ro'} in effect")
            continue
        if opt in ABSENT:
            present = [o for o in ABSENT[opt] if o in flags]
            if present:
                diffs.append(f"{opt} requested, {present[0]} in effect")
            continue
        if opt in PROPAGATION:
            shown = {o.split(":")[0] for o in info.optional}
            kind = opt[1:] if opt.startswith("r") and opt != "rw" else opt
            ok = {"shared": "shared" in shown, "slave": "master" in shown, "unbindable": "unbindable" in shown,
                  "private": not shown & {"shared", "master", "unbindable"}}[kind]
            if not ok:
                diffs.append(f"{opt} requested, propagation is {' '.join(info.optional) or 'private'}")
            continue
        key, eq, want = opt.partition("=")
        if eq:
            have = values.get(key)
            if have is None:
                diffs.append(f"{opt} requested, no {key} in effect")
            elif not _same_value(key, want, have):
                diffs.append(f"{opt} requested, {key}={have} in effect")
        elif opt not in flags:
            diffs.append(f"{opt} requested, not in effect")
    return diffs


def _loop_backing(source: str) -> str | None:
    name = os.path.basename(source)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _device_path(source: str) -> str | None:
    for tag, folder in (("UUID=", "by-uuid"), ("LABEL=", "by-label"), ("PARTUUID=", "by-partuuid"), ("PARTLABEL=", "by-partlabel")):
        if source.startswith(tag):
            return f"/dev/disk/{folder}/{source[len(tag):]}"
    return source if source.startswith("/") else None


def source_difference(m: Mount, info: MountInfo, table: list[MountInfo]) -> str:
    """'' when `info` mounts what `m` asks for; otherwise what differs, for a person."""
    if is_bind(m):
        # A bind shows the filesystem's own source: compare device and root directory instead.
        if not os.path.exists(m.source):
            return f"bind source {m.source} does not exist"
        origin = containing([t for t in table if t.mount_id != info.mount_id], m.source)
        if origin is None:
            return f"bind source {m.source} is on no mount"
        rel = os.path.relpath(canonical(m.source), origin.target)
        root = os.path.normpath(os.path.join(origin.root, rel)) if rel != "." else origin.root
        if (info.major, info.minor, info.root) != (origin.major, origin.minor, root):
            return (f"bind of device {info.major}:{info.minor} directory {info.root}, but {m.source} is "
                    f"device {origin.major}:{origin.minor} directory {root}")
        return ""
    if "loop" in split_options(m.options) and info.source.startswith("/dev/loop"):
        backing = _loop_backing(info.source)
        if backing is not None and backing == canonical(m.source):
            return ""
        return f"source is {info.source} (backed by {backing or 'nothing'}), not {m.source}"
    if info.source == m.source:
        return ""
    dev = _device_path(m.source)
    if dev is not None:
        try:
            st = os.stat(dev)
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            if (os.major(st.st_rdev), os.minor(st.st_rdev)) == (info.major, info.minor):
                return ""
            try:
                if os.stat(info.source).st_rdev == st.st_rdev:
                    return ""
            except OSError:
                pass
        elif canonical(m.source) == info.source:
            return ""
    return f"source is {info.source}, not {m.source}"


def check(m: Mount, table: list[MountInfo]) -> Check:
    """Compare one Mount with the mount table (see the module docstring for the states)."""
    info = find(table, m.target)
    if info is None:
        return Check("stopped", f"nothing mounted at {m.target}")
    diffs = []
    src = source_difference(m, info, table)
    if src:
        diffs.append(src)
    if m.fstype and m.fstype != "auto" and not is_bind(m) and info.fstype != m.fstype:
        diffs.append(f"fstype is {info.fstype}, not {m.fstype}")
    opts = option_differences(m.options, info)
    if not diffs and not opts:
        return Check("running", info=info)
    message = f"{m.target}: " + "; ".join(diffs + opts)
    return Check("mismatch", message, options_only=not diffs, info=info)


def observe(
    entries: Iterable[Entry],
    *,
    group_of: Mapping[str, str] | None = None,
    table: list[MountInfo] | None = None,
) -> dict[str, EntryState]:
    """EntryState (kind "mount") for each mount entry, keyed by tag; other kinds are skipped.

    `group_of` maps tag -> group name for the returned states ("" when absent). The
    mount table is read once for all entries unless `table` is given.
    """
    if table is None:
        table = read()
    group_of = group_of or {}
    out = {}
    for e in entries:
        if e.mount is None:
            continue
        c = check(e.mount, table)
        out[e.tag] = EntryState(group=group_of.get(e.tag, ""), tag=e.tag, kind="mount", state=c.state,
                                message=c.message if c.state != "stopped" else "")
    return out
