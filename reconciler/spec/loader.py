"""Loading a spec: TOML files -> the frozen classes of `reconciler.spec`, strictly.

One private cattrs converter with forbid_extra_keys; every problem becomes a one-line
SpecError naming the file and the field path (`groups.web.entries[1].mode`); no string may
hold a control character. Cross-field rules that a type cannot express (unique tags, known
runlevels, each duration's range, a safe timing budget) are checked after structuring, in
`validate`. Which files may be read at all: `reconciler.strictmodes`. Whether a new spec may
replace the running one: `check_replacement`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from reconciler.spec.model import (
    ENTRY_RANGES,
    GROUP_RANGES,
    MODES,
    STOP,
    TIMING_RANGES,
    Address,
    Cluster,
    Entry,
    Group,
    Mount,
    Spec,
    SpecError,
    Timing,
    _FieldError,
    _name,
    control_char,
    format_duration,
    no_control,
    parse_duration,
    parse_signal,
)
from reconciler.spec.strictmodes import check_permissions, read_secret

__all__ = ["check_permissions", "check_replacement", "load", "peek", "spec_files", "validate"]

# --- the converter: private, strict --------------------------------------------------

_conv = cattrs.Converter(forbid_extra_keys=True)


def _structure_str(value: Any, _t: Any) -> str:
    if not isinstance(value, str):
        raise _FieldError(f"must be a string, not {_tname(value)}")
    return no_control(value)  # every string of a spec: names, paths, users, URLs, mount fields


def _structure_bool(value: Any, _t: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(f"must be true or false, not {_tname(value)}")
    return value


def _structure_float(value: Any, _t: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _FieldError(f"must be a number, not {_tname(value)}")
    return float(value)


def _tname(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _strings(value: Any, what: str = "strings") -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _FieldError(f"must be a list of {what}")
    return tuple(no_control(v, sub=f"[{i}]") for i, v in enumerate(value))


def _structure_command(value: Any, _t: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise _FieldError("must not be empty")
        return ("/bin/sh", "-c", no_control(value))  # no line breaks either: one line of shell
    argv = _strings(value, "strings (an argv), or one string for /bin/sh -c")
    if not argv or not argv[0]:
        raise _FieldError("must not be empty")
    return argv


def _structure_env(value: Any, _t: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _FieldError("must be a table of NAME = \"value\"")
    out = []
    for k, v in value.items():
        if not isinstance(v, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", k):
            raise _FieldError(f"{k}: must be NAME = \"string value\"")
        out.append((k, no_control(v, sub=f".{k}")))
    return tuple(out)


_conv.register_structure_hook(str, _structure_str)
_conv.register_structure_hook(bool, _structure_bool)
_conv.register_structure_hook(float, _structure_float)


def _dur_fields(cls: type, *names: str, **extra: Any) -> None:
    # (Any: make_dict_structure_fn takes its own flags as keywords too, so a dict of overrides
    # alone does not type-check as its **kwargs)
    overrides: dict[str, Any] = {n: override(struct_hook=lambda v, _t: parse_duration(v)) for n in names}
    overrides.update(extra)
    _conv.register_structure_hook(cls, make_dict_structure_fn(cls, _conv, _cattrs_forbid_extra_keys=True, **overrides))


_opt_dur = override(struct_hook=lambda v, _t: None if v is None else parse_duration(v))
_dur_fields(
    Entry,
    "stop_timeout",
    "min_uptime",
    timeout=_opt_dur,
    command=override(struct_hook=_structure_command),
    env=override(struct_hook=_structure_env),
    runlevels=override(struct_hook=lambda v, _t: _strings(v, "runlevel names")),
    stop_signal=override(struct_hook=lambda v, _t: parse_signal(v)),
    cwd=override(struct_hook=lambda v, _t: None if v is None else _structure_str(v, str)),
    user=override(struct_hook=lambda v, _t: None if v is None else _structure_str(v, str)),
    group=override(struct_hook=lambda v, _t: None if v is None else _structure_str(v, str)),
)
def _nodes(value: Any) -> tuple[str, ...]:
    """A group's `nodes`: valid names, each once (its place in the list is its rank)."""
    names = tuple(_name(n, "node") for n in _strings(value, "node names"))
    for i, n in enumerate(names):
        if n in names[:i]:
            raise _FieldError(f"node {n!r} is listed twice", sub=f"[{i}]")
    return names


_dur_fields(
    Group,
    "fence_timeout",
    name=override(omit=True),
    source=override(omit=True),
    nodes=override(struct_hook=lambda v, _t: _nodes(v)),
    fence=override(struct_hook=lambda v, _t: _strings(v, "strings (an argv)")),
)
_dur_fields(Timing, "heartbeat", "lease", "demote_margin", "dead_after", "kill_slack", "retest", "tick")
_dur_fields(Cluster)
_dur_fields(Mount)
_dur_fields(Address)


def _first_error(exc: BaseException, path: str) -> tuple[str, str]:
    """Walk a cattrs exception group to its first leaf; return (field path, message)."""
    if isinstance(exc, cattrs.errors.ForbiddenExtraKeysError):
        keys = ", ".join(sorted(exc.extra_fields))
        return path, f"unknown field{'s' if len(exc.extra_fields) > 1 else ''} {keys}"
    if isinstance(exc, (cattrs.ClassValidationError, cattrs.IterableValidationError, ExceptionGroup)):
        for sub in exc.exceptions:
            seg = ""
            for note in getattr(sub, "__notes__", []):
                note = str(note)
                if "@ attribute " in note:
                    seg = "." + note.rsplit("@ attribute ", 1)[1].strip()
                elif "@ index " in note:
                    seg = f"[{note.rsplit('@ index ', 1)[1].strip()}]"
            return _first_error(sub, path + seg)
    if isinstance(exc, KeyError):
        key = f".{exc.args[0]}"  # cattrs' note usually named the attribute already
        return (path if path.endswith(key) else path + key), "is required"
    if isinstance(exc, _FieldError):
        return path + exc.sub, str(exc)
    if isinstance(exc, TypeError) and "missing" in str(exc):
        missing = re.findall(r"'(\w+)'", str(exc))
        return (path + "." + missing[0]) if missing else path, "is required"
    return path, f"invalid value ({exc})"


def _structure(raw: Any, cls: type, path: str, file: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"must be a table, not {_tname(raw)}", file=file, field=path)
    try:
        return _conv.structure(raw, cls)
    except Exception as exc:  # cattrs wraps everything; report the first leaf as one line
        field, msg = _first_error(exc, path)
        raise SpecError(msg, file=file, field=field) from None


# --- loading -------------------------------------------------------------------------


def spec_files(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix == ".toml" and f.is_file() and not f.name.startswith("."))
    return [p]


def check_replacement(current: Spec, new: Spec, path: str | os.PathLike[str]) -> None:
    """Refuse a new spec that would stop every group the current one runs, by removing them
    all (an emptied file, `: > spec.toml`; a directory whose files were deleted), unless it
    says so with `[cluster] stop_all = true`. A group set to runlevel "stop" by name is the
    operator's word and is not refused; neither is a first start with an empty spec."""
    if new.cluster.stop_all:
        return
    running = [n for n, g in current.groups.items() if g.runlevel != STOP]
    if not running or any(n in new.groups for n in running):
        return
    shown = ", ".join(running[:3]) + (f" and {len(running) - 3} more" if len(running) > 3 else "")
    raise SpecError(
        f"would stop every group that runs ({shown}) by removing it: refused, the last good spec stays;"
        ' to stop them all, set stop_all = true in [cluster] (or each group\'s runlevel to "stop")',
        file=str(path),
        field="groups",
    )


def load(path: str | os.PathLike[str]) -> Spec:
    """Load and validate a spec file or directory; raise SpecError (one line) on any problem."""
    root = Path(path)
    if not root.exists():
        raise SpecError("no such file or directory", file=str(root))
    files = spec_files(root)
    if not files:
        raise SpecError("no *.toml files in this directory", file=str(root))
    check_permissions(root)  # the whole path: its ancestors and any link's target too
    cluster_raw: dict[str, Any] | None = None
    cluster_file = ""
    groups: dict[str, Group] = {}
    for f in files:
        if f != root:
            check_permissions(f)
        fname = str(f)
        try:
            with open(f, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"not valid TOML: {exc}", file=fname) from None
        except RecursionError:  # tomllib recurses once per nesting level of arrays/tables
            raise SpecError("not valid TOML: nested too deeply", file=fname) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"cannot read: {exc}", file=fname) from None
        extra = set(data) - {"cluster", "groups"}
        if extra:
            raise SpecError(f"unknown table{'s' if len(extra) > 1 else ''} {', '.join(sorted(extra))}", file=fname, field=sorted(extra)[0])
        if "cluster" in data:
            if cluster_raw is not None:
                raise SpecError(f"[cluster] is also defined in {cluster_file}", file=fname, field="cluster")
            cluster_raw, cluster_file = data["cluster"], fname
        raw_groups = data.get("groups", {})
        if not isinstance(raw_groups, dict):
            raise SpecError("must be a table of groups", file=fname, field="groups")
        for name, raw in raw_groups.items():
            fpath = f"groups.{name}"
            try:
                _name(name, "group name")
            except _FieldError as exc:
                raise SpecError(str(exc), file=fname, field=fpath) from None
            if name in groups:
                raise SpecError(f"defined twice: here and in {groups[name].source}", file=fname, field=fpath)
            g = _structure(raw, Group, fpath, fname)
            groups[name] = attrs.evolve(g, name=name, source=fname)
    cluster = _structure(cluster_raw or {}, Cluster, "cluster", cluster_file or str(files[0]))
    base = str(root if root.is_dir() else root.parent)
    cluster = _password_from_file(cluster, base, cluster_file or str(files[0]))
    spec = Spec(cluster=cluster, groups=groups, base=base, files=tuple(str(f) for f in files))
    validate(spec, cluster_file or str(files[0]))
    return spec


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
        for fld, (least, most) in GROUP_RANGES.items():
            _in_range(getattr(g, fld), least, most, file=g.source, field=f"groups.{g.name}.{fld}")
        if g.fence and not any("{node}" in a for a in g.fence):
            raise SpecError('must pass the dead node, e.g. ["/usr/local/sbin/fence", "{node}"]', file=g.source, field=f"groups.{g.name}.fence")


def _in_range(value: float, least: float, most: float, *, file: str, field: str, plain: bool = False) -> None:
    """A value within its documented range (NaN is not: every comparison with it fails)."""
    if least <= value <= most:
        return
    show = (lambda v: f"{v:g}") if plain else format_duration
    raise SpecError(f"{show(value)} is out of range: must be at least {show(least)} and at most {show(most)}", file=file, field=field)


def _password_from_file(cluster: Cluster, base: str, cluster_file: str) -> Cluster:
    """`etcd_password_file`, relative to the spec's directory: read the password at load."""
    name = cluster.etcd_password_file
    if name is None:
        return cluster
    field = "cluster.etcd_password_file"
    if cluster.etcd_password is not None:
        raise SpecError("set etcd_password or etcd_password_file, not both", file=cluster_file, field=field)
    path = name if os.path.isabs(name) else os.path.join(base, name)
    return attrs.evolve(cluster, etcd_password=read_secret(path, file=cluster_file, field=field))


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
    if e.address is not None:
        try:
            ipaddress.ip_interface(e.address.ip)
        except ValueError:
            fail("address.ip", f"{e.address.ip!r} is not an address with a prefix, like 192.0.2.10/24")
        if "/" not in e.address.ip:
            fail("address.ip", f"{e.address.ip!r} needs a prefix length, like 192.0.2.10/24")
        if not re.match(r"^[A-Za-z0-9_.:@-]{1,15}\Z", e.address.interface):
            fail("address.interface", f"{e.address.interface!r} is not an interface name")


def peek(path: str | os.PathLike[str]) -> Spec:
    """Only the [cluster] table of a spec that does not load as a whole, with no groups.

    For read-only commands (`reconcile status`) after a bad edit: the agents still run the
    last good spec, and showing what they publish needs only the store's address. Raises
    SpecError if even the [cluster] table cannot be read.
    """
    root = Path(path)
    files = spec_files(root)
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
            continue
        if isinstance(data.get("cluster"), dict):
            base = str(root if root.is_dir() else root.parent)
            cluster = _password_from_file(_structure(data["cluster"], Cluster, "cluster", str(f)), base, str(f))
            return Spec(cluster=cluster, groups={}, base=base, files=(str(f),))
    if files and all(f.exists() for f in files):
        base = str(root if root.is_dir() else root.parent)
        return Spec(cluster=Cluster(), groups={}, base=base, files=tuple(str(f) for f in files))
    raise SpecError("no readable [cluster] table", file=str(root))
