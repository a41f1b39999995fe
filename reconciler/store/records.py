"""The one place where values read from a store are checked before anything uses them.

Every backend parses heartbeats, claims and statuses (reconciler/published.py) through these
functions: a value that does not parse, or that names a node or group that is not a valid
name (model.valid_name: never empty, never starting with "-", no control characters), is
*skipped*: the read goes
on without it, the entry is logged once (not at every read, ten times a second) and counted
(Store.skipped_total, the metric reconciler_store_entries_skipped_total), and the Snapshot
lists it (Snapshot.skipped). A malformed entry never fails a read, never raises, and is
never read as a default (a counter as 0, a claim as absent from a file that is there).
"""

from __future__ import annotations

import logging
import math
import re

from reconciler import published
from reconciler.model import valid_name  # noqa: F401 (records.valid_name: used by the stores)
from reconciler.published import NodeStatus

log = logging.getLogger("reconciler.store")

INSTANCE_RE = re.compile(r"^[0-9a-f]{1,32}$")  # identity.new_instance(): 16 hex digits
_COUNTER_RE = re.compile(r"^[0-9]{1,19}$")
_DIGEST_RE = re.compile(r"^[0-9A-Za-z]{0,64}$")
WARNED_MAX = 4096  # distinct (entry, reason) pairs remembered as already logged


class Skips:
    """Counts skipped entries and logs each (entry, reason) once."""

    def __init__(self, url: str):
        self.url = url
        self.total = 0
        self._warned: set[tuple[str, str]] = set()

    def skip(self, entry: str, why: str, found: list[str] | None = None) -> None:
        """Count one skip of `entry` (and list it in `found`); log it if not logged yet."""
        self.total += 1
        if found is not None:
            found.append(entry)
        self.warn(entry, why)

    def warn(self, entry: str, why: str) -> None:
        """Log that `entry` is skipped, once per (entry, why)."""
        key = (entry, why)
        if key in self._warned:
            return
        if len(self._warned) >= WARNED_MAX:
            self._warned.clear()
        self._warned.add(key)
        log.warning("%s: skipping %s: %s", self.url, entry, why)


def parse_counter(text: object) -> int | None:
    """A heartbeat counter: decimal digits only (no sign, no spaces), else None."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        return text if text >= 0 else None
    if isinstance(text, str) and _COUNTER_RE.match(text):
        return int(text)
    return None


def parse_wall(value: object) -> float | None | bool:
    """A heartbeat's wall time: a finite number, None if absent; False if malformed."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False  # (float() of anything else is a TypeError: malformed all the same)
    try:
        wall = float(value)
    except (TypeError, ValueError):
        return False
    return wall if math.isfinite(wall) else False


def beat_fields(counter: object, wall: object, digest: object, instance: object) -> tuple[int, float | None, str, str] | str:
    """(counter, wall, digest, instance) of a heartbeat record, or why it is malformed."""
    c = parse_counter(counter)
    if c is None:
        return f"counter {str(counter)[:40]!r} is not a number"
    w = parse_wall(wall)
    if w is False:
        return f"wall time {str(wall)[:40]!r} is not a number"
    digest = "" if digest is None else digest
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        return f"digest {str(digest)[:40]!r} is malformed"
    instance = "" if instance is None else instance
    if not isinstance(instance, str) or (instance and not INSTANCE_RE.match(instance)):
        return f"instance {str(instance)[:40]!r} is malformed"
    return c, w, digest, instance


def parse_beat_target(target: str) -> tuple[int, float | None, str, str] | str:
    """The directory store's heartbeat symlink target "COUNTER:WALL:DIGEST[:INSTANCE]"."""
    parts = target.split(":")
    if len(parts) not in (3, 4):
        return f"heartbeat {target[:60]!r} is not COUNTER:WALL:DIGEST[:INSTANCE]"
    return beat_fields(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else "")


def parse_claim(value: str) -> tuple[str, int] | str:
    """A claim's value "NODE:GENERATION" -> (NODE, GENERATION), or why it is malformed."""
    node, _, gen = value.rpartition(":")
    if not valid_name(node):
        return f"claim {value[:60]!r} names no valid node"
    if not _COUNTER_RE.match(gen) or int(gen) < 1:
        return f"claim {value[:60]!r} has no valid generation"
    return node, int(gen)


def parse_status(raw: bytes | str) -> NodeStatus | str:
    """A node's status value (published.NodeStatus as JSON), or why it is malformed (one
    line naming the field path: `status.groups.web.entries.db.state: ...`)."""
    try:
        return published.loads(raw)
    except published.StatusError as exc:
        return str(exc)[:200]


def status_text(status: NodeStatus) -> str:
    """The value a store keeps for `status` (parse_status reads it back)."""
    return published.dumps(status)


def check_name(name: str, kind: str) -> str:
    """"" if `name` (a key or file name under nodes/, status/ or claims/) is valid, else why not."""
    return "" if valid_name(name) else f"{kind} name {name[:60]!r} is not a valid name"
