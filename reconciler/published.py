"""What a node publishes about itself with every heartbeat: one typed record, written by the
node that owns it (agent/status.py builds it) and read back by its peers (placement reads
eligibility and what runs where, `reconcile status` shows it) through the same classes.

On the wire it is one JSON object (the store keeps it next to the heartbeat: a file
status/NODE.json, an etcd key status/NODE). Every field has a default, so that a record of an
older version that lacks a field still reads; a key this version does not know, a value of
the wrong type or a name that is not a valid name is refused (`StatusError`, one line naming
the field path, e.g. `status.groups.web.entries.db.state`), and the store skips that status
like any other malformed entry (reconciler/store/records.py).

Pure: no I/O; only the values, their (un)structuring and the JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from reconciler import fielderrors
from reconciler.terms import STATES, valid_name

_T = TypeVar("_T")
# A structure hook as cattrs calls it: (the JSON value, the type asked for) -> the value.
_Hook = Callable[[Any, Any], Any]

__all__ = [
    "EMPTY", "EntryStatus", "GroupStatus", "MemberStatus", "NodeStatus", "SpecFile", "SpecRevision", "StatusError", "dumps",
    "loads", "revision_dumps", "revision_loads",
]


class StatusError(ValueError):
    """A published status that does not parse; the message names the field path."""


@attrs.frozen
class EntryStatus:
    """One entry of a group as this node sees it (only what is set goes on the wire)."""

    state: str  # one of model.STATES
    pid: int | None = None
    exit_code: int | None = None
    message: str = ""
    retry_in: float | None = None  # seconds until the next attempt (backoff), if one is due
    # The publisher's wall time it entered this state, for failures (failed, exited, error)
    # only: fixed while the state lasts, so an idle node's record stays the same. For people.
    since: float | None = None
    # Its health probe (issue 16): "ok", "failing" (failed, fewer than `failures` times in a
    # row), "unhealthy", "starting" (failed within start_period); "" unprobed. Its failures in
    # a row, why the last failed, and the publisher's wall time the result last changed (not
    # the time of every probe: an idle node's record stays the same).
    health: str = ""
    probe_failures: int = 0
    probe_message: str = ""
    probe_since: float | None = None
    restart_reason: str = ""  # why the agent last restarted it here ("": it did not)


@attrs.frozen
class GroupStatus:
    desired: str = ""  # the spec's runlevel for it
    owner: str | None = None  # the node holding its claim
    generation: int | None = None  # of that claim
    mine: bool = False
    actual: str = ""  # a runlevel, "->LEVEL", "stopping", "failed" or "stop"
    eligible: bool | None = None  # its leading tests here: passed, failed, not run yet (None)
    active: bool = False  # entries of it run here (peers never claim it meanwhile)
    note: str = ""  # why this node does what it does about it (Plan.notes)
    entries: dict[str, EntryStatus] = attrs.field(factory=dict)
    # Issue 16 (left out of the record while unset, so older versions read it): the group's
    # failures on this node within its failure_window; whether this node gave it up and is
    # banned from it, until when (publisher's wall time); the id of the last `reconcile
    # clear` this node applied to it.
    failures: int = 0
    banned: bool = False
    banned_until: float | None = None
    cleared: str = ""


@attrs.frozen
class MemberStatus:
    alive: bool | None = None  # what this node concluded from the member's heartbeat counter
    up: bool = True  # what the membership source says


@attrs.frozen
class NodeStatus:
    # Nothing here changes from one heartbeat to the next while the node is idle (no clocks,
    # no ages), so an idle node rewrites its status only when something happens; the
    # heartbeat record carries the wall time (Heartbeat.wall).
    digest: str = ""  # of the spec it runs
    spec_error: str = ""  # why the spec on disk does not load ("": it does)
    # local state this node cannot write (the process table, the lease file): it runs on,
    # failing closed, but the operator must make room (docs/operations.md, "Disk space")
    state_errors: tuple[str, ...] = ()
    store_ok: bool = True
    store_error: str = ""
    quorum: bool = True
    twin: str = ""  # another agent under this node's name (decide/identity.py)
    spec_revision: int = 0  # the cluster spec revision it runs (0: none, its local files only)
    store_skipped: tuple[str, ...] = ()  # store entries its last read skipped as malformed
    members: dict[str, MemberStatus] = attrs.field(factory=dict)
    eligible_groups: tuple[str, ...] = ()  # sorted: the groups whose tests passed here
    groups: dict[str, GroupStatus] = attrs.field(factory=dict)
    # The failsafe (issue 17): this node's peer endpoint ("HOST:PORT"; "": off). Left out of
    # the record while unset, so older versions read it.
    peer: str = ""


EMPTY = NodeStatus()  # a node that published no status (yet), or one that did not parse


# --- the cluster spec: what the store holds (one revision) ---------------------------------


@attrs.frozen
class SpecFile:
    """One spec file of a revision: its name (a basename ending in .toml, never the node
    file) and its text, comments and all, with the node-local keys taken out of [cluster]."""

    name: str
    text: str


@attrs.frozen
class SpecRevision:
    """The cluster's spec as the store holds it: one numbered revision. Numbers start at 1
    and only grow; a revision is written once and never changed (reconciler/store/__init__.py
    says how a store keeps them)."""

    number: int
    digest: str  # Spec.digest() of these files as validated by the node that published them
    files: tuple[SpecFile, ...]  # sorted by name
    node: str = ""  # who published it (a node name, or "cli@HOST" for a command)
    wall: float = 0.0  # the publisher's wall time (for people: `reconcile history`)
    summary: str = ""  # one line: what changed against the revision before it


# --- the converter: private, strict --------------------------------------------------------


_Bad = fielderrors.FieldError  # a leaf error: `msg` about the value at `sub` below the current path


def _type_name(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _str(value: Any, _t: Any = None) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string, not {_type_name(value)}")
    return value


def _bool(value: Any, _t: Any = None) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, not {_type_name(value)}")
    return value


def _int(value: Any, _t: Any = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"must be an integer, not {_type_name(value)}")
    return value


def _float(value: Any, _t: Any = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"must be a number, not {_type_name(value)}")
    return float(value)


def _optional(hook: Callable[[Any], _T]) -> Callable[[Any, Any], _T | None]:
    return lambda value, _t: None if value is None else hook(value)


def _strings(value: Any, _t: Any = None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(f"must be a list of strings, not {_type_name(value)}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise _Bad(f"must be a string, not {_type_name(v)}", f"[{i}]")
    return tuple(value)


def _names(value: Any, _t: Any = None) -> tuple[str, ...]:
    out = _strings(value)
    for i, v in enumerate(out):
        if not valid_name(v):
            raise _Bad(f"{v[:40]!r} is not a valid name", f"[{i}]")
    return out


def _state(value: Any, _t: Any = None) -> str:
    state = _str(value)
    if state not in STATES:
        raise _Bad(f"{state[:40]!r} is not a state ({', '.join(STATES)})")
    return state


# A status is parsed again whenever it changes, and most of its entries are as they were:
# (key, type, value) of each field of an entry's document -> its EntryStatus (the types, so
# that 1 and true and 1.0 never share a record). Bounded.
_LEAVES: dict[tuple[Any, ...], Any] = {}


def _table(cls: type[Any], *, leaf: bool = False) -> Callable[[Any, Any], dict[str, Any]]:
    """A JSON object of valid name -> `cls`: errors below it carry `.NAME`. `leaf`: `cls`
    holds only scalars, and its records are memoised."""

    def structure(value: Any, _t: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Bad(f"must be an object, not {_type_name(value)}")
        out: dict[str, Any] = {}
        for name, item in value.items():
            if not valid_name(name):
                raise _Bad(f"{str(name)[:40]!r} is not a valid name")
            key: tuple[Any, ...] | None = None
            if leaf and isinstance(item, dict):
                key = (cls, *((k, type(v), v) for k, v in item.items()))
                try:
                    hit = _LEAVES.get(key)
                except TypeError:  # a list or an object where a scalar belongs: refused below
                    hit = key = None
                if hit is not None:
                    out[name] = hit
                    continue
            try:
                out[name] = record = _structure(item, cls)
            except _Bad as exc:
                raise _Bad(str(exc), f".{name}{exc.sub}") from None
            if key is not None:
                if len(_LEAVES) >= 65536:
                    _LEAVES.clear()
                _LEAVES[key] = record
        return out

    return structure


_conv = cattrs.Converter(forbid_extra_keys=True)


def _register(cls: type[Any], **fields: _Hook) -> None:
    # Typed Any, not AttributeOverride: mypy would check a **dict's values against every
    # keyword make_dict_structure_fn has (its _cattrs_* flags too), not only its **kwargs.
    overrides: dict[str, Any] = {k: override(struct_hook=h) for k, h in fields.items()}
    _conv.register_structure_hook(cls, make_dict_structure_fn(cls, _conv, _cattrs_forbid_extra_keys=True, **overrides))


_register(EntryStatus, state=_state, pid=_optional(_int), exit_code=_optional(_int), message=_str, retry_in=_optional(_float),
          since=_optional(_float), health=_str, probe_failures=_int, probe_message=_str, probe_since=_optional(_float),
          restart_reason=_str)
_register(GroupStatus, desired=_str, owner=_optional(_str), generation=_optional(_int), mine=_bool, actual=_str,
          eligible=_optional(_bool), active=_bool, note=_str, entries=_table(EntryStatus, leaf=True), failures=_int,
          banned=_bool, banned_until=_optional(_float), cleared=_str)
_register(MemberStatus, alive=_optional(_bool), up=_bool)
_register(NodeStatus, digest=_str, spec_error=_str, state_errors=_strings, store_ok=_bool, store_error=_str, quorum=_bool,
          twin=_str, spec_revision=_int, store_skipped=_strings, members=_table(MemberStatus), eligible_groups=_names, groups=_table(GroupStatus), peer=_str)
_register(SpecFile, name=_str, text=_str)


def _files(value: Any, _t: Any = None) -> tuple[SpecFile, ...]:
    if not isinstance(value, list):
        raise _Bad(f"must be a list of files, not {_type_name(value)}")
    out = []
    for i, item in enumerate(value):
        try:
            f = _structure(item, SpecFile)
        except _Bad as exc:
            raise _Bad(str(exc), f"[{i}]{exc.sub}") from None
        if not f.name.endswith(".toml") or "/" in f.name or f.name.startswith(".") or f.name == "node.toml":
            raise _Bad(f"{f.name[:40]!r} is not a spec file name (NAME.toml, not node.toml)", f"[{i}].name")
        out.append(f)
    if [f.name for f in out] != sorted({f.name for f in out}):
        raise _Bad("must be sorted by name, each name once")
    return tuple(out)


def _positive(value: Any, _t: Any = None) -> int:
    n = _int(value)
    if n < 1:
        raise _Bad(f"must be at least 1, not {n}")
    return n


_register(SpecRevision, number=_positive, digest=_str, files=_files, node=_str, wall=_float, summary=_str)
# An entry carries only what is set (a stopped entry is {"state": "stopped"}), as it always has.
_conv.register_unstructure_hook(EntryStatus, make_dict_unstructure_fn(EntryStatus, _conv, _cattrs_omit_if_default=True))
# A group's issue-16 fields only when set: a record without them is what older versions write and read.
_omitted: dict[str, Any] = {f: override(omit_if_default=True) for f in ("failures", "banned", "banned_until", "cleared")}
_conv.register_unstructure_hook(GroupStatus, make_dict_unstructure_fn(GroupStatus, _conv, **_omitted))
_conv.register_unstructure_hook(NodeStatus, make_dict_unstructure_fn(NodeStatus, _conv, peer=override(omit_if_default=True)))


def _structure(value: Any, cls: type[_T]) -> _T:
    """`value` as a `cls`, or _Bad naming the field path below it."""
    if not isinstance(value, dict):
        raise _Bad(f"must be an object, not {_type_name(value)}")
    try:
        return _conv.structure(value, cls)
    except _Bad:
        raise
    except Exception as exc:  # cattrs wraps what the hooks raise; find the first leaf
        sub, msg = fielderrors.first_error(exc, brief=True)
        raise _Bad(msg, sub) from None


def structure(doc: Any) -> NodeStatus:
    """A parsed JSON document as a NodeStatus; StatusError naming the field path if it is not one."""
    try:
        return _structure(doc, NodeStatus)
    except _Bad as exc:
        raise StatusError(f"status{exc.sub}: {exc}") from None


def unstructure(status: NodeStatus) -> dict[str, Any]:
    """The JSON-able document of `status` (what structure() reads back)."""
    # cast: an attrs instance unstructures to a dict (cattrs types every result Any)
    return cast("dict[str, Any]", _conv.unstructure(status))


def entry_doc(entry: EntryStatus) -> dict[str, Any]:
    """One entry's JSON-able document (for `reconcile status`)."""
    return cast("dict[str, Any]", _conv.unstructure(entry))  # a dict, as above


def dumps(status: NodeStatus) -> str:
    """The text a store keeps: compact, keys sorted (equal statuses give equal text)."""
    return json.dumps(unstructure(status), sort_keys=True, separators=(",", ":"))


def loads(text: str | bytes) -> NodeStatus:
    """dumps() read back; StatusError (one line, with the field path) if it does not parse."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise StatusError("status is not JSON") from None
    return structure(doc)


def revision_dumps(revision: SpecRevision) -> str:
    """The text a store keeps for one revision (JSON, keys sorted)."""
    return json.dumps(_conv.unstructure(revision), sort_keys=True, separators=(",", ":"))


def revision_loads(text: str | bytes) -> SpecRevision:
    """revision_dumps() read back; StatusError (one line, with the field path) if it does not parse."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise StatusError("spec revision is not JSON") from None
    try:
        return _structure(doc, SpecRevision)
    except _Bad as exc:
        raise StatusError(f"spec revision{exc.sub}: {exc}") from None
