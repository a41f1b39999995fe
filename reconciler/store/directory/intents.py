"""The directory store's operator intents (published.Intent): the files intents/KEY@ID.

KEY is Intent.key with "/" written as "~" (neither can be in a name), ID the intent's random
id, so that every instance of a key has a name of its own: a delete unlinks exactly the
instance it read (unlink(2) of one name: atomic, one winner), never one put since. A put
creates its instance exclusively (a temporary file, fsynced, link(2)ed to its name: also on
NFS), then removes the instances it replaces. A reader that meets two instances of one key
(a put between those two steps, or a putter that died there) takes the newer (created, id),
and a delete also removes the instances older than the one it deletes, so a superseded one
never comes back. Blocking: DirectoryStore runs it in a thread. A store set up by an older
version has no intents/ until an agent of this one sets it up: it reads as none, and a put
is refused with that reason.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid

from reconciler import published
from reconciler.published import Intent
from reconciler.store import StoreError, records
from reconciler.store.directory.layout import FILE, NEW, Layout

SUB = "intents"
INTENT_MAX = 1 << 14  # bytes: a larger file is skipped, not read


def file_name(intent: Intent) -> str:
    return f"{intent.key.replace('/', '~')}@{intent.id}"


class Intents:
    def __init__(self, layout: Layout, skips: records.Skips):
        self._layout = layout
        self._skips = skips

    def _open(self) -> int | None:
        """intents/'s descriptor, or None where the store has none yet (see the docstring)."""
        root = self._layout.open_root()
        try:
            try:
                os.stat(SUB, dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                return None
            return self._layout.open_sub(root, SUB)  # (refuses a symlink or anything but a directory)
        finally:
            os.close(root)

    def read(self, skipped: list[str]) -> dict[str, Intent]:
        """Every intent by key (one listing, one small file each); malformed ones skipped."""
        fd = self._open()
        if fd is None:
            return {}
        try:
            return self._newest(self._read_all(fd, skipped))
        finally:
            os.close(fd)

    def _read_all(self, fd: int, skipped: list[str] | None) -> list[tuple[str, Intent]]:
        """(file name, intent) of every well-formed instance; the others skipped (counted and
        listed in `skipped`; None: a delete's look, which counts nothing)."""
        skip = self._skips.skip if skipped is not None else lambda entry, why, found: None
        found = []
        for name in os.listdir(fd):
            if name.startswith("."):
                continue  # a writer's temporary name
            entry = f"{SUB}/{name}"
            try:
                text = self._read_file(fd, name)
            except FileNotFoundError:
                continue  # deleted since the listing
            if text is None:
                skip(entry, "not a regular file (or too large)", skipped)
                continue
            try:
                intent = published.intent_loads(text)
            except published.StatusError as exc:
                skip(entry, str(exc)[:200], skipped)
                continue
            if file_name(intent) != name:
                skip(entry, f"holds the intent {intent.key}@{intent.id}, not the one its name says", skipped)
                continue
            found.append((name, intent))
        return found

    @staticmethod
    def _read_file(fd: int, name: str) -> bytes | None:
        try:
            f = os.open(name, FILE, dir_fd=fd)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            return None  # a symlink (ELOOP) or worse
        with open(f, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            raw = fh.read(INTENT_MAX + 1)
        return None if len(raw) > INTENT_MAX else raw

    @staticmethod
    def _newest(found: list[tuple[str, Intent]]) -> dict[str, Intent]:
        out: dict[str, Intent] = {}
        for _, intent in found:
            have = out.get(intent.key)
            if have is None or (have.created, have.id) < (intent.created, intent.id):
                out[intent.key] = intent
        return out

    def put(self, intent: Intent) -> Intent:
        """Store.intent_put."""
        fd = self._open()
        if fd is None:
            raise StoreError(f"{self._layout.url}: the store has no {SUB}/ yet: start an agent of this version on it first")
        try:
            name = file_name(intent)
            tmp = f".{name}.{uuid.uuid4().hex}.tmp"
            f = os.open(tmp, NEW, 0o644, dir_fd=fd)
            try:
                with open(f, "w") as fh:
                    fh.write(published.intent_dumps(intent))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
            prefix = name.partition("@")[0] + "@"
            for other in os.listdir(fd):
                if other.startswith(prefix) and other != name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(other, dir_fd=fd)
            os.fsync(fd)
            return intent
        finally:
            os.close(fd)

    def delete(self, key: str, token: str) -> bool:
        """Store.intent_delete (and the older instances of `key` it supersedes)."""
        fd = self._open()
        if fd is None:
            return False
        try:
            prefix = key.replace("/", "~") + "@"
            mine = [(n, i) for n, i in self._read_all(fd, None) if n.startswith(prefix)]
            target = next((i for n, i in mine if i.id == token), None)
            if target is None:
                return False
            for name, other in mine:
                if (other.created, other.id) < (target.created, target.id):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
            try:
                os.unlink(file_name(target), dir_fd=fd)
            except FileNotFoundError:
                return False  # another delete won
            return True
        finally:
            os.close(fd)
