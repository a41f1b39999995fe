"""The spec's converter: TOML data -> the frozen classes of `reconciler.spec`, strictly.

One private cattrs converter with forbid_extra_keys; every problem becomes a one-line
SpecError naming the file and the field path (`groups.web.entries[1].mode`); no string may
hold a control character. The loader (files) and the node file's check (local.py) use it.
"""

from __future__ import annotations

import re
from typing import Any

import cattrs
from cattrs.gen import make_dict_structure_fn, override

from reconciler import fielderrors
from reconciler.spec.model import (
    Address,
    Cluster,
    Entry,
    Group,
    Health,
    Mount,
    SpecError,
    Timing,
    _FieldError,
    _name,
    no_control,
    parse_duration,
    parse_signal,
)

__all__ = ["structure", "tname"]

_conv = cattrs.Converter(forbid_extra_keys=True)

_conv = cattrs.Converter(forbid_extra_keys=True)


def _structure_str(value: Any, _t: Any) -> str:
    if not isinstance(value, str):
        raise _FieldError(f"must be a string, not {tname(value)}")
    return no_control(value)  # every string of a spec: names, paths, users, URLs, mount fields


def _structure_bool(value: Any, _t: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(f"must be true or false, not {tname(value)}")
    return value


def _structure_float(value: Any, _t: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _FieldError(f"must be a number, not {tname(value)}")
    return float(value)


def tname(value: Any) -> str:
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
        raise _FieldError(f"must be a whole number, not {tname(value)}")
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
        raise _FieldError(f"must be a table, not {tname(value)}")
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


def structure(raw: Any, cls: type, path: str, file: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"must be a table, not {tname(raw)}", file=file, field=path)
    try:
        return _conv.structure(raw, cls)
    except Exception as exc:  # cattrs wraps everything; report the first leaf as one line
        field, msg = fielderrors.first_error(exc, path)
        raise SpecError(msg, file=file, field=field) from None
