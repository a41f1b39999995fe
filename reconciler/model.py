"""The values that flow between the stages: what a node observed and what the cluster looks
like. Plain frozen attrs classes with no I/O, so the pure planner can depend on them;
`reconciler.observe` and `reconciler.store` re-export them next to the code that fills them.
"""

from __future__ import annotations

import attrs

from reconciler.published import EMPTY, Intent, NodeStatus
# Re-exported (the `as` form makes it explicit): the spec, observe/, act/fence, the cli and the
# store's records read these words from here, next to the values they describe.
from reconciler.terms import NAME_RE as NAME_RE
from reconciler.terms import STATES as STATES
from reconciler.terms import valid_name as valid_name


@attrs.frozen
class EntryState:
    group: str
    tag: str
    kind: str = "process"  # process | mount | address
    state: str = "stopped"
    pid: int | None = None
    since: float = 0.0  # monotonic time the entry entered this state
    exit_code: int | None = None  # last exit status (negative = killed by that signal)
    rapid_exits: int = 0  # consecutive exits sooner than min_uptime (respawn backoff)
    retry_at: float | None = None  # the next attempt is not before this monotonic time
    level: str = ""  # the runlevel it was started for
    owned: bool = True  # resources: we applied it (only what we applied is removed)
    message: str = ""  # why, for status: "exit 1", "busy: pids 12 13", kernel errors

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.tag)

    @property
    def active(self) -> bool:
        """Something exists that a stop would have to remove."""
        if self.kind == "process":
            return self.state in ("running", "stopping")
        return self.state in ("running", "mismatch", "stopping") and self.owned


@attrs.frozen
class Probe:
    """The health probes of one running process (observe/probes.py), as last seen."""

    pid: int | None = None  # the process they are about (a new process starts afresh)
    failures: int = 0  # consecutive failed probes that count (decide/health.counts)
    result: str = ""  # "ok", "fail", or "" before the first result
    at: float = 0.0  # monotonic time of the last result
    since: float = 0.0  # monotonic time the result last changed (what status publishes)
    message: str = ""  # why the last probe failed
    passed: bool = False  # a probe passed since the start: the start period is over
    seconds: float = 0.0  # how long the last probe took


@attrs.frozen
class Failure:
    """One failure of a group on this node (decide/health.py counts them)."""

    at: float  # monotonic time
    tag: str
    cause: str  # "unhealthy" (a restart), "rapid_exit", "start_failed"
    message: str = ""


@attrs.frozen
class Observed:
    node: str
    entries: dict[tuple[str, str], EntryState] = attrs.field(factory=dict)
    busy: frozenset[str] = frozenset()  # groups whose previous actions are still in flight
    # group-level attempts that failed (fence hook, claim): {group: (retry_at, message)}
    blocked: dict[str, tuple[float, str]] = attrs.field(factory=dict)
    # Health (issue 16): the probes of running entries; each group's failures on this node,
    # oldest first (kept across agent restarts: act/ledger.py); and the groups this node is
    # banned from, with the monotonic time each ban ends (decide/health.ban_until of those
    # failures, computed once per observation).
    probes: dict[tuple[str, str], Probe] = attrs.field(factory=dict)
    failures: dict[str, tuple[Failure, ...]] = attrs.field(factory=dict)
    bans: dict[str, float] = attrs.field(factory=dict)

    def get(self, group: str, tag: str, kind: str = "process") -> EntryState:
        return self.entries.get((group, tag)) or EntryState(group=group, tag=tag, kind=kind)

    def groups(self) -> set[str]:
        return {g for g, _ in self.entries}


@attrs.frozen
class Heartbeat:
    """What one node publishes about itself on every renewal."""

    node: str
    counter: int  # grows with every renewal; observers time how long it stands still
    digest: str = ""  # digest of the spec the node runs
    status: NodeStatus = EMPTY  # what it says about itself (reconciler/published.py)
    # The publisher's wall clock at this renewal: for showing heartbeat ages to people only
    # (liveness never compares clocks of two machines: see liveness.Liveness).
    wall: float | None = None
    # A random id of the agent process that wrote this record (reconciler/decide/identity.py): two
    # agents under one node name publish different ones. "" in records of older versions.
    instance: str = ""


@attrs.frozen
class Claim:
    """One instance of one node's claim on one group."""

    group: str
    node: str
    generation: int  # fencing token: grows with every new claim instance of the group
    token: str = ""  # backend identity of this instance (directory: generation; etcd: revision)


@attrs.frozen
class Snapshot:
    """One read of the whole store."""

    members: dict[str, Heartbeat] = attrs.field(factory=dict)
    claims: dict[str, Claim] = attrs.field(factory=dict)
    # Entries of the store this read skipped as malformed or stray (kind/name), each also
    # logged once and counted by the store (Store.skipped_total).
    skipped: tuple[str, ...] = ()
    # node -> the record this store's last publish for that node replaced, where it was not
    # this store's own previous write (another agent writes under the same name: a twin).
    displaced: dict[str, Heartbeat] = attrs.field(factory=dict)
    # The number of the store's current cluster spec revision (0: the store holds none yet).
    spec_revision: int = 0
    # The operator's intents (published.Intent: move, standby, maintenance), by Intent.key.
    intents: dict[str, Intent] = attrs.field(factory=dict)


@attrs.frozen
class Member:
    name: str
    last_change: float  # monotonic time (observer's clock) its heartbeat last advanced
    heartbeat: Heartbeat | None = None  # None when the store no longer lists it
    up: bool = True  # what the membership source says (hpc); the store source: always True


@attrs.frozen
class ClusterView:
    """Everything `plan` needs to know about the cluster, as seen from `node`."""

    node: str
    members: dict[str, Member] = attrs.field(factory=dict)
    claims: dict[str, Claim] = attrs.field(factory=dict)
    lease_until: float = float("inf")  # this node may run claimed groups until then (its clock)
    quorum: bool = True
    store_ok: bool = True
    store_error: str = ""
    # monotonic time this node first saw each group without a claim (for fallback claiming)
    unclaimed_since: dict[str, float] = attrs.field(factory=dict)
    # this node's claims that outlived a lapse of its lease: they must be re-arbitrated
    stale_claims: frozenset[str] = frozenset()
    # Another agent publishes under this node's name (identity.decide): "" if none. While
    # set, this node claims and takes over nothing (plan); may_run False: it also stops
    # everything it runs (it cannot prove it is the rightful one).
    twin: str = ""
    may_run: bool = True
    may_claim: bool = True  # False while watching this node's record at start-up, or with a twin
    # May end claims under this node's name (identity.may_release): not before this agent's
    # first publish (they may be a live namesake's), nor while it yields to a twin.
    may_release: bool = True
    skipped: tuple[str, ...] = ()  # the last read's skipped store entries (Snapshot.skipped)
    # Why the membership (hpc) could not be read ("": read, or none configured). Such a view
    # is also not store_ok (nothing is taken over without it), with this as its store_error.
    membership_error: str = ""
    # The store's current cluster spec revision as last read (Snapshot.spec_revision; 0: none).
    spec_revision: int = 0
    # The operator's intents as last read (Snapshot.intents; reconciler/decide/intents.py).
    intents: dict[str, Intent] = attrs.field(factory=dict)
    # This node's wall clock at that read (0: unknown), only to compare with an intent's
    # deadline (Intent.expires, another machine's wall clock: seconds of skew do not matter).
    wall: float = 0.0
    # The latest deadline of the failsafe's promises this node holds to owners (its monotonic
    # clock; 0: none; decide/failsafe.honour). Until then + dead_after it claims no unclaimed
    # group: a claim that vanished with its owner's etcd lease during a store outage may be a
    # promised owner's, whose group still runs there.
    promised_until: float = 0.0

    def alive(self, name: str, now: float, dead_after: float) -> bool:
        if name == self.node:
            return now < self.lease_until and self.quorum
        m = self.members.get(name)
        return m is not None and m.up and now - m.last_change < dead_after

    def stalled_for(self, name: str, now: float) -> float:
        m = self.members.get(name)
        return float("inf") if m is None else now - m.last_change
