"""When each line of an entry's log was written, to within a tick: an index of the log's
growth, kept by the agent beside the log and read by `reconcile logs`.

Why not stamp each line as it passes: that needs a reader of the child's output, and every
place for one breaks something the node's safety rests on. The agent reading a pipe dies
with the agent, and the entry's next write then gets SIGPIPE (an entry outlives its agent:
an agent restart adopts its processes, `run --once` leaves them running). A stamping process
per entry inside the entry's cgroup makes the cgroup hold a process that is not the entry's,
and liveness, adoption and the `once` leader hand-over (act/adoption.py choose_leader) would
count or follow it; outside it, it is a process the keeper, the tree and adoption do not
know, costs a process per entry, and its death kills the entry by SIGPIPE. So the child still
writes straight to the file, and the time is recorded beside it, not in it.

The index: STATE/NODE/logs/.GROUP.TAG.log.times, one line `SIZE TIME` (bytes, wall-clock
seconds) appended when the agent sees the log longer than at its last look (at most once a
tick, with the rotation's look: act/logs.py Rotator, on its thread). A line whose end is at
offset E was written no later than the first entry with SIZE >= E, and after the entry
before it: that time is its stamp; a line after the last entry gets the file's mtime (when
it was last written). Lines written while no agent ran are stamped with the next agent's
first look (or the mtime): a stamp is always an upper bound, at most a tick late while an
agent runs. A rotation moves the index with the copy (.GROUP.TAG.log.1.times), so it is
bounded as the logs are; an index longer than MAX_ENTRIES (a slow writer that never fills
its log) keeps every other entry, so older lines get coarser stamps, never wrong ones.
Nothing about the child, its cgroup, adoption or the keeper changes.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Mapping

MAX_ENTRIES = 4096  # per index (about 100 KB): then every other entry is dropped
_READ_AT_MOST = 64 * MAX_ENTRIES  # (an index is never longer; whatever else took its name is not read for ever)


def index_path(log: Path) -> Path:
    """The index of a log segment (GROUP.TAG.log or GROUP.TAG.log.N): a dot file, so that
    neither the rotation (GROUP.TAG.log) nor the segments (GROUP.TAG.log.N) take it for a log."""
    return log.with_name(f".{log.name}.times")


class Stamps:
    """The writer: what the agent last recorded of each live log (its size, the entries in
    its index), read back from the index the first time a log is seen (after a restart)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._last: dict[str, tuple[int, int]] = {}  # log name -> (size recorded last, entries)

    def note(self, sizes: Mapping[str, int], now: float) -> None:
        """Record the logs (of name -> size) that grew since the last look, at `now`."""
        for name, size in sizes.items():
            if not name.endswith(".log"):
                continue
            index = index_path(self.directory / name)
            last, entries = self._last.get(name) or _recorded(index)
            if size == last:
                continue
            if size < last:  # truncated (a rotation moved its index away, or someone else): start again
                last, entries = 0, 0
                _unlink(index)
            if size > 0:
                try:
                    _write(index, f"{size} {now:.3f}\n", how=os.O_APPEND)
                except OSError:
                    # A line cut short (a full disk) could be read as a wrong size: start
                    # again, so the lines before get a later stamp, never an early one.
                    self._last.pop(name, None)
                    _unlink(index)
                    raise
                entries += 1
                if entries > MAX_ENTRIES:
                    entries = _thin(index)
            self._last[name] = (size, entries)

    def forget(self, name: str) -> None:
        """The log is being rotated: read its index afresh next time."""
        self._last.pop(name, None)


def _recorded(index: Path) -> tuple[int, int]:
    """The last size an index records and its number of entries ((0, 0): none)."""
    entries = read(index)
    return (entries[-1][0] if entries else 0), len(entries)


def _thin(index: Path) -> int:
    entries = read(index)
    kept = entries[::-2][::-1]  # every other one, counted from the newest: it bounds the latest lines
    tmp = index.with_name(index.name + ".tmp")
    _write(tmp, "".join(f"{size} {t:.3f}\n" for size, t in kept), how=os.O_TRUNC)
    os.replace(tmp, index)
    return len(kept)


def _write(path: Path, text: str, *, how: int) -> None:
    """One write(2) (an append is never interleaved), never through a symlink: the agent runs
    as root in a directory whose files the entries' users may read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | how, 0o640)
    try:
        data = text.encode("ascii")
        if os.write(fd, data) != len(data):
            raise OSError(28, "No space left on device")  # a short write: a full disk
    finally:
        os.close(fd)


def read(index: Path) -> list[tuple[int, float]]:
    """An index's entries ([] if it is missing or cannot be read: the lines take their
    segment's mtime); a damaged line is skipped, and so is a last line without its newline
    (being written as we read)."""
    try:
        fd = os.open(index, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb") as fh:
            text = fh.read(_READ_AT_MOST).decode("ascii", "replace")
    except OSError:
        return []
    out = []
    for line in text.split("\n")[:-1]:
        try:
            size, t = line.split()
            out.append((int(size), float(t)))
        except ValueError:
            continue
    return out


def times(ends: list[int], entries: list[tuple[int, float]], *, mtime: float) -> list[float]:
    """The stamp of each line (by the offset its end is at, in order): pure."""
    sizes = [size for size, _ in entries]
    out = []
    for end in ends:
        i = bisect.bisect_left(sizes, end)
        out.append(min(entries[i][1], mtime) if i < len(entries) else mtime)
    return out


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # (a read-only directory: nothing to be done about it here)
