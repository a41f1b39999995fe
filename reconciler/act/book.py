"""The resource book: what this node remembers about its mount and address entries beyond
what the kernel shows (which of them it applied, failures and retry times), and the
listing of them it keeps in STATE/NODE/resources.json for the keeper.

The executor writes the book as it applies and removes entries; the observer reads it and
hands back what the ownership rule (reconciler/decide/ownership.py) concluded through
`note_observed`. Nobody else changes a record.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import attrs

from reconciler import spec as specmod
from reconciler.decide import ownership

log = logging.getLogger("reconciler.act")


@attrs.define
class ResourceRecord:
    """What we remember about a mount or address entry beyond what the kernel shows."""

    owned: bool = False  # we applied it: only what we applied is ever removed
    failures: int = 0
    retry_at: float | None = None
    message: str = ""
    since: float = 0.0  # when it became ours (kept across restores: the stop order uses it)
    entry: specmod.Entry | None = None  # last known definition: a removed entry is still removable
    applying: bool = False  # a start is in flight: listed for the keeper before it takes effect

    def held(self) -> ownership.Held:
        return ownership.Held(owned=self.owned, applying=self.applying, since=self.since, retry_at=self.retry_at,
                              message=self.message)


class ResourceBook:
    def __init__(self, *, node: str, resource_file: str | os.PathLike | None = None):
        self.node = node
        self.records: dict[tuple[str, str], ResourceRecord] = {}
        # STATE/NODE/resources.json: the mounts and addresses this node applied, for the
        # keeper to remove when the lease lapses while the agent cannot (see keeper.py).
        self.resource_file = Path(resource_file) if resource_file is not None else None
        self._doc: str | None = None
        self._error = ""  # the last write error, logged once

    # --- records ----------------------------------------------------------------------------

    def record(self, group: str, entry: specmod.Entry) -> ResourceRecord:
        """The entry's record, a fresh one if there was none."""
        return self.records.setdefault((group, entry.tag), ResourceRecord(entry=entry))

    def entry(self, group: str, tag: str) -> specmod.Entry | None:
        """The last known definition of an entry (one removed from the spec is still removable)."""
        rec = self.records.get((group, tag))
        return rec.entry if rec is not None else None

    def held(self, group: str, tag: str) -> ownership.Held:
        rec = self.records.get((group, tag))
        return rec.held() if rec is not None else ownership.NOTHING_HELD

    def owned_entries(self) -> Iterator[tuple[str, specmod.Entry]]:
        """(group, entry) of every entry this node applied and has not removed."""
        for (group, _tag), rec in self.records.items():
            if rec.owned and rec.entry is not None:
                yield group, rec.entry

    def note_observed(self, group: str, entry: specmod.Entry, decision: ownership.Decision) -> None:
        """Keep what observing the entry concluded (decide/ownership.py): whether it is ours,
        and since when."""
        rec = self.record(group, entry)
        rec.entry, rec.owned, rec.since = entry, decision.owned, decision.since

    def forget(self, group: str, tag: str) -> None:
        self.records.pop((group, tag), None)

    # --- the keeper's listing ------------------------------------------------------------------

    def save(self, *, strict: bool = False) -> None:
        """Write the resources this node owns (or is applying) for the keeper, if changed.
        A write that fails is logged (once per error) and tried again at the next call;
        with `strict` it raises the OSError too (the write-ahead of a start: see
        Executor._resource)."""
        if self.resource_file is None:
            return
        items: list[dict[str, object]] = []
        for (group, tag), rec in self.records.items():
            e = rec.entry
            if e is None or not (rec.owned or rec.applying):
                continue
            if e.mount is not None:
                m = e.mount
                items.append({"group": group, "tag": tag, "kind": "mount", "target": m.target, "source": m.source,
                              "fstype": m.fstype, "options": m.options})
            elif e.address is not None:
                items.append({"group": group, "tag": tag, "kind": "address", "ip": e.address.ip,
                              "interface": e.address.interface})
            if rec.applying:
                items[-1]["applying"] = True  # changes the file: a keeper that already released looks again
        doc = json.dumps({"node": self.node, "resources": items}, sort_keys=True)
        if doc == self._doc:
            return
        try:
            replace_file(self.resource_file, doc + "\n")
        except OSError as exc:
            error = f"cannot write {self.resource_file}: {exc.strerror or exc}"
            if error != self._error:
                self._error = error
                log.error("%s (what it lists now is not applied; removed entries stay listed)", error)
            if strict:
                raise
            return
        self._doc = doc
        if self._error:
            log.warning("%s written again", self.resource_file)
            self._error = ""


def replace_file(path: Path, text: str) -> None:
    """Write `path` as a whole for the keeper: a temporary file beside it (never followed
    through a link), renamed over it; OSError if that fails (a short write included), and
    then no partial copy is left to keep the space a retry needs."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            data = text.encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def listed(resource_file: str | os.PathLike) -> dict[tuple[str, str], ownership.Held]:
    """What a running agent's book says it holds, read back from its resources.json
    (`--dry-run`, which has no book of its own): listed = owned, or being applied."""
    try:
        doc = json.loads(Path(resource_file).read_text())
        items = doc.get("resources", [])
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for it in items if isinstance(items, list) else ():
        if isinstance(it, dict) and isinstance(it.get("group"), str) and isinstance(it.get("tag"), str):
            applying = it.get("applying") is True
            out[(it["group"], it["tag"])] = ownership.Held(owned=not applying, applying=applying)
    return out
