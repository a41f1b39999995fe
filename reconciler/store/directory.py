"""The directory store: the embedded default, local or on a shared NFS/GFS/CephFS directory.

Layout under the root:
    nodes/NODE.json          heartbeat {node, counter, digest}; replaced by rename (atomic)
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
import json
import os
import uuid
from pathlib import Path

from reconciler.store import Claim, Heartbeat, Snapshot, Store, StoreError

STUCK_AFTER = 10.0  # seconds a half-finished claim removal may stand before it is completed


class DirectoryStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = f"dir:{self.root}"
        self._last_status: dict[str, str] = {}
        self._last_status_obj: dict[str, dict] = {}  # node -> the status dict last written
        self._parsed: dict[str, tuple[bytes, object]] = {}  # status file -> (its bytes, parsed) at the last read
        self._ready = False
        # The heartbeat (publish, read) has a thread of its own: a burst of claims or releases
        # (a node starting or taking over many groups) must not delay the lease renewal.
        self._heartbeat_pool: concurrent.futures.ThreadPoolExecutor | None = None

    # Every public method runs its blocking file I/O in a thread: a hung NFS server must not
    # stall the event loop (the lease deadline, not the call, decides what happens then).
    async def _io(self, fn, *args, heartbeat: bool = False):
        try:
            if heartbeat:
                if self._heartbeat_pool is None:
                    self._heartbeat_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-heartbeat")
                return await asyncio.get_running_loop().run_in_executor(self._heartbeat_pool, fn, *args)
            return await asyncio.to_thread(fn, *args)
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

    async def publish(self, heartbeat: Heartbeat) -> None:
        await self._io(self._publish, heartbeat, heartbeat=True)

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
        beat = json.dumps({"node": hb.node, "counter": hb.counter, "digest": hb.digest})
        self._replace(self.root / "nodes" / f"{hb.node}.json", beat)

    # --- reading --------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        return await self._io(self._read, heartbeat=True)

    def _read(self) -> Snapshot:
        if not self.root.exists():
            return Snapshot()  # nothing published yet: the first agent creates it
        if not self.root.is_dir():
            raise StoreError(f"{self.url}: not a directory")
        members: dict[str, Heartbeat] = {}
        root = str(self.root)  # os.path, not pathlib: this runs for every member every heartbeat
        nodes_dir, status_dir = os.path.join(root, "nodes"), os.path.join(root, "status")
        parsed, self._parsed = self._parsed, {}
        for name in _listdir(nodes_dir):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            node = name[:-5]
            beat = _read_json(os.path.join(nodes_dir, name))
            if not isinstance(beat, dict) or "counter" not in beat:
                continue
            status = self._read_status(os.path.join(status_dir, name), parsed)
            members[node] = Heartbeat(
                node=node,
                counter=int(beat["counter"]),
                digest=str(beat.get("digest", "")),
                status=status if isinstance(status, dict) else {},
            )
        claims: dict[str, Claim] = {}
        claims_dir = os.path.join(root, "claims")
        for group in _listdir(claims_dir):
            c = self._read_claim(group, claims_dir)
            if c is not None:
                claims[group] = c
        return Snapshot(members=members, claims=claims)

    def _read_status(self, path: str, parsed: dict[str, tuple[bytes, object]]):
        """The status file's JSON, read every time; parsed again only if its bytes changed.

        Unchanged documents come back as the same dict as at the last read: treat them as
        read-only, like the rest of a Snapshot.
        """
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        last = parsed.get(path)
        if last is not None and last[0] == raw:
            doc = last[1]
        else:
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                doc = None
        self._parsed[path] = (raw, doc)
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


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


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
