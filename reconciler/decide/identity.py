"""Node identity: is another agent publishing under this node's name, and who may run?

One node name must be one agent. On one machine a lock in the node's state directory makes
sure of it (agent.run); across machines (a cloned VM, a typo in a unit file) only the store
can tell. Every agent process publishes a random *instance* id with its heartbeat
(model.Heartbeat.instance), and watches its own node record: a record under its name with a
foreign instance id whose counter advances is a *twin*.

Pure: the agent feeds observations (what its own node record showed, when, its lease) and
acts on the Verdict; time is an argument. The argument for these rules is in
docs/design.md ("Node identity"). In short:

- A newcomer watches its node record before its first publish for dead_after if another
  instance's record is there (it may be a paused agent's, still running its groups); with
  no record at all it publishes at once (and holds its claims, below). If the record
  advances under another instance id, a
  live agent already uses the name: it never publishes and never claims (its lease is
  never renewed, so nothing runs here either). The record of its own predecessor (the
  instance id the previous agent of this state directory recorded; the lock proves it is
  dead) needs no watch: a restart adopts at once.
- After its first publish an agent claims nothing for HOLD heartbeats: two newcomers that
  started together (each saw no record) see each other's records in that time (every
  publish first reads the record it replaces: Snapshot.displaced), and both yield.
- An agent that has published sees a live twin only if the other broke that rule (an older
  version, or a read that showed a stale record). It keeps running what it runs -- but
  claims and takes over nothing -- only if it can prove it is the incumbent: its lease has
  been valid without a break since at least dead_after before the twin first appeared, and
  the twin was not already in the record when this agent started. A correct newcomer would
  have seen it advancing, so the other one is the intruder.
- Otherwise neither can be sure: it *yields*: it stops publishing, claims nothing, ends no
  claim (they are the name's, and the other agent may hold them rightfully) and stops what
  it runs (its lease then runs out and the keeper makes sure). If both yield, they resume
  one after the other: the one with the smaller instance id once the other's record has
  stood still for dead_after, the other after twice that, so they do not meet again.
"""

from __future__ import annotations

import attrs

from reconciler.model import Heartbeat

HOLD = 3  # heartbeats: no claims for this long after the first publish


@attrs.frozen
class Foreign:
    """What this agent saw of another instance in its own node record (its own clock)."""

    instance: str
    counter: int
    first_seen: float
    last_change: float
    advanced: bool = False  # seen with a second counter: alive (one sighting may be a dead agent's last record)
    known_at_start: bool = False  # in the record before this agent's first publish

    def live(self, now: float, dead_after: float) -> bool:
        return self.advanced and now - self.last_change < dead_after


@attrs.frozen
class Observations:
    instance: str  # this agent's
    watch_until: float  # the newcomer's watch ends then (see watch_until)
    published_at: float | None  # this instance's first successful publish (None: not yet)
    continuous_since: float | None  # the start of its lease, valid without a break until now (None: not valid)
    yielded: bool  # the last verdict was "yield"
    foreign: Foreign | None


@attrs.frozen
class Verdict:
    state: str  # watch | hold | ok | incumbent | yield
    publish: bool
    claim: bool  # may claim and take over groups
    run: bool  # may keep running what runs here
    twin: str  # "" or one line about the other agent, for the log, status and metric
    wake_at: float | None = None  # decide again then


def may_release(verdict: Verdict, *, published: bool) -> bool:
    """May this agent end the claims under its node name (a clean shutdown's release)? Not
    before it has ever published (they may be a live namesake's) nor while it yields (they
    are the name's, and the other agent may hold them rightfully)."""
    return published and verdict.state != "yield"


def watch_until(started: float, record: Heartbeat | None, predecessor: str, *, dead_after: float,
                heartbeat: float) -> float:
    """When a newcomer that started at `started` may publish, given its node record at its
    first read: at once if the record is its own predecessor's (the state directory's last
    instance, dead: this agent holds the node's lock) or if there is no record (nobody
    published under this name: a directory store never deletes records, and etcd deletes
    one only with its lease and the claims bound to it; a newcomer starting at the same
    moment is caught during the hold after the first publish); else after dead_after, as
    long as it takes to tell a paused agent from a dead one. (`heartbeat`: unused, kept for
    the callers' symmetry with decide.)"""
    if record is None or (predecessor and record.instance == predecessor):
        return started
    return started + dead_after


def observe(foreign: Foreign | None, record: Heartbeat | None, *, me: str, predecessor: str, now: float,
            published: bool) -> Foreign | None:
    """Fold one sighting of this node's own record into what is known of another writer."""
    if record is None or record.instance == me or (predecessor and record.instance == predecessor):
        return foreign
    if foreign is None or foreign.instance != record.instance:
        return Foreign(instance=record.instance, counter=record.counter, first_seen=now, last_change=now,
                       known_at_start=not published)
    if record.counter != foreign.counter:
        return attrs.evolve(foreign, counter=record.counter, last_change=now, advanced=True)
    return foreign


def decide(obs: Observations, now: float, *, dead_after: float, heartbeat: float) -> Verdict:
    """Is there a twin, and what may this agent do? (See the module docstring.)"""
    f = obs.foreign
    published = obs.published_at is not None
    if f is not None and (f.live(now, dead_after) or obs.yielded):
        who = f"instance {f.instance or '(no id: an older version)'}"
        if f.live(now, dead_after):
            if (
                published and not obs.yielded and obs.continuous_since is not None
                and obs.continuous_since + dead_after <= f.first_seen and not f.known_at_start
            ):
                return Verdict("incumbent", publish=True, claim=False, run=True,
                               twin=f"another agent publishes under this node's name ({who}), after this one: "
                                    "keeping what runs here, claiming nothing",
                               wake_at=f.last_change + dead_after)
            why = "it was there first" if f.known_at_start or not published else "neither can prove it came first"
            return Verdict("yield", publish=False, claim=False, run=False,
                           twin=f"another agent publishes under this node's name ({who}; {why}): "
                                "not publishing, claiming nothing, stopping what runs here",
                           wake_at=f.last_change + dead_after)
        # Yielded, and the other one has gone quiet: resume in turn (see the docstring).
        quiet = dead_after * (1 if obs.instance < f.instance else 2)
        if now - f.last_change < quiet:
            return Verdict("yield", publish=False, claim=False, run=False,
                           twin=f"another agent published under this node's name ({who}) until "
                                f"{now - f.last_change:.2f}s ago: waiting {quiet:g}s before taking the name back",
                           wake_at=f.last_change + quiet)
        return Verdict("ok", publish=True, claim=True, run=True, twin="")
    if not published and now < obs.watch_until:
        return Verdict("watch", publish=False, claim=False, run=True, twin="", wake_at=obs.watch_until)
    if not published and f is not None and now - f.last_change < dead_after:
        # Another instance's record appeared during the watch: it must stand still long enough.
        return Verdict("watch", publish=False, claim=False, run=True, twin="", wake_at=f.last_change + dead_after)
    published_at = obs.published_at  # None: not published (tested so, mypy narrows it)
    if published_at is None:  # the watch is over: publish, and hold claims (below) from then on
        return Verdict("hold", publish=True, claim=False, run=True, twin="")
    if now < published_at + HOLD * heartbeat:
        return Verdict("hold", publish=True, claim=False, run=True, twin="", wake_at=published_at + HOLD * heartbeat)
    return Verdict("ok", publish=True, claim=True, run=True, twin="")
