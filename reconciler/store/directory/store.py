"""DirectoryStore: the Store contract over the directory layout (see the package's docstring).

It composes the parts (layout, heartbeats, reader, claims), whose I/O blocks, and runs that
I/O in threads: a hung NFS server must not stall the event loop (the lease deadline, not the
call, decides what happens then). Every OSError becomes the StoreError the contract names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from pathlib import Path

from reconciler.store import Claim, Heartbeat, Snapshot, Store, StoreError, records
from reconciler.store.directory.claims import Claims
from reconciler.store.directory.heartbeats import Heartbeats
from reconciler.store.directory.layout import Layout
from reconciler.store.directory.reader import Reader


class DirectoryStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = f"dir:{self.root}"
        self._layout = Layout(self.root, self.url)
        self._skips = records.Skips(self.url)
        self._heartbeats = Heartbeats(self._layout)
        self._reader = Reader(self._layout, self._skips)
        self._claims = Claims(self._layout)
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
        await self._io(self._layout.create)

    def create(self) -> None:
        """setup(), blocking (for tools and tests)."""
        self._blocking(self._layout.create)

    # --- heartbeat ------------------------------------------------------------------------

    async def publish(self, heartbeat: Heartbeat) -> None:
        await self._io(self._heartbeats.publish, heartbeat, heartbeat=True)

    def publish_blocking(self, heartbeat: Heartbeat) -> None:
        """publish(), in the calling thread."""
        self._blocking(self._heartbeats.publish, heartbeat)

    async def read(self) -> Snapshot:
        return await self._io(self._read, heartbeat=True)

    def read_blocking(self) -> Snapshot:
        """read(), in the calling thread."""
        return self._blocking(self._read)

    def _read(self) -> Snapshot:
        members, claims, skipped = self._reader.read()
        return Snapshot(members=members, claims=claims, skipped=tuple(skipped), displaced=self._heartbeats.displaced())

    async def close(self) -> None:
        if self._heartbeat_pool is not None:
            self._heartbeat_pool.shutdown(wait=False)
            self._heartbeat_pool = None

    # --- claims ---------------------------------------------------------------------------

    async def claim(self, group: str, node: str) -> Claim | None:
        return await self._io(self._claims.claim, group, node)

    async def release(self, claim: Claim) -> bool:
        return await self._io(self._claims.end, claim)

    async def break_claim(self, claim: Claim) -> bool:
        return await self._io(self._claims.end, claim)
