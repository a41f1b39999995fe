"""Loading a spec: TOML files -> the frozen classes of `reconciler.spec`, strictly.

One private cattrs converter with forbid_extra_keys; every problem becomes a one-line
SpecError naming the file and the field path (`groups.web.entries[1].mode`); no string may
hold a control character. Cross-field rules that a type cannot express (unique tags, known
runlevels, each duration's range, a safe timing budget) are checked after structuring, in
`validate`. Which files may be read at all: `reconciler.strictmodes`. Whether a new spec may
replace the running one: `check_replacement`.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from reconciler import fielderrors
from reconciler.spec.model import (
    STOP,
    Address,
    Cluster,
    Entry,
    Group,
    Health,
    Mount,
    Spec,
    SpecError,
    Timing,
    _FieldError,
    _name,
    no_control,
    parse_duration,
    parse_signal,
)
from reconciler.spec.rules import validate
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


def _count(value: Any) -> int:
    """A whole number of at least 1 (failures, max_failures)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(f"must be a whole number, not {_tname(value)}")
    if not 1 <= value <= 1_000_000:
        raise _FieldError(f"{value} is out of range: must be at least 1 and at most 1000000")
    return value


def _status_range(value: Any) -> tuple[int, int]:
    """An http probe's accepted status codes: [LOW, HIGH], both inclusive."""
    if (
        not isinstance(value, list) or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value)
        or value[0] > value[1]
    ):
        raise _FieldError("must be [LOW, HIGH], two status codes from 100 to 599, LOW <= HIGH, e.g. [200, 399]")
    return (value[0], value[1])


def _structure_health(value: Any) -> Health | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _FieldError(f"must be a table, not {_tname(value)}")
    health: Health = _conv.structure(value, Health)
    return health


_dur_fields(
    Health,
    "interval",
    "timeout",
    "start_period",
    command=override(struct_hook=_structure_command),
    tcp=override(struct_hook=lambda v, _t: None if v is None else _structure_str(v, str)),
    http=override(struct_hook=lambda v, _t: None if v is None else _structure_str(v, str)),
    status=override(struct_hook=lambda v, _t: _status_range(v)),
    failures=override(struct_hook=lambda v, _t: _count(v)),
)
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
    health=override(struct_hook=lambda v, _t: _structure_health(v)),
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
    "failure_window",
    "ban",
    max_failures=override(struct_hook=lambda v, _t: None if v is None else _count(v)),
    name=override(omit=True),
    source=override(omit=True),
    nodes=override(struct_hook=lambda v, _t: _nodes(v)),
    fence=override(struct_hook=lambda v, _t: _strings(v, "strings (an argv)")),
)
_dur_fields(Timing, "heartbeat", "lease", "demote_margin", "dead_after", "kill_slack", "retest", "tick")
_dur_fields(Cluster)
_dur_fields(Mount)
_dur_fields(Address)


def _structure(raw: Any, cls: type, path: str, file: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"must be a table, not {_tname(raw)}", file=file, field=path)
    try:
        return _conv.structure(raw, cls)
    except Exception as exc:  # cattrs wraps everything; report the first leaf as one line
        field, msg = fielderrors.first_error(exc, path)
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
