"""The directory store's reader: every heartbeat, status and claim, reusing what did not change.

What did not change since the last read is reused (local filesystems only, and never for
longer than FULL_READ_EVERY): an idle node with 100 claims then reads two directories and one
heartbeat file per member instead of every claim. Each entry is checked through
reconciler/store/records.py; a malformed or stray one is skipped, logged once and counted.
Blocking: DirectoryStore runs it in a thread.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from reconciler.published import EMPTY, NodeStatus
from reconciler.store import Claim, Heartbeat, records
from reconciler.store.directory.layout import FILE, Layout, read_json, scan

# Filesystems whose directory and file timestamps are this kernel's own (set at once, from
# its clock): only there may a read reuse what it found while a timestamp stands still.
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay", "bcachefs"})
# A timestamp counts as settled once the clock is this far past it: more than the coarse
# clock's granularity (one jiffy, at most 10 ms), so a later change cannot carry the same one.
SETTLED = 0.05
FULL_READ_EVERY = 2.0  # seconds: re-read every claim and status at least this often anyway
STATUS_MAX = 16 << 20  # bytes: a larger status file is skipped, not read


class Reader:
    def __init__(self, layout: Layout, skips: records.Skips):
        self._layout = layout
        self._skips = skips
        self._parsed: dict[str, tuple[tuple, bytes, object]] = {}  # node -> (stat key, bytes, parsed)
        # (claims/ stat key, claims, the entries skipped) at the last read
        self._claims: tuple[tuple, dict[str, Claim], tuple[tuple[str, str], ...]] | None = None
        self._full_read_at = 0.0  # monotonic time of the last read that reused nothing
        self._local: bool | None = None  # the root is on a LOCAL_FS filesystem (decided at the first read)

    def read(self) -> tuple[dict[str, Heartbeat], dict[str, Claim], list[str]]:
        """(members, claims, the entries skipped) as they are now."""
        if self._local is None:
            self._local = self._layout.fstype() in LOCAL_FS
        mono = time.monotonic()
        reuse = self._local and mono - self._full_read_at < FULL_READ_EVERY
        if not reuse:
            self._full_read_at = mono
        skipped: list[str] = []
        with self._layout.dirs("nodes", "status", "claims") as d:
            members = self._read_members(d["nodes"], d["status"], reuse, skipped)
            claims = self._read_claims(d["claims"], reuse, skipped)
        return members, claims, skipped

    def _read_members(self, nodes_fd: int, status_fd: int, reuse: bool, skipped: list[str]) -> dict[str, Heartbeat]:
        names = scan(nodes_fd)  # name -> is a symlink (node names may contain dots)
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
                beat = read_json(nodes_fd, name)
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
        for group, link in scan(claims_fd).items():
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
                fd = os.open(name, FILE, dir_fd=status_fd)
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
