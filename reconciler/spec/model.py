"""The spec: frozen attrs value classes, and their small value types (durations, signals).

A spec is one TOML file or a directory of them. Groups from several files are
merged; a group defined twice is an error naming both files. Every error is a
`SpecError` whose text is one line: `FILE: FIELD.PATH: what is wrong`.

(About 400 lines: every value class of the spec and the ranges of its fields, in one place.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
from typing import Any

import attrs

from reconciler.fielderrors import FieldError
from reconciler.model import NAME_RE as NAME_RE  # spec.NAME_RE: the one name pattern, shared with the store's checks

MODES = ("wait", "once", "respawn", "test", "off")
FOREGROUND = frozenset({"wait", "test"})
STOP = "stop"
DEFAULT_SPEC_PATH = "/etc/reconciler/"
# The keys of [cluster] that are each node's own (reconciler/spec/local.py): needed before the
# store can be reached, or different from node to node. The rest of a spec is the cluster's.
LOCAL_KEYS = (
    "store",
    "state_dir",
    "membership",
    "etcd_prefix",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password",
    "etcd_password_file",
    "peer_listen",
    "peer_advertise",
    "peer_secret_file",
)


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
        super().__init__(redact_url(": ".join([*parts, message])).translate(_ONE_LINE))


_FieldError = FieldError  # raised inside structure hooks; the converter adds the field path


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: refused
# in every string of a spec. A NUL cannot reach execve at all, and the others hide what a
# command, a path or a name really is from the operator reading the spec or a log line.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_char(value: str) -> str | None:
    """The first control character in `value`, escaped (`\\x00`, `\\n`), or None."""
    m = _CONTROL_RE.search(value)
    if m is None:
        return None
    c = ord(m.group(0))
    return _ONE_LINE[c] if c in _ONE_LINE else f"\\x{c:02x}"


def no_control(value: str, *, sub: str = "") -> str:
    bad = control_char(value)
    if bad is not None:
        raise _FieldError(f"contains the control character {bad}: refused", sub=sub)
    return value


# URLs with credentials: `etcd://user:password@host` is shown as `etcd://user:***@host`. The
# password runs to the last "@" of the word, so one containing "@" or "/" is hidden whole
# (an odd URL without a password may lose a little more than its password: that is safe).
_CREDENTIALS_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>\S*)@")


def redact_url(text: str) -> str:
    """`text` (a URL, or a message quoting URLs) with the password of each URL replaced by ***."""
    return _CREDENTIALS_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


# --- small value types -------------------------------------------------------------

_DURATION_RE = re.compile(r"^ *([0-9]+(?:\.[0-9]+)?) *(ms|s|m|h) *\Z")  # spaces only: \s and \d match far more
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """'250ms', '2s', '1.5m', '1h' -> seconds. Bare numbers are refused: units matter."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise _FieldError(f'must be a duration string like "250ms", "2s" or "1m", not {value!r}')
    m = _DURATION_RE.match(value)
    if not m:
        raise _FieldError(f'must be a duration like "250ms", "2s" or "1m", not {value!r}')
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not math.isfinite(seconds):  # "999…9s" (hundreds of digits) overflows to inf
        raise _FieldError(f"{value[:20]!r}... is too large")
    return seconds


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds == 0:
        return "0s"
    if seconds >= 60 and seconds == int(seconds):
        for unit, size in (("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"{int(seconds) // size}{unit}"
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
class Health:
    """A process entry's health probe: exactly one of command, tcp, http (rules.validate).

    Failures during `start_period` after a start do not count, unless a probe has passed
    since the start (then the service is up and every failure counts, as Docker does)."""

    command: tuple[str, ...] | None = None  # argv, run as the entry's user with its environment
    tcp: str | None = None  # "HOST:PORT": a connect
    http: str | None = None  # "http://HOST[:PORT]/PATH": a GET whose status is within `status`
    status: tuple[int, int] = (200, 399)  # http: the accepted status codes, both inclusive
    interval: float = 10.0
    timeout: float = 2.0  # less than interval
    failures: int = 3  # consecutive failed probes that make the entry unhealthy
    start_period: float = 0.0

    @property
    def kind(self) -> str:
        return "command" if self.command is not None else "tcp" if self.tcp is not None else "http"

    @property
    def target(self) -> str:
        """What is probed, for messages."""
        if self.command is not None:
            return " ".join(self.command)
        return self.tcp if self.tcp is not None else self.http or ""


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
    health: Health | None = None  # process entries only

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
    # Failures of the group on one node (an unhealthy restart, a rapid exit, a failed start):
    # max_failures of them within failure_window make the node give the group up and be
    # banned from it for `ban` (decide/health.py). None: restart in place for ever.
    max_failures: int | None = None
    failure_window: float = 600.0
    ban: float = 1800.0
    source: str = ""  # the file that defined it (for error messages)

    def levels(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for e in self.entries:
            for lvl in e.runlevels:
                seen.setdefault(lvl, None)
        return tuple(seen)


# The documented range of each duration, in seconds: (least, most), both inclusive. Outside
# them a spec is refused (`rules.validate`), whatever the safety inequality says: a budget
# must also be one the agent can keep (`retest = "0s"` re-ran a failing test thousands of
# times a second; `clock_slack` below 0 shrank the inequality's right-hand side). docs/spec.md
# shows this table; tests/test_spec_validation.py checks the two agree.
TIMING_RANGES: dict[str, tuple[float, float]] = {
    "heartbeat": (0.01, 10.0),
    "lease": (0.02, 3600.0),
    "demote_margin": (0.0, 3600.0),  # and less than lease
    "dead_after": (0.05, 4 * 3600.0),  # and above Timing.minimum_dead_after() (> 50ms at the least ends)
    "clock_slack": (0.0, 0.1),  # a plain number, not a duration
    "kill_slack": (0.02, 10.0),  # the keeper polls every 10 ms between kills
    "retest": (1.0, 3600.0),
    "tick": (0.05, 60.0),
}
ENTRY_RANGES: dict[str, tuple[float, float]] = {
    "stop_timeout": (0.01, 3600.0),
    "timeout": (0.01, 86400.0),
    "min_uptime": (0.0, 3600.0),  # 0: every exit respawns at once (tests/bench/respawn.py)
}
GROUP_RANGES: dict[str, tuple[float, float]] = {
    "fence_timeout": (0.1, 3600.0),
    "failure_window": (1.0, 7 * 86400.0),
    "ban": (1.0, 7 * 86400.0),
}
HEALTH_RANGES: dict[str, tuple[float, float]] = {
    "interval": (0.05, 86400.0),
    "timeout": (0.01, 3600.0),  # and less than interval
    "start_period": (0.0, 86400.0),
}


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
    etcd_password: str | None = attrs.field(default=None, repr=False)  # never in a repr, a log or the digest
    etcd_password_file: str | None = None  # the password, read at load (mode 0600 or 0400)
    stop_all: bool = False  # this spec may remove every group that runs (an empty spec): see loader.check_replacement
    # The failsafe (issue 17, reconciler/cluster/failsafe.py): off unless both are set.
    peer_listen: str | None = None  # "IP:PORT" of this node's peer endpoint (UDP)
    peer_advertise: str | None = None  # "HOST:PORT" peers send to (default: peer_listen; required for 0.0.0.0 / [::])
    peer_secret_file: str | None = None  # the cluster secret (mode 0600 or 0400), read at agent start


@attrs.frozen
class Spec:
    cluster: Cluster
    groups: dict[str, Group]  # treated as immutable; insertion order = file order
    base: str = "."  # directory that relative paths in [cluster] resolve against
    files: tuple[str, ...] = ()  # the spec files (never the node file)
    node_file: str | None = None  # the node file applied, if any (reconciler/spec/local.py)

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
        """The store's address, credentials included: for opening the store, never to print
        (`shown_store_url` is for that)."""
        s = self.cluster.store
        if s.startswith("dir:"):
            return "dir:" + self.path(s[4:])
        return s

    @property
    def shown_store_url(self) -> str:
        return redact_url(self.store_url)

    @property
    def state_dir(self) -> str:
        return self.path(self.cluster.state_dir)

    def digest(self) -> str:
        return digest(self)


def digest(spec: Spec) -> str:
    """A short stable digest of what the spec means (not of its formatting), for the cluster:
    the local keys (LOCAL_KEYS: the store, the state directory, credentials) are left out, so
    nodes that reach the store differently but run the same groups publish the same digest.
    No secret can reach it either (a dictionary attack on a 12-digit digest of a known spec
    would recover a password)."""
    c = {k: v for k, v in attrs.asdict(spec.cluster).items() if k not in LOCAL_KEYS}
    if not c["stop_all"]:  # unset: the digest older versions publish
        del c["stop_all"]
    data = {"cluster": c, "groups": {n: attrs.asdict(g) for n, g in spec.groups.items()}}
    for g in data["groups"].values():
        g.pop("source", None)
        # Unset health fields (issue 16) are left out: a spec without them keeps the digest
        # older versions publish for it, so mixed versions agree during an upgrade.
        for fld, default in (("max_failures", None), ("failure_window", 600.0), ("ban", 1800.0)):
            if g.get(fld) == default:
                g.pop(fld, None)
        for e in g["entries"]:
            if e.get("health") is None:
                e.pop("health", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
