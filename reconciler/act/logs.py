"""Entry logs rotated by size, so that a chatty service cannot fill the state directory.

Each entry's output goes to STATE/NODE/logs/GROUP.TAG.log, which the child opened with
O_APPEND (act/process.py). Once a log has reached `max_bytes`, the agent rotates it by
copy and truncate (logrotate's `copytruncate`): GROUP.TAG.log.(N-1) -> .N, ..., .1 -> .2,
a copy of the live file -> .1, then the live file truncated to zero. The child keeps its
descriptor, and O_APPEND puts its next write at the new end, so no restart and no signal
is needed (what it writes between the copy and the truncation is lost: the price of
copytruncate). An entry's logs then take at most about (keep + 1) x max_bytes, plus what it
writes in one tick.

The agent looks at most once per tick (agent/upkeep.py): one stat(2) per
log; the copies (and the index appends) are made on a thread (Rotator). Rotation never raises: a copy that fails (ENOSPC: the disk is full already) is dropped
and the live file truncated anyway: the state directory holds the lease file and the
write-ahead records the node's safety depends on, and must not fill up.

The same look records when each live log grew (act/stamps.py: an index of times beside it,
moved with each copy), so that `reconcile logs` can stamp every line.

Sizes: RECONCILER_LOG_MAX_BYTES (default 10M; a number of bytes, or with a K, M or G
suffix; 0 turns rotation off) and RECONCILER_LOG_KEEP (default 3 copies; 0 keeps none:
the live file is only truncated), read from the agent's environment at start-up.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Mapping

import attrs

from reconciler.act import stamps

log = logging.getLogger("reconciler.act")

MAX_BYTES = 10 * 1024 * 1024
KEEP = 3
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


@attrs.frozen
class Policy:
    max_bytes: int = MAX_BYTES  # a live log this large (or larger) is rotated; 0: never
    keep: int = KEEP  # rotated copies kept: GROUP.TAG.log.1 (newest) ... .keep

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Policy":
        """The policy RECONCILER_LOG_MAX_BYTES and RECONCILER_LOG_KEEP ask for; a value that
        does not parse is logged and the default used."""
        return cls(
            max_bytes=_parse(environ, "RECONCILER_LOG_MAX_BYTES", MAX_BYTES, size=True),
            keep=_parse(environ, "RECONCILER_LOG_KEEP", KEEP, size=False),
        )


def _parse(environ: Mapping[str, str], name: str, default: int, *, size: bool) -> int:
    text = environ.get(name, "").strip().upper().removesuffix("B")
    if not text:
        return default
    unit = text[-1] if size and text[-1] in _UNITS else ""
    try:
        value = int(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        value = -1
    if value < 0:
        log.error("%s=%r: not a %s; using %d", name, environ[name], "size (bytes, or 10M, 512K)" if size else "count", default)
        return default
    return value


def due(sizes: Mapping[str, int], policy: Policy) -> list[str]:
    """The logs (of name -> size) to rotate now, in name order: pure."""
    if policy.max_bytes <= 0:
        return []
    return sorted(name for name, size in sizes.items() if name.endswith(".log") and size >= policy.max_bytes)


def sizes(directory: Path) -> dict[str, int]:
    """name -> size of the regular files in `directory` ({} if it cannot be read)."""
    out = {}
    try:
        with os.scandir(directory) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False):
                        out[e.name] = e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return {}
    return out


def rotate(path: Path, policy: Policy) -> list[str]:
    """Rotate one log by copy and truncate; the problems met, as messages ([]: none).
    Never raises: whatever fails, the live file is truncated."""
    problems = []
    name = path.name
    try:
        if policy.keep > 0:
            # Oldest first, so that each step frees room for the next (a full disk). Each
            # segment's index of times (act/stamps.py) goes with it.
            _unlink(path.with_name(f"{name}.{policy.keep}"))
            _unlink(stamps.index_path(path.with_name(f"{name}.{policy.keep}")))
            for n in range(policy.keep - 1, 0, -1):
                older = path.with_name(f"{name}.{n}")
                if older.exists():
                    os.replace(older, path.with_name(f"{name}.{n + 1}"))
                _move(stamps.index_path(older), stamps.index_path(path.with_name(f"{name}.{n + 1}")))
            _copy(path, path.with_name(f"{name}.1"))
            _move(stamps.index_path(path), stamps.index_path(path.with_name(f"{name}.1")))
    except OSError as exc:
        problems.append(f"cannot keep a copy of {path}: {exc.strerror or exc}: truncated without one")
    try:
        os.truncate(path, 0)
    except FileNotFoundError:
        pass
    except OSError as exc:
        problems.append(f"cannot truncate {path}: {exc.strerror or exc}")
    try:
        _unlink(stamps.index_path(path))  # (moved with the copy, or of lines that are gone)
    except OSError:
        pass
    return problems


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        _unlink(dst)  # no index: the segment's lines take its mtime, not another segment's times


def _copy(src: Path, dst: Path) -> None:
    """src -> dst through a temporary file (a partial copy never takes dst's name, nor
    keeps the space it took)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with open(src, "rb") as fin:
            mode = os.fstat(fin.fileno()).st_mode & 0o777
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
            with open(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1024 * 1024)
        os.replace(tmp, dst)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rotate_all(directory: Path, policy: Policy, names: list[str] | None = None) -> list[str]:
    """Rotate every log in `directory` that is due (or just `names`); the logs rotated.
    Never raises (a bug here must not stop the agent): problems are logged."""
    done = []
    try:
        for name in due(sizes(directory), policy) if names is None else names:
            for problem in rotate(directory / name, policy):
                log.error("%s", problem)
            done.append(name)
    except Exception:
        log.exception("log rotation in %s failed", directory)
    return done


class Rotator:
    """The agent's rotation: a look at the sizes (one stat per log) when asked, and the
    copies, if any are due, on a thread of their own, one rotation at a time: copying 10 MiB
    logs of many entries must not hold up the event loop (self-demotion runs there)."""

    def __init__(self, directory: Path, policy: Policy):
        self.directory, self.policy = directory, policy
        self._thread: threading.Thread | None = None
        self.stamps = stamps.Stamps(directory)  # used on the thread only, one pass at a time
        self._seen: dict[str, int] = {}  # the live logs' sizes at the last pass
        self._stamp_error = False  # said once, until the times can be recorded again

    def look(self) -> None:
        """One stat per log on the loop; a pass on the thread if a log grew (its index of
        times: act/stamps.py) or is due for rotation."""
        if self._thread is not None and self._thread.is_alive():
            return  # the last pass (a rotation copying, or the times) still runs: look again next time
        try:
            now = time.time()
            seen = {name: size for name, size in sizes(self.directory).items() if name.endswith(".log")}
            names = due(seen, self.policy)
        except Exception:
            log.exception("log rotation in %s failed", self.directory)
            return
        if names or seen != self._seen:
            self._seen = {} if names else seen  # (after a rotation: look at the truncated logs again)
            self._thread = threading.Thread(target=self._pass, args=(seen,), kwargs={"now": now, "names": names},
                                             name="log-rotation", daemon=True)
            self._thread.start()

    def _pass(self, seen: dict[str, int], *, now: float, names: list[str]) -> None:
        try:
            self.stamps.note(seen, now)
            self._stamp_error = False
        except OSError as exc:  # (a full disk: the stamps are a convenience, the rotation is not)
            if not self._stamp_error:
                log.error("cannot record the log times in %s: %s (the lines get later stamps)", self.directory, exc.strerror or exc)
            self._stamp_error = True
        except Exception:
            log.exception("cannot record the log times in %s", self.directory)
        for name in names:
            self.stamps.forget(name)
        rotate_all(self.directory, self.policy, names)


# --- reading: `reconcile logs` ----------------------------------------------------------------
# The child writes its output straight to the file (no pipe through the agent: an entry
# outlives the agent that started it, across restarts and `run --once`), so a line carries no
# time of its own: it is stamped from the segment's index of times (act/stamps.py: no later
# than that, at most a tick late while an agent runs) or, past the index, the segment's mtime;
# when following, with the time it appeared (read within a poll interval).


@attrs.frozen
class Segment:
    path: Path
    mtime: float  # when it was last written
    lines: tuple[str, ...]
    times: tuple[float, ...]  # each line's stamp (act/stamps.py)


def segments(path: Path) -> list[Path]:
    """The log's segments, oldest first: GROUP.TAG.log.N ... .1, then the live file (those that exist)."""
    rotated = []
    for p in path.parent.glob(f"{path.name}.*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    out = [p for _, p in sorted(rotated, reverse=True)]
    return out + ([path] if path.exists() else [])


def tail(path: Path, n: int | None) -> list[Segment]:
    """The last `n` lines (None: all) across the segments, oldest first, grouped by segment."""
    out: list[Segment] = []
    wanted = n
    for seg in reversed(segments(path)):
        if wanted is not None and wanted <= 0:
            break
        index = stamps.read(stamps.index_path(seg))
        try:
            with open(seg, "rb") as fh:
                mtime = os.fstat(fh.fileno()).st_mtime
                lines, ends = _lines(fh.read())
        except FileNotFoundError:
            continue  # rotated away while we read: its lines are in the next older one
        times = stamps.times(ends, index, mtime=mtime)
        if wanted is not None:
            keep = max(0, len(lines) - wanted)
            lines, times = lines[keep:], times[keep:]
            wanted -= len(lines)
        if lines:
            out.append(Segment(path=seg, mtime=mtime, lines=tuple(lines), times=tuple(times)))
    return out[::-1]


def _lines(data: bytes) -> tuple[list[str], list[int]]:
    """The lines (as str.splitlines cuts them) and the offset each one's newline ends at."""
    lines, ends, end = [], [], 0
    for chunk in data.split(b"\n"):
        end += len(chunk) + 1
        for line in chunk.decode("utf-8", "replace").splitlines():
            lines.append(line)
            ends.append(min(end, len(data)))
    return lines, ends


class Follower:
    """The lines appended to a live log since the last poll, across copytruncate rotations:
    when the file has become shorter than what was read, the rest of what was read from it
    is in GROUP.TAG.log.1 (the copy taken before the truncation), and is read from there first.
    A new .1 (each rotation renames a fresh copy into place) tells a rotation too, should the
    live file have grown past the old offset again between two polls."""

    def __init__(self, path: Path):
        self.path = path
        self.copy = path.with_name(f"{path.name}.1")
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self._copy_id = _identity(self.copy)
        self._partial = b""

    def poll(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        data = b""
        copy_id = _identity(self.copy)
        if size < self.offset or copy_id != self._copy_id:  # rotated: finish the copy, then the live file from 0
            self._copy_id = copy_id
            rest = _read_from(self.copy, self.offset)
            data += rest
            copied = self.offset + len(rest)
            # The copy in place but the live file not truncated yet (the rotation is running:
            # the live file still begins as the copy does): read on from the copy's end; the
            # truncation then brings the offset back to 0.
            self.offset = copied if size >= copied and _same_start(self.path, self.copy, min(copied, 4096)) else 0
        chunk = _read_from(self.path, self.offset)
        self.offset += len(chunk)
        data = self._partial + data + chunk
        *lines, self._partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


def _same_start(a: Path, b: Path, n: int) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read(n) == fb.read(n)
    except FileNotFoundError:
        return False


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""
