"""The spec: frozen attrs value classes, and their small value types (durations, signals).

A spec is one TOML file or a directory of them. Groups from several files are
merged; a group defined twice is an error naming both files. Every error is a
`SpecError` whose text is one line: `FILE: FIELD.PATH: what is wrong`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from typing import Any

import attrs

MODES = ("wait", "once", "respawn", "test", "off")
FOREGROUND = frozenset({"wait", "test"})
STOP = "stop"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_SPEC_PATH = "/etc/reconciler/"


# Line breaks and other control characters (from quoted TOML keys or values echoed back)
# are escaped, so an error message is always exactly one line.
_ONE_LINE = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F, 0x85)} | {
    0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"
}


class SpecError(Exception):
    """A spec that cannot be used; str() is one line naming the file and field."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        self.detail = message
        parts = [p for p in (file, field) if p]
        super().__init__(": ".join([*parts, message]).translate(_ONE_LINE))


class _FieldError(ValueError):
    """Raised inside structure hooks; the converter adds the field path."""


# --- small value types -------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """'250ms', '2s', '1.5m', '1h' -> seconds. Bare numbers are refused: units matter."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise _FieldError(f'must be a duration string like "250ms", "2s" or "1m", not {value!r}')
    m = _DURATION_RE.match(value)
    if not m:
        raise _FieldError(f'must be a duration like "250ms", "2s" or "1m", not {value!r}')
    return float(m.group(1)) * _UNIT[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds * 1000:.0f}ms"


def parse_signal(value: Any) -> int:
    if isinstance(value, bool):
        raise _FieldError(f"must be a signal name like TERM or INT, not {value!r}")
    if isinstance(value, int):
        try:
            return int(signal.Signals(value))
        except ValueError:
            raise _FieldError(f"{value} is not a signal number") from None
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise _FieldError(f"must be a signal name like TERM or INT, not {value!r}")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _FieldError(
            f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


# --- the model ----------------------------------------------------------------------


@attrs.frozen
class Mount:
    source: str
    target: str
    fstype: str = ""
    options: str = ""
    mkdir: bool = True  # create the target directory when missing
    kill_users: bool = False  # stop processes holding a busy target on unmount


@attrs.frozen
class Address:
    ip: str  # CIDR, e.g. "192.0.2.10/24" or "2001:db8::10/64"
    interface: str
    announce: bool = True  # gratuitous ARP / unsolicited neighbour advertisement on add


@attrs.frozen
class Entry:
    """One inittab-like line. Exactly one of command, mount, address is set."""

    tag: str
    runlevels: tuple[str, ...]
    mode: str = "respawn"
    command: tuple[str, ...] | None = None  # argv; a TOML string becomes ("/bin/sh", "-c", s)
    mount: Mount | None = None
    address: Address | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    user: str | None = None
    group: str | None = None  # primary group (default: the user's own); needs no `user`
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout: float = 10.0
    timeout: float | None = None  # foreground (wait/test) entries: killed when running longer
    min_uptime: float = 1.0  # an exit sooner than this counts as rapid (respawn backoff)

    @property
    def kind(self) -> str:
        if self.mount is not None:
            return "mount"
        if self.address is not None:
            return "address"
        return "process"

    @property
    def foreground(self) -> bool:
        return self.kind == "process" and self.mode in FOREGROUND

    def active_at(self, level: str) -> bool:
        return level != STOP and self.mode != "off" and level in self.runlevels


@attrs.frozen
class Group:
    name: str = ""
    runlevel: str = STOP
    entries: tuple[Entry, ...] = ()
    nodes: tuple[str, ...] = ()  # preferred nodes in order; empty = any node
    failback: bool = False
    fence: tuple[str, ...] = ()  # argv; "{node}" is replaced by the dead node's name
    fence_timeout: float = 10.0
    source: str = ""  # the file that defined it (for error messages)

    def levels(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for e in self.entries:
            for lvl in e.runlevels:
                seen.setdefault(lvl, None)
        return tuple(seen)


@attrs.frozen
class Timing:
    """The cluster's timing budget; see docs/design.md for the safety argument."""

    heartbeat: float = 0.1  # renew this node's heartbeat (and lease) this often
    lease: float = 0.4  # the owner may run its groups only until last renewal + lease
    demote_margin: float = 0.1  # self-demotion starts this long before the lease ends
    dead_after: float = 0.65  # a peer whose heartbeat stood still this long is dead
    clock_slack: float = 0.02  # allowed rate difference between two nodes' clocks
    kill_slack: float = 0.05  # keeper poll + SIGKILL delivery after the lease ends
    retest: float = 10.0  # re-run eligibility tests of groups running elsewhere this often
    tick: float = 1.0  # level-triggered reconcile at least this often

    def minimum_dead_after(self) -> float:
        """dead_after must exceed the owner's whole stop deadline seen from a peer."""
        base = self.lease + self.kill_slack + self.heartbeat
        return base * (1.0 + self.clock_slack)

    def safe(self) -> bool:
        return self.dead_after > self.minimum_dead_after()

    def worst_failover(self) -> float:
        """Worst case from the owner's death to the takeover decision (before fence/start)."""
        return self.dead_after + self.heartbeat


@attrs.frozen
class Cluster:
    name: str = "reconciler"
    store: str = "dir:.reconciler/store"
    state_dir: str = ".reconciler/state"
    membership: str = "store"  # or "hpc:/proc/hpc"
    timing: Timing = Timing()
    etcd_prefix: str = "/reconciler"
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None


@attrs.frozen
class Spec:
    cluster: Cluster
    groups: dict[str, Group]  # treated as immutable; insertion order = file order
    base: str = "."  # directory that relative paths in [cluster] resolve against
    files: tuple[str, ...] = ()

    def entry(self, group: str, tag: str) -> Entry | None:
        g = self.groups.get(group)
        if g is None:
            return None
        for e in g.entries:
            if e.tag == tag:
                return e
        return None

    def path(self, value: str) -> str:
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(self.base, value))

    @property
    def store_url(self) -> str:
        s = self.cluster.store
        if s.startswith("dir:"):
            return "dir:" + self.path(s[4:])
        return s

    @property
    def state_dir(self) -> str:
        return self.path(self.cluster.state_dir)

    def digest(self) -> str:
        return digest(self)


def digest(spec: Spec) -> str:
    """A short stable digest of what the spec means (not of its formatting)."""
    data = {"cluster": attrs.asdict(spec.cluster), "groups": {n: attrs.asdict(g) for n, g in spec.groups.items()}}
    for g in data["groups"].values():
        g.pop("source", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load(path: str | os.PathLike) -> Spec:
    """Load and validate a spec file or directory; raise SpecError (one line) on any problem.

    The converter and the validation rules live in `reconciler.loader`.
    """
    from reconciler import loader

    return loader.load(path)
