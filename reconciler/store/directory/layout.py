"""The directory store's layout: the root and its subdirectories, and what may be trusted.

Every access goes through descriptors this module opens: the root's (checked: owned by root
or this process's user, not writable by group or others) and its subdirectories' (opened
O_NOFOLLOW: a subdirectory replaced by a symlink is refused). Files are opened O_NOFOLLOW
and created O_EXCL, so nothing planted under a name is ever followed. Only `create` (the
agent's setup) makes anything: afterwards a missing root or subdirectory is unreachable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import uuid
from pathlib import Path

from reconciler.host import procfs
from reconciler.store import StoreError, StoreRefused

SUBDIRS = ("nodes", "status", "claims", "ends", "generations", "spec", "events", "intents")
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # (NONBLOCK: a planted FIFO)
NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Layout:
    """The store's root directory `root`, named `url` in every message."""

    def __init__(self, root: Path, url: str):
        self.root = root
        self.url = url
        self._path = str(root)
        self._uid = os.geteuid()
        self._setup_wanted = False  # create() was called: finish_setup() completes it if it failed then
        self.ready = False  # create() has made and checked the layout (it never runs again)

    def create(self) -> None:
        """Make the layout if it does not exist yet, and check what exists (the agent's
        setup; nothing else ever creates anything)."""
        self._setup_wanted = True
        self._create()

    def finish_setup(self) -> None:
        """create() again if it was called and failed: only until it succeeds once."""
        if self._setup_wanted and not self.ready:
            self._create()

    def _create(self) -> None:
        if self.ready:
            return
        os.makedirs(self._path, mode=0o755, exist_ok=True)
        root = self.open_root()
        try:
            for sub in SUBDIRS:
                try:
                    os.mkdir(sub, 0o755, dir_fd=root)
                except FileExistsError:
                    pass
                os.close(self.open_sub(root, sub))  # refuses a symlink or anything but a directory
        finally:
            os.close(root)
        self.ready = True

    def open_root(self) -> int:
        """The root directory's descriptor (the configured path may itself be a symlink:
        the operator chose it), checked: owned by root or us, not writable by others."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: the store directory is missing: unreachable") from None
        except NotADirectoryError:
            raise StoreError(f"{self.url}: not a directory") from None
        st = os.fstat(fd)
        if st.st_uid not in (0, self._uid) or st.st_mode & 0o022:
            os.close(fd)
            raise StoreRefused(
                f"{self.url}: {self._path} must be owned by root (or uid {self._uid}) and not writable by group "
                f"or others (it is owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): refused"
            )
        return fd

    def open_sub(self, root: int, name: str) -> int:
        """A subdirectory's descriptor; never through a symlink; missing: unreachable."""
        try:
            return os.open(name, DIR, dir_fd=root)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: {name}/ is missing: unreachable") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreRefused(f"{self.url}: {name} is not a directory (a symlink?): refused") from None
            raise

    def dirs(self, *names: str) -> Dirs:
        """with layout.dirs("nodes", ...) as d: {name: descriptor} of these subdirectories,
        opened together under one root (a plain class, not contextlib: the heartbeat opens
        them twenty times a second)."""
        return Dirs(self, names)

    def fstype(self) -> str:
        """The filesystem type of the mount the root is on (this mount namespace), or "" if unknown."""
        path = os.path.realpath(self._path)
        best, found = -1, ""
        for target, fstype in procfs.mounts():
            inside = path == target or path.startswith(target.rstrip("/") + "/")
            if inside and len(target) >= best:  # later lines are mounted on top of earlier ones
                best, found = len(target), fstype
        return found


class Dirs:
    """Layout.dirs: the root and the named subdirectories, closed on exit."""

    __slots__ = ("layout", "names", "fds")

    def __init__(self, layout: Layout, names: tuple[str, ...]):
        self.layout, self.names = layout, names
        self.fds: list[int] = []

    def __enter__(self) -> dict[str, int]:
        root = self.layout.open_root()
        self.fds.append(root)
        try:
            out = {}
            for name in self.names:
                out[name] = fd = self.layout.open_sub(root, name)
                self.fds.append(fd)
            return out
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def replace(dir_fd: int, name: str, text: str) -> None:
    """Write `name` in the directory as a whole: a new file renamed over the old one."""
    # Unique per call: several threads, processes and hosts (NFS) may write at once;
    # O_EXCL|O_NOFOLLOW: never through anything planted under that name.
    tmp = f".{name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, NEW, 0o644, dir_fd=dir_fd)
    try:
        with open(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a symlink, never follows it
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def never_set_up(root: str) -> bool:
    """True if no agent ever set up a store at `root` (it is absent, or a directory without
    any of the layout): read-only tools (a dry run before the first start) may show an empty
    cluster there. Anything else missing is an unreachable store."""
    if not os.path.lexists(root):
        return True
    return os.path.isdir(root) and not any(os.path.lexists(os.path.join(root, d)) for d in SUBDIRS)


def scan(fd: int) -> dict[str, bool]:
    """name -> whether it is a symlink, for every entry of a directory (raises OSError)."""
    with os.scandir(fd) as it:
        return {e.name: e.is_symlink() for e in it}


def read_json(dir_fd: int, name: str):
    """A small JSON file in the directory, never through a symlink; None if absent or malformed."""
    try:
        fd = os.open(name, FILE, dir_fd=dir_fd)
    except OSError:
        return None
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        raw = fh.read(1 << 16)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
