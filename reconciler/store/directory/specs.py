"""The directory store's cluster spec: numbered revisions, one file each, in spec/.

spec/NNNNNNNNNN.json (the number in ten digits) holds one revision (published.revision_dumps).
A revision is created exclusively: written to a temporary file, fsynced, then os.link()ed to
its final name. link(2) fails with EEXIST if the name exists, atomically, on local
filesystems and NFS alike, so among concurrent putters of one number exactly one wins. The
current revision is the largest number present: a writer that dies half-way leaves at most a
temporary file (".NAME.HEX.tmp", never read), not a head that wedges the compare-and-swap.
After a successful put, revisions older than the newest KEEP are removed.

Trust: the agent runs what these files say, as root. spec/ and every revision file must be
owned by root or this process's user and not be writable by group or others: the rule the
root directory already follows (layout.py), which is also the rule of
reconciler/spec/strictmodes.py for spec files (not reused: it walks paths and raises
SpecError, while the store works through descriptors opened O_NOFOLLOW). It holds for every
user (as root: root-owned only). setup() refuses otherwise (StoreRefused), and so does every
read, get, history and put (StoreRefused is a StoreError), naming the entry.

Blocking: DirectoryStore runs it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator

from reconciler.published import SpecRevision, StatusError, revision_dumps, revision_loads
from reconciler.store import KEEP, SpecConflict, StoreError, StoreRefused
from reconciler.store.directory.layout import FILE, NEW, Layout, scan

NAME_RE = re.compile(r"^([0-9]{10})\.json$")
REVISION_MAX = 64 << 20  # bytes: a larger revision file is refused, not read
SETTLED = 0.05  # see reader.py: a directory timestamp this old cannot hide a later change
FULL_READ_EVERY = 2.0  # seconds: list spec/ again at least this often anyway


def name_of(number: int) -> str:
    return f"{number:010d}.json"


class Specs:
    def __init__(self, layout: Layout, *, local: bool | None = None):
        self._layout = layout
        self._url = layout.url
        self._uid = os.geteuid()
        self._local = local  # the root is on a local filesystem (decided by the first read)
        # (spec/ stat key, current number) at the last listing whose timestamp had settled
        self._listed: tuple[tuple, int] | None = None
        self._listed_at = 0.0  # monotonic time of the last listing

    # --- trust ------------------------------------------------------------------------------

    def _trusted(self, st: os.stat_result, entry: str) -> None:
        """StoreRefused unless `entry` (its stat) is owned by root or us and not writable by
        group or others."""
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (0, self._uid) or mode & 0o022:
            raise StoreRefused(
                f"{self._url}: {entry} must be owned by root (or uid {self._uid}) and not writable by group or others "
                f"(it is owned by uid {st.st_uid}, mode {mode:04o}): refused, the agent runs what it says as root"
            )

    @contextlib.contextmanager
    def _dir(self, *, absent_ok: bool = False) -> Iterator[int | None]:
        """spec/'s descriptor, checked (StoreRefused if it must not be trusted), closed on
        exit. Missing: unreachable (StoreError); but with `absent_ok`, before this store's
        setup(), None: a store an older version made, seen by a read-only tool, holds no
        spec (after setup() a missing spec/ is unreachable, like the other subdirectories)."""
        root = self._layout.open_root()
        try:
            fd = os.open("spec", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        except FileNotFoundError:
            if not (absent_ok and not self._layout.ready):
                raise StoreError(f"{self._url}: spec/ is missing: unreachable") from None
            fd = -1
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreRefused(f"{self._url}: spec is not a directory (a symlink?): refused") from None
            raise
        finally:
            os.close(root)
        if fd < 0:
            yield None
            return
        try:
            self._trusted(os.fstat(fd), "spec/")
            yield fd
        finally:
            os.close(fd)

    def check(self) -> None:
        """setup(): spec/ and every revision in it may be trusted (StoreRefused if not)."""
        with self._dir() as fd:
            assert fd is not None
            for name in scan(fd):
                if NAME_RE.match(name):
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        raise StoreRefused(f"{self._url}: spec/{name} is not a regular file: refused")
                    self._trusted(st, f"spec/{name}")

    # --- the current number -------------------------------------------------------------------

    @staticmethod
    def _numbers(fd: int) -> list[int]:
        """The revision numbers present, in no particular order (temporary and stray names
        are not revisions)."""
        out = []
        for name in scan(fd):
            m = NAME_RE.match(name)
            if m and int(m.group(1)) > 0:
                out.append(int(m.group(1)))
        return out

    def current_for_read(self) -> int:
        """Snapshot.spec_revision: the largest number present (0: none).

        Cheap on an idle node: one open and fstat of spec/; the listing (~KEEP entries) is
        reused while the directory's inode, mtime and ctime stand still, on a local
        filesystem and for at most FULL_READ_EVERY seconds (a revision is created and pruned
        as a directory entry, which sets both from the kernel's clock; see reader.py). A
        missing spec/ before setup() reads as 0 (_dir).
        """
        if self._local is None:
            from reconciler.store.directory.reader import LOCAL_FS

            self._local = self._layout.fstype() in LOCAL_FS
        with self._dir(absent_ok=True) as fd:
            if fd is None:
                return 0
            st = os.fstat(fd)
            key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            mono, listed_at = time.monotonic(), time.time()
            last = self._listed
            if self._local and last is not None and last[0] == key and mono - self._listed_at < FULL_READ_EVERY:
                return last[1]
            number = max(self._numbers(fd), default=0)
            settled = listed_at - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > SETTLED
            self._listed = (key, number) if settled else None
            self._listed_at = mono
            return number

    # --- revisions ----------------------------------------------------------------------------

    def _load(self, fd: int, number: int) -> SpecRevision | None:
        """Revision `number` (None if absent); StoreError naming the file if it is malformed,
        StoreRefused if it must not be trusted."""
        name = name_of(number)
        try:
            f = os.open(name, FILE, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreRefused(f"{self._url}: spec/{name} is a symlink: refused") from None
            raise
        with open(f, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StoreRefused(f"{self._url}: spec/{name} is not a regular file: refused")
            self._trusted(st, f"spec/{name}")
            raw = fh.read(REVISION_MAX + 1)
        if len(raw) > REVISION_MAX:
            raise StoreError(f"{self._url}: spec/{name}: larger than {REVISION_MAX} bytes: refused")
        try:
            rev = revision_loads(raw)
        except StatusError as exc:
            raise StoreError(f"{self._url}: spec/{name}: {exc}") from None
        if rev.number != number:
            raise StoreError(f"{self._url}: spec/{name}: holds revision {rev.number}, not {number}")
        return rev

    def get(self, number: int | None) -> SpecRevision | None:
        """Store.spec_get (None before setup() if spec/ is missing: _dir)."""
        with self._dir(absent_ok=True) as fd:
            if fd is None:
                return None
            for _ in range(3):
                want = max(self._numbers(fd), default=0) if number is None else number
                if want < 1:
                    return None
                rev = self._load(fd, want)
                if rev is not None or number is not None:
                    return rev
                # the current one was pruned since the listing (KEEP puts meanwhile): list again
            raise StoreError(f"{self._url}: spec/: the current revision keeps changing")

    def history(self) -> list[SpecRevision]:
        """Store.spec_history ([] before setup() if spec/ is missing: _dir)."""
        with self._dir(absent_ok=True) as fd:
            if fd is None:
                return []
            out = []
            for number in sorted(self._numbers(fd), reverse=True)[:KEEP]:
                rev = self._load(fd, number)
                if rev is not None:  # (pruned since the listing: no longer kept)
                    out.append(rev)
            return out

    def put(self, rev: SpecRevision) -> SpecRevision:
        """Store.spec_put: create spec/NUMBER.json exclusively if NUMBER - 1 is current.

        The listing decides the conflict in the common case; link(2) decides it among
        concurrent putters (EEXIST: another one won). One more case: a putter whose listing
        is older than KEEP later puts could link a number already pruned; so after the link
        the revision before it must still be there, or the new file is removed again and the
        put is a conflict.
        """
        if rev.number < 1:
            raise StoreError(f"{self._url}: spec revision {rev.number}: numbers start at 1")
        text = revision_dumps(rev).encode()
        with self._dir() as fd:
            assert fd is not None
            current = max(self._numbers(fd), default=0)
            if current != rev.number - 1:
                raise self._conflict(rev, current)
            name = name_of(rev.number)
            tmp = f".{name}.{uuid.uuid4().hex}.tmp"
            f = os.open(tmp, NEW, 0o644, dir_fd=fd)
            try:
                with open(f, "wb") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    raise self._conflict(rev, max(self._numbers(fd), default=0)) from None
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
            if rev.number > 1 and not self._exists(fd, name_of(rev.number - 1)):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
                raise self._conflict(rev, max(self._numbers(fd), default=0))
            os.fsync(fd)  # the new name is durable when this returns
            self._prune(fd, rev.number)
        self._listed = None
        return rev

    @staticmethod
    def _exists(fd: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _conflict(self, rev: SpecRevision, current: int) -> SpecConflict:
        return SpecConflict(
            f"{self._url}: spec revision {rev.number} not stored: the current revision is {current}, "
            f"not {rev.number - 1}", current=current)

    @staticmethod
    def _prune(fd: int, newest: int) -> None:
        """Remove the revisions older than the newest KEEP (never `newest`, the current one)."""
        for number in sorted(n for n in Specs._numbers(fd) if n <= newest - KEEP):
            with contextlib.suppress(OSError):
                os.unlink(name_of(number), dir_fd=fd)
