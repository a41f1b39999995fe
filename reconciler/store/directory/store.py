"""DirectoryStore: the Store contract over the directory layout (see the package's docstring).

It composes the parts (layout, heartbeats, reader, claims), whose I/O blocks, and runs that
I/O in threads: a hung NFS server must not stall the event loop (the lease deadline, not the
call, decides what happens then). Every OSError becomes the StoreError the contract names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Sequence
from pathlib import Path

from reconciler.published import Event, Intent, SpecRevision
from reconciler.store import EVENTS_KEEP, EVENTS_MAX_AGE, Claim, Heartbeat, Snapshot, Store, StoreError, records
from reconciler.store.directory.claims import Claims
from reconciler.store.directory.events import Events
from reconciler.store.directory.heartbeats import Heartbeats
from reconciler.store.directory.intents import Intents
from reconciler.store.directory.layout import Layout
from reconciler.store.directory.reader import Reader
from reconciler.store.directory.specs import Specs


class DirectoryStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = f"dir:{self.root}"
        self._layout = Layout(self.root, self.url)
        self._skips = records.Skips(self.url)
        self._heartbeats = Heartbeats(self._layout)
        self._reader = Reader(self._layout, self._skips)
        self._claims = Claims(self._layout)
        self._specs = Specs(self._layout)
        self._events = Events(self._layout, self._skips)
        self._intents = Intents(self._layout, self._skips)
        # The heartbeat (publish, read) has a thread of its own: a burst of claims or releases
        # (a node starting or taking over many groups) must not delay the lease renewal.
        self._heartbeat_pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def skipped_total(self) -> int:  # type: ignore[override]
        return self._skips.total

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

    # --- the layout -----------------------------------------------------------------------

    async def setup(self) -> None:
        """Store.setup: the layout (spec/ included), and spec/ and its revisions checked
        (specs.py: StoreRefused if they must not be trusted)."""
        await self._io(self._create)

    def create(self) -> None:
        """setup(), blocking (for tools and tests)."""
        self._blocking(self._create)

    def _create(self) -> None:
        self._layout.create()
        self._specs.check()

    # --- heartbeat ------------------------------------------------------------------------

    async def publish(self, heartbeat: Heartbeat) -> None:
        await self._io(self._heartbeats.publish, heartbeat, heartbeat=True)

    def publish_blocking(self, heartbeat: Heartbeat) -> None:
        """publish(), in the calling thread."""
        self._blocking(self._heartbeats.publish, heartbeat)

    async def read(self) -> Snapshot:
        return await self._io(self._read, heartbeat=True)

    async def forget(self, node: str) -> bool:
        """Store.forget: nodes/NODE and status/NODE.json unlinked."""
        return bool(await self._io(self._forget, node))

    def _forget(self, node: str) -> bool:
        if not records.valid_name(node):
            raise StoreError(f"{self.url}: cannot forget {node!r}: not a valid node name")
        found = False
        with self._layout.dirs("nodes", "status") as d:
            for sub, name in (("nodes", node), ("status", f"{node}.json")):
                try:
                    os.unlink(name, dir_fd=d[sub])
                    found = True
                except FileNotFoundError:
                    pass
        return found

    def read_blocking(self) -> Snapshot:
        """read(), in the calling thread."""
        return self._blocking(self._read)

    def _read(self) -> Snapshot:
        members, claims, skipped = self._reader.read()
        intents = self._intents.read(skipped)
        return Snapshot(members=members, claims=claims, skipped=tuple(skipped), displaced=self._heartbeats.displaced(),
                        spec_revision=self._specs.current_for_read(), intents=intents)

    async def close(self) -> None:
        if self._heartbeat_pool is not None:
            self._heartbeat_pool.shutdown(wait=False)
            self._heartbeat_pool = None

    # --- claims ---------------------------------------------------------------------------

    async def claim(self, group: str, node: str, *, outlive_owner: bool = False) -> Claim | None:
        # (Claims here never expire: every claim outlives its owner until released or broken.)
        return await self._io(self._claims.claim, group, node)

    async def release(self, claim: Claim) -> bool:
        return await self._io(self._claims.end, claim)

    async def break_claim(self, claim: Claim) -> bool:
        return await self._io(self._claims.end, claim)

    async def hand_over(self, claim: Claim, node: str, *, outlive_owner: bool = False) -> Claim | None:
        # (Claims here never expire: outlive_owner changes nothing.)
        return await self._io(self._claims.hand_over, claim, node)

    # --- operator intents (intents.py) ----------------------------------------------------

    async def intent_put(self, intent: Intent) -> Intent:
        return await self._io(self._intents.put, intent)

    async def intent_delete(self, key: str, *, token: str) -> bool:
        return await self._io(self._intents.delete, key, token)

    # --- the cluster spec (specs.py) ------------------------------------------------------

    async def spec_get(self, number: int | None = None) -> SpecRevision | None:
        """Store.spec_get: spec/NUMBER.json (None: the largest number present). A file that
        does not parse, or holds another number, is a StoreError naming it; one that must
        not be trusted (owner, mode, a symlink) is StoreRefused."""
        return await self._io(self._specs.get, number)

    async def spec_put(self, revision: SpecRevision) -> SpecRevision:
        """Store.spec_put: created exclusively (temporary file, fsync, link(2): one winner,
        also on NFS), the directory fsynced, then revisions older than the newest KEEP
        removed (Specs.put)."""
        return await self._io(self._specs.put, revision)

    async def spec_history(self) -> list[SpecRevision]:
        """Store.spec_history: the files in spec/, newest first (at most KEEP)."""
        return await self._io(self._specs.history)

    # --- the history (events.py) -----------------------------------------------------------

    async def events_append(self, events: Sequence[Event], *, keep: int = EVENTS_KEEP,
                            max_age: float = EVENTS_MAX_AGE) -> list[Event]:
        """Store.events_append: one file per event, linked to its seq's name (events.py)."""
        return await self._io(self._events.append, list(events), keep, max_age)

    async def events_read(self, *, after: int = 0, limit: int = 1000) -> list[Event]:
        """Store.events_read: the names of events/ above `after`, each file read."""
        return await self._io(self._events.read, after, limit)
