"""The directory store's claim protocol.

claims/GROUP is a symlink "NODE:GENERATION" that symlink(2) creates only if absent, atomically,
on local filesystems and NFS alike: one winner. Ending a claim instance (release by its owner,
break by a survivor) first wins the exclusive marker ends/GROUP.GENERATION: for any one
instance only one caller gets past that point, so two survivors can never both remove it, and
a stale owner can never remove a successor's claim (the successor is a different instance
with a larger generation). generations/GROUP keeps the last ended generation, so the next
claim's number is larger; a corrupt one is an error, never read as 0. Blocking:
DirectoryStore runs it in a thread.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid

from reconciler.store import Claim, StoreError, records
from reconciler.store.directory.layout import FILE, NEW, Layout, replace

STUCK_AFTER = 10.0  # seconds a half-finished claim removal may stand before it is completed


class Claims:
    def __init__(self, layout: Layout):
        self._layout = layout
        self._url = layout.url

    def claim(self, group: str, node: str) -> Claim | None:
        """Store.claim."""
        if not (records.valid_name(group) and records.valid_name(node)):
            raise StoreError(f"{self._url}: cannot claim {group!r} for {node!r}: not valid names")
        with self._layout.dirs("claims", "generations") as d:
            if self._read_claim(d["claims"], group) is not None:
                return None
            gen = self._read_generation(d["generations"], group) + 1
            try:
                os.symlink(f"{node}:{gen}", group, dir_fd=d["claims"])
            except FileExistsError:
                return None
        return Claim(group=group, node=node, generation=gen, token=str(gen))

    def end(self, claim: Claim) -> bool:
        """Store.release and Store.break_claim: True if this call ended the instance."""
        if not (records.valid_name(claim.group) and records.valid_name(claim.node)):
            return False
        with self._layout.dirs("claims", "ends", "generations") as d:
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

    def hand_over(self, claim: Claim, node: str) -> Claim | None:
        """Store.hand_over: like end(), the exclusive marker ends/GROUP.GENERATION first (one
        winner among enders and hand-overs of this instance); then the generation counter
        moves on and the new claim's symlink is renamed over the old one: claims/GROUP never
        stops existing, so no claim() can slip in between."""
        if not (records.valid_name(claim.group) and records.valid_name(claim.node) and records.valid_name(node)):
            return None
        with self._layout.dirs("claims", "ends", "generations") as d:
            if not self._is_current(d, claim):
                return None
            marker = f"{claim.group}.{claim.generation}"
            try:
                os.symlink(claim.node, marker, dir_fd=d["ends"])
            except FileExistsError:
                return None
            if not self._is_current(d, claim):
                return None
            gen = claim.generation + 1
            replace(d["generations"], claim.group, str(gen))  # never behind a claim that exists
            tmp = f".{claim.group}.{uuid.uuid4().hex}.tmp"
            os.symlink(f"{node}:{gen}", tmp, dir_fd=d["claims"])
            os.replace(tmp, claim.group, src_dir_fd=d["claims"], dst_dir_fd=d["claims"])
            self._prune(d["ends"], claim.group, claim.generation)
            return Claim(group=claim.group, node=node, generation=gen, token=str(gen))

    def _read_claim(self, claims_fd: int, group: str) -> Claim | None:
        """One claim, for claiming and ending: a malformed one is an error here (StoreError),
        not absent: nobody may claim over it or end it."""
        try:
            target = os.readlink(group, dir_fd=claims_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StoreError(f"{self._url}: claims/{group} is not a symlink: refused") from None
            raise
        parsed = records.parse_claim(target)
        if isinstance(parsed, str):
            raise StoreError(f"{self._url}: claims/{group}: {parsed}")
        return Claim(group=group, node=parsed[0], generation=parsed[1], token=str(parsed[1]))

    def _read_generation(self, gens_fd: int, group: str) -> int:
        """The last ended generation of `group` (0: none yet). A counter that is not a number,
        not a regular file or a symlink is an error: read as 0 it would let the fencing
        token go backwards."""
        try:
            fd = os.open(group, FILE, dir_fd=gens_fd)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StoreError(f"{self._url}: generations/{group} is a symlink: refused (repair it by hand)") from None
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise StoreError(f"{self._url}: generations/{group} is not a regular file: refused (repair it by hand)")
            text = fh.read(64).decode("ascii", "replace").strip()
        if not (text.isascii() and text.isdigit()):
            raise StoreError(
                f"{self._url}: generations/{group} holds {text[:20]!r}, not a generation: claims of {group} are refused "
                "until it is repaired (a generation must never go backwards)"
            )
        return int(text)

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
            os.close(os.open(probe, NEW, 0o644, dir_fd=ends))
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
            replace(gens, claim.group, str(claim.generation))
        try:
            os.unlink(claim.group, dir_fd=d["claims"])
        except FileNotFoundError:
            pass

    @staticmethod
    def _prune(ends: int, group: str, generation: int) -> None:
        # End markers older than a few generations can never be contended again.
        for name in (f"{group}.{generation - 8}", f"{group}.{generation - 8}.complete"):
            try:
                os.unlink(name, dir_fd=ends)
            except OSError:
                pass
