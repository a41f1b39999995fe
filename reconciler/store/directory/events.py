"""The directory store's history: one small file per event in events/, named by its seq.

events/NNNNNNNNNNNN.json (the seq in twelve digits) holds one event (published.event_dumps).
Why one file per event rather than per-node append-only segments: on a shared NFS directory
appends to a file are not atomic between hosts (O_APPEND is emulated by the client), a reader
could see half a line, and a global order would need a merge of every segment. A file
created whole and then given its name by link(2) is atomic on NFS too (EEXIST if the name
exists: one winner per seq), so the seq *is* the order, and a reader lists one directory and
reads the names above its cursor.

Appends are cheap: the appender remembers the seq after its last one (`_next`) and links
there if the name before it exists and this one does not (names are dense above the pruned
ones: every name is created only when the one before it exists, so that proves it is the
next); otherwise (a peer appended meanwhile, or the first append) it lists events/ once
and links at the largest + 1, again on EEXIST. Files are not fsynced: this is history for
people, not a safety record, and an fsync per event on NFS costs a round trip. Every
PRUNE_EVERY-th seq its appender removes the oldest files beyond `keep` and those whose mtime
is older than `max_age` (never the newest: the next append's proof needs a predecessor).

Blocking: DirectoryStore runs it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence

import attrs

from reconciler.published import Event, StatusError, event_dumps, event_loads
from reconciler.store import PRUNE_EVERY, StoreError, records
from reconciler.store.directory.layout import FILE, NEW, Layout

NAME_RE = re.compile(r"^([0-9]{12})\.json$")
EVENT_MAX = 1 << 16  # bytes: a larger event file is skipped, not read


def name_of(seq: int) -> str:
    return f"{seq:012d}.json"


class Events:
    def __init__(self, layout: Layout, skips: records.Skips):
        self._layout = layout
        self._url = layout.url
        self._skips = skips
        self._next = 0  # the seq after this store's last append (0: list first)

    @contextlib.contextmanager
    def _dir(self) -> Iterator[int | None]:
        """events/'s descriptor, closed on exit; None if absent before this store's setup()
        (a store an older version made holds no history); after setup() absent: unreachable."""
        root = self._layout.open_root()
        try:
            try:
                fd = os.open("events", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
            except FileNotFoundError:
                if self._layout.ready:
                    raise StoreError(f"{self._url}: events/ is missing: unreachable") from None
                yield None
                return
            try:
                yield fd
            finally:
                os.close(fd)
        finally:
            os.close(root)

    @staticmethod
    def _seqs(fd: int) -> list[int]:
        with os.scandir(fd) as it:
            return sorted(int(m.group(1)) for e in it if (m := NAME_RE.match(e.name)))

    def append(self, events: Sequence[Event], keep: int, max_age: float) -> list[Event]:
        """Store.events_append."""
        out: list[Event] = []
        with self._dir() as fd:
            if fd is None:
                raise StoreError(f"{self._url}: events/ is missing (the store was not set up): unreachable")
            for ev in events:
                stored = self._append_one(fd, ev)
                out.append(stored)
                if stored.seq % PRUNE_EVERY == 0:
                    self._prune(fd, stored.seq, keep, max_age)
        return out

    def _exists(self, fd: int, seq: int) -> bool:
        try:
            os.stat(name_of(seq), dir_fd=fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _append_one(self, fd: int, ev: Event) -> Event:
        seq = self._next
        if seq <= 1 or not self._exists(fd, seq - 1):
            seqs = self._seqs(fd)
            seq = seqs[-1] + 1 if seqs else 1
        tmp = f".event.{uuid.uuid4().hex}.tmp"
        while True:
            stored = attrs.evolve(ev, seq=seq)
            out = os.open(tmp, NEW, 0o644, dir_fd=fd)
            try:
                with open(out, "w") as fh:
                    fh.write(event_dumps(stored))
                try:
                    os.link(tmp, name_of(seq), src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    seqs = self._seqs(fd)  # a peer took it: past the largest
                    seq = max(seq, seqs[-1] if seqs else 0) + 1
                    continue
                self._next = seq + 1
                return stored
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)

    def _prune(self, fd: int, newest: int, keep: int, max_age: float) -> None:
        seqs = [s for s in self._seqs(fd) if s < newest]
        doomed = seqs[: max(0, len(seqs) + 1 - max(keep, 1))]
        horizon = time.time() - max_age
        for s in seqs[len(doomed):]:  # then by age, oldest first, until a young one
            try:
                if os.stat(name_of(s), dir_fd=fd, follow_symlinks=False).st_mtime >= horizon:
                    break
            except FileNotFoundError:
                continue
            doomed.append(s)
        for s in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name_of(s), dir_fd=fd)

    def read(self, after: int, limit: int) -> list[Event]:
        """Store.events_read."""
        with self._dir() as fd:
            if fd is None:
                return []
            out: list[Event] = []
            for seq in self._seqs(fd):
                if seq <= after:
                    continue
                if len(out) >= limit:
                    break
                ev = self._read_one(fd, seq)
                if ev is not None:
                    out.append(ev)
            return out

    def _read_one(self, fd: int, seq: int) -> Event | None:
        entry = f"events/{name_of(seq)}"
        try:
            f = os.open(name_of(seq), FILE, dir_fd=fd)
        except FileNotFoundError:
            return None  # pruned meanwhile
        with open(f, "rb") as fh:
            raw = fh.read(EVENT_MAX + 1)
        try:
            if len(raw) > EVENT_MAX:
                raise StatusError(f"larger than {EVENT_MAX} bytes")
            ev = event_loads(raw)
            if ev.seq != seq:
                raise StatusError(f"holds seq {ev.seq}")
        except StatusError as exc:
            self._skips.skip(entry, str(exc))
            return None
        return ev
