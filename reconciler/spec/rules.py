"""The spec's cross-field rules: what a type cannot express (ranges, the timing's safety
inequality, runlevels that some entry mentions, unique tags, a fence hook that is told the
dead node). `loader.load` applies them to every spec it builds; each failure is a one-line
SpecError naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Callable

import ipaddress
import re
import urllib.parse

from reconciler.spec.model import (
    ENTRY_RANGES,
    GROUP_RANGES,
    HEALTH_RANGES,
    MODES,
    STOP,
    TIMING_RANGES,
    Cluster,
    Entry,
    Group,
    Health,
    Spec,
    SpecError,
    _FieldError,
    _name,
    control_char,
    format_duration,
)


def validate(spec: Spec, cluster_file: str) -> None:
    """Cross-field rules that a type cannot express."""
    t = spec.cluster.timing
    for fld, (least, most) in TIMING_RANGES.items():
        _in_range(getattr(t, fld), least, most, file=cluster_file, field=f"cluster.timing.{fld}", plain=fld == "clock_slack")
    if not 0 <= t.demote_margin < t.lease:
        raise SpecError("must be at least 0 and less than lease", file=cluster_file, field="cluster.timing.demote_margin")
    if t.heartbeat * 2 > t.lease:
        raise SpecError("must be at most half of lease, so one lost renewal is survived", file=cluster_file, field="cluster.timing.heartbeat")
    if not t.safe():
        raise SpecError(
            f"{format_duration(t.dead_after)} is unsafe: a peer could take over before a paused owner has stopped;"
            f" it must exceed (lease + kill_slack + heartbeat) x (1 + clock_slack) = {t.minimum_dead_after() * 1000:.0f}ms",
            file=cluster_file,
            field="cluster.timing.dead_after",
        )
    m = spec.cluster.membership
    if m != "store" and not (m.startswith("hpc:") and len(m) > 4):
        raise SpecError('must be "store" or "hpc:/path/to/proc/hpc"', file=cluster_file, field="cluster.membership")
    s = spec.cluster.store
    if not (s.startswith("dir:") and len(s) > 4) and not re.match(r"^etcds?://[^/]+", s):
        raise SpecError('must be "dir:PATH" or "etcd://HOST:PORT[,HOST:PORT...]"', file=cluster_file, field="cluster.store")
    _validate_peer(spec.cluster, cluster_file)
    tags: dict[str, str] = {}
    for g in spec.groups.values():
        for i, e in enumerate(g.entries):
            _validate_entry(g, i, e, tags)
        levels = g.levels()
        if g.runlevel != STOP and g.runlevel not in levels:
            known = ", ".join(levels) or "none"
            raise SpecError(
                f"{g.runlevel!r} is not a runlevel of any entry (known: {known}) nor 'stop'", file=g.source, field=f"groups.{g.name}.runlevel"
            )
        if g.max_failures is not None and g.max_failures < 1:
            raise SpecError("must be at least 1", file=g.source, field=f"groups.{g.name}.max_failures")
        for fld, (least, most) in GROUP_RANGES.items():
            _in_range(getattr(g, fld), least, most, file=g.source, field=f"groups.{g.name}.{fld}")
        if g.fence and not any("{node}" in a for a in g.fence):
            raise SpecError('must pass the dead node, e.g. ["/usr/local/sbin/fence", "{node}"]', file=g.source, field=f"groups.{g.name}.fence")


def _validate_peer(c: Cluster, cluster_file: str) -> None:
    """The failsafe's keys: both peer_listen and peer_secret_file, or neither."""
    if c.peer_listen is None and c.peer_secret_file is None:
        if c.peer_advertise is not None:
            raise SpecError("set only together with peer_listen and peer_secret_file", file=cluster_file, field="cluster.peer_advertise")
        return
    if c.peer_listen is None or c.peer_secret_file is None:
        missing = "peer_listen" if c.peer_listen is None else "peer_secret_file"
        raise SpecError(f"the failsafe needs peer_listen and peer_secret_file: {missing} is not set", file=cluster_file,
                        field=f"cluster.{missing}")
    listen = split_host_port(c.peer_listen)
    try:
        ipaddress.ip_address(listen[0] if listen else "")
    except ValueError:
        raise SpecError('must be "IP:PORT" (e.g. "10.0.0.1:7946" or "[::]:7946")', file=cluster_file, field="cluster.peer_listen") from None
    if c.peer_advertise is not None and split_host_port(c.peer_advertise) is None:
        raise SpecError('must be "HOST:PORT"', file=cluster_file, field="cluster.peer_advertise")
    if c.peer_advertise is None and _unspecified(listen):
        raise SpecError("listens on every address: set peer_advertise to the address peers reach this node at",
                        file=cluster_file, field="cluster.peer_advertise")
    if not c.peer_secret_file:
        raise SpecError("must be a path", file=cluster_file, field="cluster.peer_secret_file")


def _unspecified(host_port: tuple[str, int] | None) -> bool:
    return host_port is not None and ipaddress.ip_address(host_port[0]).is_unspecified


def _in_range(value: float, least: float, most: float, *, file: str, field: str, plain: bool = False) -> None:
    """A value within its documented range (NaN is not: every comparison with it fails)."""
    if least <= value <= most:
        return
    show = (lambda v: f"{v:g}") if plain else format_duration
    raise SpecError(f"{show(value)} is out of range: must be at least {show(least)} and at most {show(most)}", file=file, field=field)


def _validate_entry(g: Group, i: int, e: Entry, tags: dict[str, str]) -> None:
    path = f"groups.{g.name}.entries[{i}]"

    def fail(field: str, msg: str) -> None:
        raise SpecError(msg, file=g.source, field=f"{path}.{field}")

    try:
        _name(e.tag, "tag")
    except _FieldError as exc:
        fail("tag", str(exc))
    if e.tag in tags:
        fail("tag", f"{e.tag!r} is already used by {tags[e.tag]}")
    tags[e.tag] = f"{path} in {g.source}" if g.source else path
    if e.mode not in MODES:
        fail("mode", f"must be one of {', '.join(MODES)}")
    kinds = [k for k in ("command", "mount", "address") if getattr(e, k) is not None]
    if len(kinds) != 1:
        fail("command", "each entry needs exactly one of command, mount, address" + (f" (has {', '.join(kinds)})" if kinds else ""))
    if not e.runlevels:
        fail("runlevels", "must list at least one runlevel")
    for lvl in e.runlevels:
        if lvl == STOP:
            fail("runlevels", "'stop' means nothing runs; it cannot be an entry's runlevel")
        try:
            _name(lvl, "runlevel")
        except _FieldError as exc:
            fail("runlevels", str(exc))
    if e.kind != "process" and e.mode not in ("once", "respawn", "off"):
        fail("mode", f"a {e.kind} entry is kept present: mode must be once, respawn or off")
    for fld, (least, most) in ENTRY_RANGES.items():
        value = getattr(e, fld)
        if value is not None:
            _in_range(value, least, most, file=g.source, field=f"{path}.{fld}")
    for fld in ("user", "group"):  # the converter refuses them already; this covers specs built in code
        value = getattr(e, fld, None)
        if isinstance(value, str) and control_char(value) is not None:
            fail(fld, f"contains the control character {control_char(value)}: refused")
    if e.mount is not None:
        if not e.mount.target.startswith("/"):
            fail("mount.target", "must be an absolute path")
        if not e.mount.source:
            fail("mount.source", "must not be empty")
    if e.health is not None:
        _validate_health(e.health, e, fail)
    if e.address is not None:
        try:
            ipaddress.ip_interface(e.address.ip)
        except ValueError:
            fail("address.ip", f"{e.address.ip!r} is not an address with a prefix, like 192.0.2.10/24")
        if "/" not in e.address.ip:
            fail("address.ip", f"{e.address.ip!r} needs a prefix length, like 192.0.2.10/24")
        if not re.match(r"^[A-Za-z0-9_.:@-]{1,15}\Z", e.address.interface):
            fail("address.interface", f"{e.address.interface!r} is not an interface name")



def _validate_health(h: Health, e: Entry, fail: Callable[[str, str], None]) -> None:
    """A probe: one kind, a target it can reach, a timeout shorter than its interval."""
    if e.kind != "process":
        fail("health", f"{'an' if e.kind == 'address' else 'a'} {e.kind} entry has no health probe: only process entries do")
    if e.foreground or e.mode == "off":
        fail("health", f"a {e.mode} entry is not probed: only respawn and once entries run long enough")
    kinds = [k for k in ("command", "tcp", "http") if getattr(h, k) is not None]
    if len(kinds) != 1:
        fail("health", "needs exactly one of command, tcp, http" + (f" (has {', '.join(kinds)})" if kinds else ""))
    for fld, (least, most) in HEALTH_RANGES.items():
        value = getattr(h, fld)
        if not least <= value <= most:
            show = format_duration
            fail(f"health.{fld}", f"{show(value)} is out of range: must be at least {show(least)} and at most {show(most)}")
    if h.timeout >= h.interval:
        fail("health.timeout", f"{format_duration(h.timeout)} must be less than interval ({format_duration(h.interval)})")
    if h.tcp is not None and split_host_port(h.tcp) is None:
        fail("health.tcp", f"{h.tcp!r} is not HOST:PORT (an IPv6 address in brackets: [::1]:80)")
    if h.http is not None:
        problem = http_problem(h.http)
        if problem:
            fail("health.http", problem)


def split_host_port(text: str) -> tuple[str, int] | None:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port), or None if it is not one."""
    m = re.match(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):([0-9]{1,5})\Z", text)
    if m is None:
        return None
    host, port = m.group(1) or m.group(2), int(m.group(3))
    if not 1 <= port <= 65535:
        return None
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return host, port


def http_problem(url: str) -> str:
    """Why `url` cannot be probed ("" if it can): http:// only, a host, a port that is a port."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if u.scheme != "http":
        return f"{url!r}: only http:// URLs are probed (https is not: probe a plain port, or use a command probe)"
    if not u.hostname:
        return f"{url!r} has no host"
    if u.username is not None or u.password is not None:
        return f"{url!r}: credentials in a probe URL are refused"
    if port == 0:
        return f"{url!r}: port 0 is not a port"
    if " " in url:
        return f"{url!r} contains a space"
    return ""
