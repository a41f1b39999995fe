"""What `reconcile status` shows: the cluster overview's document, the judgements in it and
its text.

The document is attrs classes: the JSON (`to_json`) is made from their fields, and the text
(`render`) reads the same fields, so no key is spelled twice. The judgements are pure
functions of what the nodes publish and of which nodes are alive (agent/status.py gathers
those): a group's state (`group_state`), the summary line, and what `--check` fails on
(`problems`). No I/O and no clock here: times come in as arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import cattrs

from reconciler import published
from reconciler.published import EntryStatus
from reconciler.spec import STOP

# A group's state, judged from its owner's published status and the nodes alive.
RUNNING = "running"  # its owner is alive and runs it at the desired runlevel
STARTING = "starting"  # its owner is on its way to the desired runlevel
STOPPING = "stopping"  # entries of it still run where they should not
DEGRADED = "degraded"  # its owner runs it, but an entry crash-loops (backoff), is in error or fails its health probe
FAILED = "failed"  # its tests failed, on its owner or on every node that may run it; or every such node is banned from it
STOPPED = "stopped"  # desired stop, and nothing of it runs
UNOWNED = "unowned"  # desired to run, but no live node holds its claim
UNKNOWN = "unknown"  # its owner publishes nothing about it (another spec)
GROUP_STATES = (RUNNING, STARTING, STOPPING, DEGRADED, FAILED, STOPPED, UNOWNED, UNKNOWN)


@attrs.frozen
class NodeRow:
    live: bool  # its heartbeat counter moved while status looked (cluster/survey.py)
    heartbeat_age: float | None  # its last heartbeat's wall time against ours (for people)
    digest: str
    spec_differs: bool
    spec_error: str
    twin: str
    state_errors: tuple[str, ...]
    store_skipped: tuple[str, ...]
    revision: int = 0  # the cluster spec revision it runs (0: its local files)
    behind: bool = False  # live, and running an older revision than the store's current one
    events_dropped: int = 0  # events of the history it could not append (agent/events.py)


@attrs.frozen
class Failure:
    """A test of a group that failed on one node."""

    node: str
    tag: str
    exit_code: int | None
    since: float | None  # that node's wall time of the failure


@attrs.frozen
class GroupRow:
    desired: str
    owner: str | None
    generation: int | None
    actual: str  # the runlevel its owner reports reaching ("->run" on the way, "stop", ...)
    state: str  # one of GROUP_STATES
    entries: dict[str, EntryStatus]  # as its owner reports them
    failures: tuple[Failure, ...]  # its failed tests, on the live nodes
    notes: dict[str, str]  # node -> why that node does what it does about it
    # Issue 16: node -> its failures of the group within failure_window (those with any);
    # node -> when its ban from the group ends (its wall time), for the live banned nodes.
    group_failures: dict[str, int] = attrs.field(factory=dict)
    bans: dict[str, float | None] = attrs.field(factory=dict)
    banned_everywhere: bool = False


@attrs.frozen
class Summary:
    nodes: int
    live: int
    groups: int
    states: dict[str, int]  # group state -> how many, in GROUP_STATES order, none of 0


@attrs.frozen
class Intents:
    """The operator's intents in the store (issue 15: decide/intents.py)."""

    maintenance: tuple[str, ...] = ()  # scopes: "cluster", "group G", "node N"
    standby: tuple[str, ...] = ()  # nodes
    moves: dict[str, str] = attrs.field(factory=dict)  # group -> the node it is moving to


@attrs.frozen
class Overview:
    nodes: dict[str, NodeRow]
    groups: dict[str, GroupRow]
    summary: Summary
    problems: tuple[str, ...]  # what is not as desired (`--check` fails on any)
    spec_error: str = ""  # the spec on disk does not load: groups are those the nodes publish
    intents: Intents = Intents()


# --- judgements ---------------------------------------------------------------------------


def crash_looping(e: EntryStatus) -> bool:
    """A respawn entry waiting out its backoff, or an entry that could not be started or
    applied: the group runs, but not whole."""
    return (e.state == "exited" and e.retry_in is not None) or e.state == "error"


def sick(e: EntryStatus) -> bool:
    """Its health probe fails (once or more in a row: not yet restarted, or not for long)."""
    return e.health in ("failing", "unhealthy")


def group_state(*, desired: str, owner: str | None, owner_live: bool, actual: str | None,
                entries: Iterable[EntryStatus] = (), failed_everywhere: bool = False, banned_everywhere: bool = False) -> str:
    """A group's state. `actual`: what its owner publishes about it (None: nothing);
    `failed_everywhere`: its tests failed on every live node that may run it;
    `banned_everywhere`: every live node that may run it is banned from it (issue 16)."""
    if desired == STOP:
        if owner is None or not owner_live or actual == STOP:
            return STOPPED  # (a dead owner's keeper has stopped what it ran)
        return STOPPING
    if failed_everywhere or banned_everywhere or (owner_live and actual == FAILED):
        return FAILED
    if owner is None or not owner_live:
        return UNOWNED
    if actual is None:
        return UNKNOWN
    if actual == DEGRADED or any(crash_looping(e) or sick(e) for e in entries):
        return DEGRADED
    if actual == desired:
        return RUNNING
    if actual == STOP or actual.startswith("->"):
        return STARTING
    if actual == "stopping":
        return STOPPING
    return UNKNOWN


def as_desired(row: GroupRow) -> bool:
    return row.state == (STOPPED if row.desired == STOP else RUNNING)


def summary(nodes: Mapping[str, NodeRow], groups: Mapping[str, GroupRow]) -> Summary:
    counts = {s: sum(1 for g in groups.values() if g.state == s) for s in GROUP_STATES}
    return Summary(nodes=len(nodes), live=sum(1 for n in nodes.values() if n.live), groups=len(groups),
                   states={s: n for s, n in counts.items() if n})


def problems(nodes: Mapping[str, NodeRow], groups: Mapping[str, GroupRow]) -> tuple[str, ...]:
    """One line for each thing not as desired: a node not live (or running under a twin, or
    unable to write its state or load the spec), a group not in its desired state."""
    out = []
    for name, n in nodes.items():
        if not n.live:
            out.append(f"node {name}: not live")
        if n.twin:
            out.append(f"node {name}: twin: {n.twin}")
        out.extend(f"node {name}: local state: {e}" for e in n.state_errors)
        if n.spec_error:
            out.append(f"node {name}: spec: {n.spec_error}")
        if n.behind:
            out.append(f"node {name}: runs spec revision {n.revision}, behind the cluster's")
    for name, g in groups.items():
        if not as_desired(g):
            why = "; ".join(f"{f.tag} failed on {f.node}{_exit(f.exit_code)}" for f in g.failures) if g.state == FAILED else ""
            if g.banned_everywhere:
                why = "banned on every node that may run it: " + ", ".join(g.bans) + (f"; {why}" if why else "")
            out.append(f"group {name}: {g.state}, desired {g.desired}" + (f" ({why})" if why else ""))
    return tuple(out)


# --- the JSON -----------------------------------------------------------------------------

_conv = cattrs.Converter()
# An entry as it goes on the wire: only what is set (published.entry_doc).
_conv.register_unstructure_hook(EntryStatus, published.entry_doc)


def to_json(doc: Overview) -> dict[str, Any]:
    out: dict[str, Any] = _conv.unstructure(doc)
    return out


# --- the text -----------------------------------------------------------------------------


def ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.2f}s ago" if seconds < 10 else f"{seconds:.0f}s ago"


def _exit(code: int | None) -> str:
    return "" if code is None else f" (exit {code})"


def entry_detail(e: EntryStatus, now: float | None = None) -> str:
    """What to say after an entry's state, saying nothing twice: the message says the exit
    code and the backoff when it has them ("stopped (exit -15)" in state stopped: "exit -15").
    `now` (wall time): say how long ago its probe result began."""
    message = e.message
    for prefix, suffix in ((f"{e.state} (", ")"), ("test failed: ", "")):
        if message.startswith(prefix) and message.endswith(suffix):
            message = message[len(prefix):len(message) - len(suffix)]
    if message == e.state:
        message = ""
    parts = []
    if e.pid is not None:
        parts.append(f"pid {e.pid}")
    if e.exit_code is not None and e.state != "running" and f"exit {e.exit_code}" not in message:
        parts.append(f"exit {e.exit_code}")
    if message:
        parts.append(message)
    if e.retry_in is not None and "next try" not in message:
        parts.append(f"retry in {e.retry_in:g}s")
    if e.health and e.health != "ok":
        parts.append(f"health {e.health}" + (f" ({e.probe_failures} in a row)" if e.probe_failures else "")
                     + (f": {e.probe_message}" if e.probe_message else "")
                     + (f", since {ago(max(0.0, now - e.probe_since))}" if now is not None and e.probe_since else ""))
    if e.restart_reason:
        parts.append(f"last restart: {e.restart_reason}")
    return ", ".join(parts)


def table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    """Columns as wide as their widest cell (the last one unpadded), two spaces apart."""
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]


def summary_line(s: Summary) -> str:
    states = ", ".join(f"{n} {state}" for state, n in s.states.items())
    return f"{s.nodes} node{'s' if s.nodes != 1 else ''}, {s.live} live; {s.groups} group{'s' if s.groups != 1 else ''}" + (
        f": {states}" if states else "")


def render(doc: Overview, *, now: float) -> str:
    """The text of `doc`; `now`: this machine's wall time (for the ages of failures)."""
    out = []
    node_rows = []
    for name, n in doc.nodes.items():
        age = "-" if n.heartbeat_age is None else ago(n.heartbeat_age)
        spec = (f"r{n.revision} " if n.revision else "") + n.digest + (" (behind)" if n.behind else "") + (
            " (differs)" if n.spec_differs and not n.behind else "") + (f" error: {n.spec_error}" if n.spec_error else "")
        node_rows.append((name, "yes" if n.live else "NO", age, spec))
    notes: dict[str, list[str]] = {}
    for name, n in doc.nodes.items():
        lines = notes[name] = [f"  twin: {n.twin}"] if n.twin else []
        lines.extend(f"  local state: {e}" for e in n.state_errors)
        if n.store_skipped:
            lines.append(f"  store entries skipped: {', '.join(n.store_skipped[:10])}")
        if n.events_dropped:
            lines.append(f"  history: {n.events_dropped} events dropped (the store was slow or down: `reconcile events` has gaps)")
    lines = table(("NODE", "LIVE", "HEARTBEAT", "SPEC"), node_rows)
    out.append(lines[0])
    for line, name in zip(lines[1:], doc.nodes):
        out.append(line)
        out.extend(notes[name])
    if not doc.nodes:
        out.append("no node has published a heartbeat")
    out.append("")
    group_rows = [(name, g.desired, g.actual, g.state, g.owner or "-", "-" if g.generation is None else str(g.generation))
                  for name, g in doc.groups.items()]
    lines = table(("GROUP", "DESIRED", "ACTUAL", "STATE", "OWNER", "GEN"), group_rows)
    out.append(lines[0])
    for line, (name, g) in zip(lines[1:], doc.groups.items()):
        out.append(line)
        # Its entries as its owner reports them, then its tests that failed elsewhere.
        rows = [(tag, e.state, entry_detail(e, now)) for tag, e in g.entries.items()]
        rows.extend((f.tag, "failed", f"on {f.node}{_exit(f.exit_code)}" + ("" if f.since is None else f", {ago(max(0.0, now - f.since))}"))
                    for f in g.failures if f.node != g.owner)
        if rows:
            out.extend("  " + ln for ln in table(("", "", ""), rows)[1:])
        for node, note in g.notes.items():
            out.append(f"  [{node}] {note}")
        for node, count in g.group_failures.items():
            if node not in g.bans:
                out.append(f"  [{node}] {count} failure{'s' if count != 1 else ''} within its failure_window")
        for node, until in g.bans.items():
            left = "" if until is None else f", {max(0.0, until - now):.0f}s left"
            out.append(f"  [{node}] banned ({g.group_failures.get(node, 0)} failures{left})")
    out.append("")
    out.extend(intent_lines(doc.intents))
    out.append(summary_line(doc.summary))
    return "\n".join(out)


def intent_lines(i: Intents) -> list[str]:
    """The operator's intents, one line each kind that has any (none: no line)."""
    out = []
    if i.maintenance:
        out.append(f"maintenance: {', '.join(i.maintenance)} (observed only, nothing changed)")
    if i.standby:
        out.append(f"standby: {', '.join(i.standby)}")
    if i.moves:
        out.append("moving: " + ", ".join(f"{g} -> {n}" for g, n in i.moves.items()))
    return out
