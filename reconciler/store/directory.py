"""The directory store: the embedded default, local or on a shared NFS/GFS/CephFS directory.

Layout under the root:
    nodes/NODE               heartbeat: a symlink whose target is "COUNTER:WALL:DIGEST:INSTANCE"
                             (WALL may be empty; INSTANCE, the agent process's random id, may be
                             absent in records of older agents), replaced by rename (atomic). A symlink because its
                             target lives in the inode: creating and renaming one costs ~30 us,
                             a small file's write + rename ~300 us (ext4 flushes a file renamed
                             over another at once). Readers still accept the older
                             nodes/NODE.json file ({node, counter, digest}).
    status/NODE.json         published status; rewritten only when it changes
    claims/GROUP             a symlink whose target is "NODE:GENERATION": symlink(2) creates
                             it only if absent, atomically, on local filesystems and NFS alike
    ends/GROUP.GENERATION    a symlink created (exclusively) by whoever ends that instance
    generations/GROUP        the last ended generation, so the next claim's number is larger

Ending a claim (release by its owner, break by a survivor) first wins the exclusive
`ends/GROUP.GENERATION` marker: for any one instance only one caller gets past that point,
so two survivors can never both remove it, and a stale owner can never remove a successor's
claim (the successor is a different instance with a larger generation).

Nothing here trusts the directory. setup() creates the layout once, at the agent's start;
afterwards a missing root or subdirectory is "store unreachable" (StoreError), never an
empty store. The root must be owned by root (or this process's user) and not writable by
group or others. Every access goes through directory file descriptors opened with
O_NOFOLLOW (a subdirectory replaced by a symlink is refused), files are opened O_NOFOLLOW
and created O_EXCL, heartbeats and claims (symlinks by design) are only ever readlink'd,
so no planted symlink makes an agent read or write elsewhere. A malformed or stray entry
is skipped, logged once and counted (reconciler/store/records.py); a corrupt generation
counter is an error for that group's claims, never read as 0.

(Longer than 400 lines: the claim protocol and the verified reads share the descriptor
handling above; the value checks themselves live in records.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import itertools
import json
import os
import stat
import time
import uuid
from pathlib import Path

from reconciler.published import EMPTY, NodeStatus
from reconciler.store import Claim, Heartbeat, Snapshot, Store, StoreError, StoreRefused, records
from reconciler.host import procfs

STUCK_AFTER = 10.0  # seconds a half-finished claim removal may stand before it is completed
# Filesystems whose directory and file timestamps are this kernel's own (set at once, from
# its clock): only there may a read reuse what it found while a timestamp stands still.
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay", "bcachefs"})
# A timestamp counts as settled once the clock is this far past it: more than the coarse
# clock's granularity (one jiffy, at most 10 ms), so a later change cannot carry the same one.
SETTLED = 0.05
FULL_READ_EVERY = 2.0  # seconds: re-read every claim and status at least this often anyway
SUBDIRS = ("nodes", "status", "claims", "ends", "generations")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # (NONBLOCK: a planted FIFO)
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
STATUS_MAX = 16 << 20  # bytes: a larger status file is skipped, not read


class DirectoryStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._root = str(self.root)
        self.url = f"dir:{self.root}"
        self._last_status: dict[str, str] = {}
        self._last_status_obj: dict[str, dict] = {}  # node -> the status dict last written
        self._parsed: dict[str, tuple[tuple, bytes, object]] = {}  # node -> (stat key, bytes, parsed)
        # (claims/ stat key, claims, the entries skipped) at the last read
        self._claims: tuple[tuple, dict[str, Claim], tuple[tuple[str, str], ...]] | None = None
        self._full_read_at = 0.0  # monotonic time of the last read that reused nothing
        self._local: bool | None = None  # the root is on a LOCAL_FS filesystem (decided at the first read)
        self._setup_wanted = False  # setup() was called: publish completes it if it failed then
        self._ready = False  # setup() has created and checked the layout (it never runs again)
        self._tmp_tag = uuid.uuid4().hex[:12]  # unique temporary names: other hosts write here too
        self._tmp_seq = itertools.count()
        self._skips = records.Skips(self.url)
        self._written: dict[str, str] = {}  # node -> the heartbeat target this store wrote last
        self._displaced: dict[str, Heartbeat] = {}  # see Snapshot.displaced
        # The heartbeat (publish, read) has a thread of its own: a burst of claims or releases
        # (a node starting or taking over many groups) must not delay the lease renewal.
        self._heartbeat_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._uid = os.geteuid()

    @property
    def skipped_total(self) -> int:  # type: ignore[override]
        return self._skips.total

    # Every public method runs its blocking file I/O in a thread: a hung NFS server must not
    # stall the event loop (the lease deadline, not the call, decides what happens then).
    async def _io(self, fn, *args, heartbeat: bool = False):
        if heartbeat:
            if self._heartbeat_pool is None:
                self._heartbeat_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-heartbeat")
            return await asyncio.get_running_loop().run_in_executor(self._heartbeat_pool, self._blocking, fn, *args)
        return await asyncio.to_thread(self._blocking, fn, *args)

    def _blocking(self, fn, *args):
        """fn(*args), with an OSError reported as the StoreError every method raises."""
        try:
            return fn(*args)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"{self.url}: {exc.strerror or exc} ({exc.filename or self.root})") from None

    # --- the layout, and what may be trusted -------------------------------------------------

    async def setup(self) -> None:
        self._setup_wanted = True
        await self._io(self._create)

    def create(self) -> None:
        """setup(), blocking (for tools and tests)."""
        self._setup_wanted = True
        self._blocking(self._create)

    def _create(self) -> None:
        if self._ready:
            return
        os.makedirs(self._root, mode=0o755, exist_ok=True)
        root = self._open_root()
        try:
            for sub in SUBDIRS:
                try:
                    os.mkdir(sub, 0o755, dir_fd=root)
                except FileExistsError:
                    pass
                os.close(self._sub(root, sub))  # refuses a symlink or anything but a directory
        finally:
            os.close(root)
        self._ready = True

    def _open_root(self) -> int:
        """The root directory's descriptor (the configured path may itself be a symlink:
        the operator chose it), checked: owned by root or us, not writable by others."""
        try:
            fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: the store directory is missing: unreachable") from None
        except NotADirectoryError:
            raise StoreError(f"{self.url}: not a directory") from None
        st = os.fstat(fd)
        if st.st_uid not in (0, self._uid) or st.st_mode & 0o022:
            os.close(fd)
            raise StoreRefused(
                f"{self.url}: {self._root} must be owned by root (or uid {self._uid}) and not writable by group "
                f"or others (it is owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): refused"
            )
        return fd

    def _sub(self, root: int, name: str) -> int:
        """A subdirectory's descriptor; never through a symlink; missing: unreachable."""
        try:
            return os.open(name, _DIR, dir_fd=root)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: {name}/ is missing: unreachable") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreRefused(f"{self.url}: {name} is not a directory (a symlink?): refused") from None
            raise

    def _dirs(self, *names: str) -> "_Dirs":
        """with self._dirs("nodes", ...) as d: {name: descriptor} of these subdirectories,
        opened together under one root (a plain class, not contextlib: the heartbeat opens
        them twenty times a second)."""
        return _Dirs(self, names)

    def _replace(self, dir_fd: int, name: str, text: str) -> None:
        # Unique per call: several threads, processes and hosts (NFS) may write at once;
        # O_EXCL|O_NOFOLLOW: never through anything planted under that name.
        tmp = f".{name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, _NEW, 0o644, dir_fd=dir_fd)
        try:
            with open(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a symlink, never follows it
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    # --- heartbeat ------------------------------------------------------------------------

    blocking_publish = True

    async def publish(self, heartbeat: Heartbeat) -> None:
        await self._io(self._publish, heartbeat, heartbeat=True)

    def publish_blocking(self, heartbeat: Heartbeat) -> None:
        self._blocking(self._publish, heartbeat)

    def _publish(self, hb: Heartbeat) -> None:
        if self._setup_wanted and not self._ready:
            self._create()  # setup() failed at start-up: only until it succeeds once
        if not records.valid_name(hb.node):
            raise StoreError(f"{self.url}: {hb.node!r} is not a valid node name")
        with self._dirs("nodes", "status") as d:
            # The very dict written last time is not serialized again (the agent builds a new
            # one whenever its status changes; a status is not modified once published).
            if self._last_status_obj.get(hb.node) is not hb.status:
                status = records.status_text(hb.status)
                if self._last_status.get(hb.node) != status:
                    self._replace(d["status"], f"{hb.node}.json", status)
                    self._last_status[hb.node] = status
                self._last_status_obj[hb.node] = hb.status
            wall = "" if hb.wall is None else f"{hb.wall:.3f}"
            target = f"{int(hb.counter)}:{wall}:{hb.digest}" + (f":{hb.instance}" if hb.instance else "")
            nodes = d["nodes"]
            if hb.instance:
                self._note_displaced(nodes, hb.node)
            tmp = f".{hb.node}.{self._tmp_tag}.{next(self._tmp_seq)}.tmp"
            os.symlink(target, tmp, dir_fd=nodes)
            os.replace(tmp, hb.node, src_dir_fd=nodes, dst_dir_fd=nodes)
            self._written[hb.node] = target

    def _note_displaced(self, nodes: int, node: str) -> None:
        """Look at the record this publish is about to replace: if it is not what this store
        wrote last, someone else publishes under this name (Snapshot.displaced). A readlink
        (~2 us) per publish: a read after the publish would see the other writer's record
        only if it wrote in the moment between, one read in a hundred."""
        try:
            found = os.readlink(node, dir_fd=nodes)
        except OSError:
            found = None  # absent (or not a heartbeat symlink: the read reports that)
        parsed = records.parse_beat_target(found) if found is not None and found != self._written.get(node) else None
        if parsed is None or isinstance(parsed, str):
            self._displaced.pop(node, None)
            return
        counter, wall, digest, instance = parsed
        self._displaced[node] = Heartbeat(node=node, counter=counter, digest=digest, wall=wall, instance=instance)

    # --- reading --------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        return await self._io(self._read, heartbeat=True)

    def read_blocking(self) -> Snapshot:
        """read(), from a thread other than the event loop's (with publish_blocking)."""
        return self._blocking(self._read)

    def _read(self) -> Snapshot:
        if self._local is None:
            self._local = _fstype(self._root) in LOCAL_FS
        # What did not change since the last read is reused (local filesystems only, and
        # never for longer than FULL_READ_EVERY): an idle node with 100 claims then reads
        # two directories and one heartbeat file per member instead of every claim.
        mono = time.monotonic()
        reuse = self._local and mono - self._full_read_at < FULL_READ_EVERY
        if not reuse:
            self._full_read_at = mono
        skipped: list[str] = []
        with self._dirs("nodes", "status", "claims") as d:
            members = self._read_members(d["nodes"], d["status"], reuse, skipped)
            claims = self._read_claims(d["claims"], reuse, skipped)
        return Snapshot(members=members, claims=claims, skipped=tuple(skipped),
                        displaced=dict(self._displaced) if self._displaced else {})

    def _read_members(self, nodes_fd: int, status_fd: int, reuse: bool, skipped: list[str]) -> dict[str, Heartbeat]:
        names = _scan(nodes_fd)  # name -> is a symlink (node names may contain dots)
        members: dict[str, Heartbeat] = {}
        parsed, self._parsed = self._parsed, {}
        beats = {n for n, link in names.items() if link}
        skip = self._skips.skip
        for name, link in names.items():
            if name.startswith("."):
                continue  # a writer's temporary name
            if link:
                node = name
            elif name.endswith(".json"):
                node = name[:-5]  # the older format
                if node in beats:
                    continue  # replaced by the symlink beside it
            else:
                skip(f"nodes/{name}", "neither a heartbeat symlink nor a NODE.json record", skipped)
                continue
            why = records.check_name(node, "node")
            if why:
                skip(f"nodes/{name}", why, skipped)
                continue
            if link:
                try:
                    fields = records.parse_beat_target(os.readlink(name, dir_fd=nodes_fd))
                except FileNotFoundError:
                    continue  # gone since the listing
            else:
                beat = _read_json(nodes_fd, name)
                fields = (
                    records.beat_fields(beat.get("counter"), beat.get("wall"), beat.get("digest"), beat.get("instance"))
                    if isinstance(beat, dict) else "not a JSON object"
                )
            if isinstance(fields, str):
                skip(f"nodes/{name}", fields, skipped)
                continue
            counter, wall, digest, instance = fields
            status = self._read_status(status_fd, node, parsed, reuse, skipped)
            members[node] = Heartbeat(node=node, counter=counter, digest=digest, status=status, wall=wall, instance=instance)
        return members

    def _read_claims(self, claims_fd: int, reuse: bool, skipped: list[str]) -> dict[str, Claim]:
        """Every claim; the last read's dict again if claims/ has not changed since.

        A claim is created and removed as a directory entry (symlink, unlink), and each of
        those sets the directory's mtime and ctime from the kernel's clock. The listing is
        reused only if that timestamp had settled (was SETTLED older than the clock) when the
        directory was last listed: a change after the listing then always shows as a new
        timestamp, even within the same tick of the coarse clock. (Its skipped entries are
        counted again at every read, like those of a listing read again.)
        """
        listed_at = time.time()
        st = os.fstat(claims_fd)
        key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        last = self._claims
        if reuse and last is not None and last[0] == key:
            for entry, why in last[2]:
                self._skips.skip(entry, why, skipped)
            return last[1]
        claims: dict[str, Claim] = {}
        bad: list[tuple[str, str]] = []
        for group, link in _scan(claims_fd).items():
            why = records.check_name(group, "group") or ("" if link else "not a symlink NODE:GENERATION")
            if not why:
                try:
                    parsed = records.parse_claim(os.readlink(group, dir_fd=claims_fd))
                except FileNotFoundError:
                    continue  # released since the listing
                if isinstance(parsed, str):
                    why = parsed
                else:
                    claims[group] = Claim(group=group, node=parsed[0], generation=parsed[1], token=str(parsed[1]))
            if why:
                bad.append((f"claims/{group}", why))
                self._skips.skip(f"claims/{group}", why, skipped)
        settled = listed_at - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > SETTLED
        self._claims = (key, claims, tuple(bad)) if settled else None
        return claims

    def _read_status(self, status_fd: int, node: str, parsed: dict, reuse: bool, skipped: list[str]) -> NodeStatus:
        """The status file's record (published.EMPTY if absent or malformed); parsed again
        only if its bytes changed.

        Status files are only ever replaced by rename, never written in place, so a file
        with the same inode, size and settled mtime as at the last read is that same file:
        it is not even read again (local filesystems; see _read_claims).
        Unchanged documents come back as the same object as at the last read.
        """
        name = f"{node}.json"
        listed_at = time.time()
        try:
            st = os.stat(name, dir_fd=status_fd, follow_symlinks=False)
        except FileNotFoundError:
            return EMPTY
        if not stat.S_ISREG(st.st_mode) or st.st_size > STATUS_MAX:
            why = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"larger than {STATUS_MAX} bytes"
            self._skips.skip(f"status/{name}", why, skipped)
            return EMPTY
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        last = parsed.get(node)
        if reuse and last is not None and last[0] == key:
            self._parsed[node] = last
            doc = last[2]
        else:
            try:
                fd = os.open(name, _FILE, dir_fd=status_fd)
            except FileNotFoundError:
                return EMPTY
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                self._skips.skip(f"status/{name}", "a symlink", skipped)  # replaced since the stat
                return EMPTY
            with open(fd, "rb") as fh:
                raw = fh.read(STATUS_MAX + 1)
            if last is not None and last[1] == raw:
                doc = last[2]
            else:
                doc = records.parse_status(raw)  # or why it is malformed
            settled = listed_at - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > SETTLED
            # An unsettled stat key never matches again (the file may still change within it).
            self._parsed[node] = (key if settled else (), raw, doc)
        if isinstance(doc, str):
            self._skips.skip(f"status/{name}", doc, skipped)
            return EMPTY
        return doc

    def _read_claim(self, claims_fd: int, group: str) -> Claim | None:
        """One claim, for claiming and ending: a malformed one is an error here (StoreError),
        not absent: nobody may claim over it or end it."""
        try:
            target = os.readlink(group, dir_fd=claims_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StoreError(f"{self.url}: claims/{group} is not a symlink: refused") from None
            raise
        parsed = records.parse_claim(target)
        if isinstance(parsed, str):
            raise StoreError(f"{self.url}: claims/{group}: {parsed}")
        return Claim(group=group, node=parsed[0], generation=parsed[1], token=str(parsed[1]))

    def _read_generation(self, gens_fd: int, group: str) -> int:
        """The last ended generation of `group` (0: none yet). A counter that is not a number,
        not a regular file or a symlink is an error: read as 0 it would let the fencing
        token go backwards."""
        try:
            fd = os.open(group, _FILE, dir_fd=gens_fd)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StoreError(f"{self.url}: generations/{group} is a symlink: refused (repair it by hand)") from None
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise StoreError(f"{self.url}: generations/{group} is not a regular file: refused (repair it by hand)")
            text = fh.read(64).decode("ascii", "replace").strip()
        if not (text.isascii() and text.isdigit()):
            raise StoreError(
                f"{self.url}: generations/{group} holds {text[:20]!r}, not a generation: claims of {group} are refused "
                "until it is repaired (a generation must never go backwards)"
            )
        return int(text)

    async def close(self) -> None:
        if self._heartbeat_pool is not None:
            self._heartbeat_pool.shutdown(wait=False)
            self._heartbeat_pool = None

    # --- claims ---------------------------------------------------------------------------

    async def claim(self, group: str, node: str) -> Claim | None:
        return await self._io(self._claim, group, node)

    def _claim(self, group: str, node: str) -> Claim | None:
        if not (records.valid_name(group) and records.valid_name(node)):
            raise StoreError(f"{self.url}: cannot claim {group!r} for {node!r}: not valid names")
        with self._dirs("claims", "generations") as d:
            if self._read_claim(d["claims"], group) is not None:
                return None
            gen = self._read_generation(d["generations"], group) + 1
            try:
                os.symlink(f"{node}:{gen}", group, dir_fd=d["claims"])
            except FileExistsError:
                return None
        return Claim(group=group, node=node, generation=gen, token=str(gen))

    async def release(self, claim: Claim) -> bool:
        return await self._io(self._end, claim)

    async def break_claim(self, claim: Claim) -> bool:
        return await self._io(self._end, claim)

    def _end(self, claim: Claim) -> bool:
        if not (records.valid_name(claim.group) and records.valid_name(claim.node)):
            return False
        with self._dirs("claims", "ends", "generations") as d:
            if not self._is_current(d, claim):
                return False  # already ended or replaced: never touch a successor
            marker = f"{claim.group}.{claim.generation}"
            try:
                os.symlink(claim.node, marker, dir_fd=d["ends"])
            except FileExistsError:
                self._complete_if_stuck(d, claim, marker)
                return False
            # Only the marker's winner may remove this instance, and a successor cannot exist
            # while it is still in place, so check-then-unlink cannot hit another claim.
            if not self._is_current(d, claim):
                return False
            self._remove(d, claim)
            self._prune(d["ends"], claim.group, claim.generation)
            return True

    def _is_current(self, d: dict[str, int], claim: Claim) -> bool:
        current = self._read_claim(d["claims"], claim.group)
        return current is not None and current.generation == claim.generation and current.node == claim.node

    def _complete_if_stuck(self, d: dict[str, int], claim: Claim, marker: str) -> None:
        """A winner that died between its marker and the unlink would leave the claim stuck.

        After STUCK_AFTER seconds (measured by the filesystem's own clock, comparing the
        marker with a file written now) one completer, chosen by a second exclusive marker,
        finishes the removal.
        """
        ends = d["ends"]
        probe = f".probe.{uuid.uuid4().hex}"
        try:
            os.close(os.open(probe, _NEW, 0o644, dir_fd=ends))
            age = os.stat(probe, dir_fd=ends).st_mtime - os.stat(marker, dir_fd=ends, follow_symlinks=False).st_mtime
            os.unlink(probe, dir_fd=ends)
        except OSError:
            return
        if age < STUCK_AFTER or not self._is_current(d, claim):
            return
        try:
            os.symlink(claim.node, marker + ".complete", dir_fd=ends)
        except FileExistsError:
            return
        if self._is_current(d, claim):
            self._remove(d, claim)

    def _remove(self, d: dict[str, int], claim: Claim) -> None:
        gens = d["generations"]
        try:
            last = self._read_generation(gens, claim.group)
        except StoreError as exc:
            # While this instance is current its generation is above every ended one, so
            # writing it can only move the counter on: a corrupt counter is repaired here.
            records.log.warning("%s (replaced by %d, the generation being ended)", exc, claim.generation)
            last = -1
        if last < claim.generation:
            self._replace(gens, claim.group, str(claim.generation))
        try:
            os.unlink(claim.group, dir_fd=d["claims"])
        except FileNotFoundError:
            pass

    def _prune(self, ends: int, group: str, generation: int) -> None:
        # End markers older than a few generations can never be contended again.
        for name in (f"{group}.{generation - 8}", f"{group}.{generation - 8}.complete"):
            try:
                os.unlink(name, dir_fd=ends)
            except OSError:
                pass


class _Dirs:
    """DirectoryStore._dirs: the root and the named subdirectories, closed on exit."""

    __slots__ = ("store", "names", "fds")

    def __init__(self, store: DirectoryStore, names: tuple[str, ...]):
        self.store, self.names, self.fds = store, names, []

    def __enter__(self) -> dict[str, int]:
        root = self.store._open_root()
        self.fds.append(root)
        try:
            out = {}
            for name in self.names:
                out[name] = fd = self.store._sub(root, name)
                self.fds.append(fd)
            return out
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def never_set_up(root: str) -> bool:
    """True if no agent ever set up a store at `root` (it is absent, or a directory without
    any of the layout): read-only tools (a dry run before the first start) may show an empty
    cluster there. Anything else missing is an unreachable store."""
    if not os.path.lexists(root):
        return True
    return os.path.isdir(root) and not any(os.path.lexists(os.path.join(root, d)) for d in SUBDIRS)


def _fstype(path: str) -> str:
    """The filesystem type of the mount `path` is on (this mount namespace), or "" if unknown."""
    path = os.path.realpath(path)
    best, found = -1, ""
    for target, fstype in procfs.mounts():
        inside = path == target or path.startswith(target.rstrip("/") + "/")
        if inside and len(target) >= best:  # later lines are mounted on top of earlier ones
            best, found = len(target), fstype
    return found


def _scan(fd: int) -> dict[str, bool]:
    """name -> whether it is a symlink, for every entry of a directory (raises OSError)."""
    with os.scandir(fd) as it:
        return {e.name: e.is_symlink() for e in it}


def _read_json(dir_fd: int, name: str):
    """A small JSON file in the directory, never through a symlink; None if absent or malformed."""
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
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
