"""The keeper's lease file, STATE/NODE/lease, as the agent writes it.

The keeper (reconciler/keeper.py) acts on this file alone: a renewal it does not show is no
renewal. So a write either lands in the file at the path, or reports failure (and the agent
then does not extend its lease: it demotes by the deadline the keeper enforces).

The first write of this process creates the file (a new file renamed into place: atomic);
later ones overwrite it in place through the open descriptor, one pwrite(2) per renewal
instead of a create + rename (~10x cheaper), with a record of fixed length and a checksum,
so a keeper reading in the middle of a write rejects the torn record and reads again. Before
each pwrite an fstat of the descriptor and a stat of the path (about 2 us together) tell
whether the file was deleted, replaced or grown behind the agent's back: then a new one is
created, since writes to a file the path no longer names would reach no keeper.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from reconciler.host import leaserecord

log = logging.getLogger("reconciler.agent")
REPLACED_LOG_EVERY = 60.0  # seconds: at most one "lease file was replaced" line this often


class LeaseFile:
    """The lease file at `path`; `write` under the agent's lease lock (one writer)."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None  # the file, once this process has written it
        self.error = ""  # the last write error, logged once ("": the last write worked)
        self._replaced_logged_at = float("-inf")

    def write(self, until: float, *, lease_until: float) -> bool:
        """Write the record for `until` (leaserecord.RELEASED: the clean-shutdown record); True
        once the file at the path says so. `lease_until`, the lease as it stands, is only
        for the log line of a failure (when the node will have stopped its groups)."""
        record = leaserecord.lease_record(until)
        try:
            if self.fd is not None and not _same_file(self.fd, self.path, len(record)):
                now = time.monotonic()
                if now - self._replaced_logged_at >= REPLACED_LOG_EVERY:  # (a fight: not every 100 ms)
                    self._replaced_logged_at = now
                    log.warning("lease file %s was deleted, replaced or altered: writing a new one", self.path)
                self.close()
            if self.fd is None:
                self.fd = _create(self.path, record)
            elif os.pwrite(self.fd, record, 0) != len(record):
                raise OSError(errno.EIO, "short write")
        except OSError as exc:
            error = f"cannot write the lease file {self.path}: {exc.strerror or exc}"
            if error != self.error:
                self.error = error
                log.error("%s: the lease is not renewed past what the keeper was last told (it lapses in "
                          "%.2fs at the latest); this node stops its groups by then",
                          error, max(0.0, lease_until - time.monotonic()))
            return False
        if self.error:
            log.warning("lease file %s written again", self.path)
            self.error = ""
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: str, size: int) -> bool:
    """Is the open lease file still the one at `path`, linked and of the record's size?"""
    st = os.fstat(fd)
    if st.st_nlink == 0 or st.st_size != size:
        return False
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def _create(path: str, record: bytes) -> int:
    """A new lease file holding `record`, renamed into place; its descriptor, open for
    writing (the renamed file: no race with a second rename)."""
    tmp = os.path.join(os.path.dirname(path), ".lease.tmp")
    try:
        os.unlink(tmp)  # (a leftover, or something planted there: never written through)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.write(fd, record) != len(record):
            raise OSError(errno.ENOSPC, "short write")
        os.replace(tmp, path)
    except OSError:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd
