"""What a node publishes about itself with every heartbeat: one typed record, written by the
node that owns it (agent/status.py builds it) and read back by its peers (placement reads
eligibility and what runs where, `reconcile status` shows it) through the same classes.

On the wire it is one JSON object (the store keeps it next to the heartbeat: a file
status/NODE.json, an etcd key status/NODE). Every field has a default, so that a record of an
older version that lacks a field still reads; a key this version does not know, a value of
the wrong type or a name that is not a valid name is refused (`StatusError`, one line naming
the field path, e.g. `status.groups.web.entries.db.state`), and the store skips that status
like any other malformed entry (reconciler/store/records.py).

The cluster's history (`Event`, appended to the store by every agent: agent/events.py) is
here too: a node publishes it, the same strict converter reads it back.

Pure: no I/O; only the values, their (un)structuring and the JSON text. The store's other
records live here too (a spec revision, an operator's intent, an event of the history), for
the one strict converter and its shared hooks: hence about 500 lines.
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
    "EMPTY", "EntryStatus", "Event", "GroupStatus", "INTENT_KINDS", "Intent", "MemberStatus", "NodeStatus", "SpecFile",
    "SpecRevision", "StatusError", "dumps", "event_dumps", "event_loads", "intent_doc", "intent_dumps", "intent_loads",
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
    # Events of the cluster's history this node dropped since its start (the store was slow
    # or down: agent/events.py). Left out of the record while 0, so older versions read it.
    events_dropped: int = 0
    # Issue 15 (left out of the record while empty, so older versions read it): the keys of the
    # maintenance intents this node last saw (Intent.key), sorted. A peer takes over none of
    # the groups they cover from this node until it publishes a record without them (it has
    # then seen maintenance end, and enforces its lease again): docs/design.md, "Maintenance".
    maintenance: tuple[str, ...] = ()
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


@attrs.frozen
class Event:
    """One thing that happened in the cluster, as the node it happened on tells it (the
    store's history: `reconcile events`). Written once, never changed."""

    wall: float  # the writer's wall clock (for people; ordering is `seq`)
    node: str
    kind: str  # claim, release, takeover, fence, fence-result, spec-revision, test-failed, backoff, give-up, ban, ...
    group: str = ""  # "" when it is about no group
    reason: str = ""  # one line
    # A takeover's phases in seconds ({"detect", "fence", "claim", "start"}: how long the owner
    # had been silent when this node decided, fencing, winning the claim, starting the group).
    phases: dict[str, float] = attrs.field(factory=dict)
    seq: int = 0  # assigned by the store when appended (0 before): increasing


# --- operator intents: what an operator asked of the cluster (reconciler/decide/intents.py) ----

INTENT_KINDS = ("move", "standby", "maintenance")


@attrs.frozen
class Intent:
    """One operator intent, cluster-wide, in the store: `move` a group to `target`, keep
    `node` in `standby`, or hold a scope in `maintenance` (the whole cluster, a `group`, or
    the groups a `node` owns). One per key (Intent.key); put again, it replaces the one
    there; deleted only as the very instance read (its random `id`)."""

    kind: str  # one of INTENT_KINDS
    id: str  # random hex, new with every put: the instance a delete names
    group: str = ""  # move; maintenance of a group
    node: str = ""  # standby; maintenance of a node's groups
    target: str = ""  # move: the node it goes to
    created: float = 0.0  # the writer's wall time (for people and --wait)
    expires: float | None = None  # move: the writer's wall time it gives up (timed out)
    who: str = ""  # "cli@HOST" or a node name

    @property
    def key(self) -> str:
        """Where it lives: move/GROUP, standby/NODE, maintenance, maintenance/group/GROUP,
        maintenance/node/NODE (one of each at a time)."""
        if self.kind == "move":
            return f"move/{self.group}"
        if self.kind == "standby":
            return f"standby/{self.node}"
        if self.group:
            return f"maintenance/group/{self.group}"
        if self.node:
            return f"maintenance/node/{self.node}"
        return "maintenance"


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
          twin=_str, spec_revision=_int, store_skipped=_strings, members=_table(MemberStatus), eligible_groups=_names, groups=_table(GroupStatus),
          events_dropped=_int,
          maintenance=_strings,
          peer=_str)
_register(SpecFile, name=_str, text=_str)


def _intent_kind(value: Any, _t: Any = None) -> str:
    kind = _str(value)
    if kind not in INTENT_KINDS:
        raise _Bad(f"{kind[:40]!r} is not an intent kind ({', '.join(INTENT_KINDS)})")
    return kind


def _name_or_empty(value: Any, _t: Any = None) -> str:
    name = _str(value)
    if name and not valid_name(name):
        raise _Bad(f"{name[:40]!r} is not a valid name")
    return name


def _hex(value: Any, _t: Any = None) -> str:
    text = _str(value)
    if not (1 <= len(text) <= 32 and all(c in "0123456789abcdef" for c in text)):
        raise _Bad(f"{text[:40]!r} is not an id (1 to 32 hex digits)")
    return text


_register(Intent, kind=_intent_kind, id=_hex, group=_name_or_empty, node=_name_or_empty, target=_name_or_empty,
          created=_float, expires=_optional(_float), who=_str)


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


def _phases(value: Any, _t: Any = None) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _Bad(f"must be a table, not {_type_name(value)}")
    out = {}
    for k, v in value.items():
        try:
            out[_str(k)] = _float(v)
        except _Bad as exc:
            raise _Bad(str(exc), f".{k}") from None
    return out


_register(Event, wall=_float, node=_str, kind=_str, group=_str, reason=_str, phases=_phases, seq=_int)
_register(SpecRevision, number=_positive, digest=_str, files=_files, node=_str, wall=_float, summary=_str)
# An entry carries only what is set (a stopped entry is {"state": "stopped"}), as it always has.
_conv.register_unstructure_hook(EntryStatus, make_dict_unstructure_fn(EntryStatus, _conv, _cattrs_omit_if_default=True))
# A group's issue-16 fields only when set: a record without them is what older versions write and read.
_omitted: dict[str, Any] = {f: override(omit_if_default=True) for f in ("failures", "banned", "banned_until", "cleared")}
_conv.register_unstructure_hook(GroupStatus, make_dict_unstructure_fn(GroupStatus, _conv, **_omitted))
_conv.register_unstructure_hook(NodeStatus, make_dict_unstructure_fn(NodeStatus, _conv, events_dropped=override(omit_if_default=True),
                                                                   maintenance=override(omit_if_default=True),
                                                                   peer=override(omit_if_default=True)))


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
    return _record_loads(text, SpecRevision, "spec revision")


def event_dumps(event: Event) -> str:
    """The text a store keeps for one event (JSON, keys sorted; `seq` too: the store's)."""
    return json.dumps(_conv.unstructure(event), sort_keys=True, separators=(",", ":"))


def event_loads(text: str | bytes) -> Event:
    """event_dumps() read back; StatusError (one line, with the field path) if it does not parse."""
    return _record_loads(text, Event, "event")


def _record_loads(text: str | bytes, cls: type[_T], what: str) -> _T:
    """A record's JSON text as a `cls`; StatusError naming `what` and the field path if not."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise StatusError(f"{what} is not JSON") from None
    try:
        return _structure(doc, cls)
    except _Bad as exc:
        raise StatusError(f"{what}{exc.sub}: {exc}") from None


def intent_dumps(intent: Intent) -> str:
    """The text a store keeps for one intent (JSON, keys sorted: equal intents, equal text)."""
    return json.dumps(_conv.unstructure(intent), sort_keys=True, separators=(",", ":"))


def intent_doc(intent: Intent) -> dict[str, Any]:
    """One intent's JSON-able document (for --json output)."""
    return cast("dict[str, Any]", _conv.unstructure(intent))


def intent_loads(text: str | bytes) -> Intent:
    """intent_dumps() read back; StatusError (one line, with the field path) if it does not
    parse, or if its fields do not make one intent (a move without a group and target...)."""
    intent = _record_loads(text, Intent, "intent")
    need = {"move": ("group", "target"), "standby": ("node",), "maintenance": ()}[intent.kind]
    for field in need:
        if not getattr(intent, field):
            raise StatusError(f"intent.{field}: a {intent.kind} intent needs one")
    if intent.kind == "maintenance" and intent.group and intent.node:
        raise StatusError("intent.node: a maintenance intent has one scope: a group or a node, not both")
    return intent
