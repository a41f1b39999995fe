"""The directory store: the embedded default, local or on a shared NFS/GFS/CephFS directory.

Layout under the root:
    nodes/NODE               heartbeat: a symlink whose target is "COUNTER:WALL:DIGEST" (WALL may
                             be empty), replaced by rename (atomic). A symlink because its
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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import itertools
import json
import os
import stat
import time
import uuid
from pathlib import Path

from reconciler import keeper
from reconciler.store import Claim, Heartbeat, Snapshot, Store, StoreError

STUCK_AFTER = 10.0  # seconds a half-finished claim removal may stand before it is completed
# Filesystems whose directory and file timestamps are this kernel's own (set at once, from
# its clock): only there may a read reuse what it found while a timestamp stands still.
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay", "bcachefs"})
# A timestamp counts as settled once the clock is this far past it: more than the coarse
# clock's granularity (one jiffy, at most 10 ms), so a later change cannot carry the same one.
SETTLED = 0.05
FULL_READ_EVERY = 2.0  # seconds: re-read every claim and status at least this often anyway


class DirectoryStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._root = str(self.root)
        # os.path strings, not pathlib: the heartbeat uses them ten times a second
        self._nodes, self._status, self._claims_dir = (os.path.join(self._root, d) for d in ("nodes", "status", "claims"))
        self.url = f"dir:{self.root}"
        self._last_status: dict[str, str] = {}
        self._last_status_obj: dict[str, dict] = {}  # node -> the status dict last written
        self._parsed: dict[str, tuple[tuple, bytes, object]] = {}  # status file -> (stat key, bytes, parsed)
        self._claims: tuple[tuple, dict[str, Claim]] | None = None  # (claims/ stat key, claims) at the last read
        self._full_read_at = 0.0  # monotonic time of the last read that reused nothing
        self._local: bool | None = None  # the root is on a LOCAL_FS filesystem (decided at the first read)
        self._ready = False
        self._tmp_tag = uuid.uuid4().hex[:12]  # unique temporary names: other hosts write here too
        self._tmp_seq = itertools.count()
        # The heartbeat (publish, read) has a thread of its own: a burst of claims or releases
        # (a node starting or taking over many groups) must not delay the lease renewal.
        self._heartbeat_pool: concurrent.futures.ThreadPoolExecutor | None = None

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

    def _setup(self) -> None:
        if self._ready:
            return
        for sub in ("nodes", "status", "claims", "ends", "generations"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._ready = True

    def _replace(self, path: Path, text: str) -> None:
        # Unique per call: several threads, processes and hosts (NFS) may write at once.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)

    # --- heartbeat ------------------------------------------------------------------------

    blocking_publish = True

    async def publish(self, heartbeat: Heartbeat) -> None:
        await self._io(self._publish, heartbeat, heartbeat=True)

    def publish_blocking(self, heartbeat: Heartbeat) -> None:
        self._blocking(self._publish, heartbeat)

    def _publish(self, hb: Heartbeat) -> None:
        self._setup()
        # The very dict written last time is not serialized again (the agent builds a new
        # one whenever its status changes; a status is not modified once published).
        if self._last_status_obj.get(hb.node) is not hb.status:
            status = json.dumps(hb.status, sort_keys=True, separators=(",", ":"))
            if self._last_status.get(hb.node) != status:
                self._replace(self.root / "status" / f"{hb.node}.json", status)
                self._last_status[hb.node] = status
            self._last_status_obj[hb.node] = hb.status
        wall = "" if hb.wall is None else f"{hb.wall:.3f}"
        tmp = f"{self._nodes}/.{hb.node}.{self._tmp_tag}.{next(self._tmp_seq)}.tmp"
        os.symlink(f"{int(hb.counter)}:{wall}:{hb.digest}", tmp)
        os.replace(tmp, f"{self._nodes}/{hb.node}")

    # --- reading --------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        return await self._io(self._read, heartbeat=True)

    def read_blocking(self) -> Snapshot:
        """read(), from a thread other than the event loop's (with publish_blocking)."""
        return self._blocking(self._read)

    def _read(self) -> Snapshot:
        try:
            names = _scan(self._nodes)  # name -> is a symlink (node names may contain dots)
        except (FileNotFoundError, NotADirectoryError) as exc:
            try:
                st = os.stat(self._root)
            except FileNotFoundError:
                return Snapshot()  # nothing published yet: the first agent creates it
            if not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"{self.url}: not a directory") from None
            if isinstance(exc, NotADirectoryError):
                raise
            names = {}
        if self._local is None:
            self._local = _fstype(str(self.root)) in LOCAL_FS
        # What did not change since the last read is reused (local filesystems only, and
        # never for longer than FULL_READ_EVERY): an idle node with 100 claims then reads
        # two directories and one heartbeat file per member instead of every claim.
        mono = time.monotonic()
        reuse = self._local and mono - self._full_read_at < FULL_READ_EVERY
        if not reuse:
            self._full_read_at = mono
        members: dict[str, Heartbeat] = {}
        nodes_dir, status_dir = self._nodes, self._status
        parsed, self._parsed = self._parsed, {}
        beats = {n for n, link in names.items() if link}
        for name, link in names.items():
            if name.startswith("."):
                continue
            if link:
                node, beat = name, _read_beat(f"{nodes_dir}/{name}")
            elif name.endswith(".json") and name[:-5] not in beats:
                node, beat = name[:-5], _read_json(f"{nodes_dir}/{name}")  # the older format
            else:
                continue
            if not isinstance(beat, dict) or "counter" not in beat:
                continue
            status = self._read_status(f"{status_dir}/{node}.json", parsed, reuse)
            wall = beat.get("wall")
            members[node] = Heartbeat(
                node=node,
                counter=int(beat["counter"]),
                digest=str(beat.get("digest", "")),
                status=status if isinstance(status, dict) else {},
                wall=float(wall) if isinstance(wall, (int, float)) else None,
            )
        return Snapshot(members=members, claims=self._read_claims(self._claims_dir, reuse))

    def _read_claims(self, claims_dir: str, reuse: bool) -> dict[str, Claim]:
        """Every claim; the last read's dict again if claims/ has not changed since.

        A claim is created and removed as a directory entry (symlink, unlink), and each of
        those sets the directory's mtime and ctime from the kernel's clock. The listing is
        reused only if that timestamp had settled (was SETTLED older than the clock) when the
        directory was last listed: a change after the listing then always shows as a new
        timestamp, even within the same tick of the coarse clock.
        """
        listed_at = time.time()
        try:
            st = os.stat(claims_dir)
        except FileNotFoundError:
            self._claims = None
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        last = self._claims
        if reuse and last is not None and last[0] == key:
            return last[1]
        claims: dict[str, Claim] = {}
        for group in _listdir(claims_dir):
            c = self._read_claim(group, claims_dir)
            if c is not None:
                claims[group] = c
        settled = listed_at - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > SETTLED
        self._claims = (key, claims) if settled else None
        return claims

    def _read_status(self, path: str, parsed: dict[str, tuple[tuple, bytes, object]], reuse: bool):
        """The status file's JSON; parsed again only if its bytes changed.

        Status files are only ever replaced by rename, never written in place, so a file
        with the same inode, size and settled mtime as at the last read is that same file:
        it is not even read again (local filesystems; see _read_claims).
        Unchanged documents come back as the same dict as at the last read: treat them as
        read-only, like the rest of a Snapshot.
        """
        listed_at = time.time()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        last = parsed.get(path)
        if reuse and last is not None and last[0] == key:
            self._parsed[path] = last
            return last[2]
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        if last is not None and last[1] == raw:
            doc = last[2]
        else:
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                doc = None
        settled = listed_at - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > SETTLED
        # An unsettled stat key never matches again (the file may still change within it).
        self._parsed[path] = (key if settled else (), raw, doc)
        return doc

    def _read_claim(self, group: str, claims_dir: str | None = None) -> Claim | None:
        try:
            target = os.readlink(os.path.join(claims_dir or os.path.join(str(self.root), "claims"), group))
        except FileNotFoundError:
            return None
        node, _, gen = target.rpartition(":")
        if not node or not gen.isdigit():
            return None
        return Claim(group=group, node=node, generation=int(gen), token=gen)

    async def close(self) -> None:
        if self._heartbeat_pool is not None:
            self._heartbeat_pool.shutdown(wait=False)
            self._heartbeat_pool = None

    # --- claims ---------------------------------------------------------------------------

    async def claim(self, group: str, node: str) -> Claim | None:
        return await self._io(self._claim, group, node)

    def _claim(self, group: str, node: str) -> Claim | None:
        self._setup()
        if self._read_claim(group) is not None:
            return None
        gen = _read_int(self.root / "generations" / group) + 1
        try:
            os.symlink(f"{node}:{gen}", self.root / "claims" / group)
        except FileExistsError:
            return None
        return Claim(group=group, node=node, generation=gen, token=str(gen))

    async def release(self, claim: Claim) -> bool:
        return await self._io(self._end, claim)

    async def break_claim(self, claim: Claim) -> bool:
        return await self._io(self._end, claim)

    def _end(self, claim: Claim) -> bool:
        self._setup()
        if not self._is_current(claim):
            return False  # already ended or replaced: never touch a successor
        marker = self.root / "ends" / f"{claim.group}.{claim.generation}"
        try:
            os.symlink(claim.node, marker)
        except FileExistsError:
            self._complete_if_stuck(claim, marker)
            return False
        # Only the marker's winner may remove this instance, and a successor cannot exist
        # while it is still in place, so check-then-unlink cannot hit another claim.
        if not self._is_current(claim):
            return False
        self._remove(claim)
        self._prune(claim.group, claim.generation)
        return True

    def _is_current(self, claim: Claim) -> bool:
        current = self._read_claim(claim.group)
        return current is not None and current.generation == claim.generation and current.node == claim.node

    def _complete_if_stuck(self, claim: Claim, marker: Path) -> None:
        """A winner that died between its marker and the unlink would leave the claim stuck.

        After STUCK_AFTER seconds (measured by the filesystem's own clock, comparing the
        marker with a file written now) one completer, chosen by a second exclusive marker,
        finishes the removal.
        """
        try:
            probe = self.root / "ends" / f".probe.{uuid.uuid4().hex}"
            probe.touch()
            age = probe.stat().st_mtime - os.lstat(marker).st_mtime
            probe.unlink()
        except OSError:
            return
        if age < STUCK_AFTER or not self._is_current(claim):
            return
        try:
            os.symlink(claim.node, marker.with_name(marker.name + ".complete"))
        except FileExistsError:
            return
        if self._is_current(claim):
            self._remove(claim)

    def _remove(self, claim: Claim) -> None:
        gens = self.root / "generations" / claim.group
        if _read_int(gens) < claim.generation:
            self._replace(gens, str(claim.generation))
        try:
            os.unlink(self.root / "claims" / claim.group)
        except FileNotFoundError:
            pass

    def _prune(self, group: str, generation: int) -> None:
        # End markers older than a few generations can never be contended again.
        for name in (f"{group}.{generation - 8}", f"{group}.{generation - 8}.complete"):
            try:
                os.unlink(self.root / "ends" / name)
            except OSError:
                pass


def _fstype(path: str) -> str:
    """The filesystem type of the mount `path` is on (this mount namespace), or "" if unknown."""
    path = os.path.realpath(path)
    best, found = -1, ""
    for target, fstype in keeper.mounts():
        inside = path == target or path.startswith(target.rstrip("/") + "/")
        if inside and len(target) >= best:  # later lines are mounted on top of earlier ones
            best, found = len(target), fstype
    return found


def _scan(path: str) -> dict[str, bool]:
    """name -> whether it is a symlink, for every entry of a directory (raises OSError)."""
    with os.scandir(path) as it:
        return {e.name: e.is_symlink() for e in it}


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _read_beat(path: str) -> dict | None:
    """A heartbeat symlink's target, "COUNTER:WALL:DIGEST", as the fields of a dict."""
    try:
        counter, wall, digest = os.readlink(path).split(":", 2)
        return {"counter": int(counter), "wall": float(wall) if wall else None, "digest": digest}
    except (OSError, ValueError):
        return None


def _read_json(path: Path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError:
        return 0
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0
        raise
