"""Prometheus metrics: the reconcile loop, actions, the cluster, failover phases, the spec.

Names follow Prometheus conventions (reconciler_ prefix, base units, _total counters);
labels are bounded sets (node, group, tag, action kind, state, result, phase), never pids
or messages. Each agent has its own registry, so tests can run several in one process.

(A little over ~400 lines: every metric is declared here, in one registry and one place,
with its help text, so that the names the dashboard, the alerts and docs/operations.md use
are found together.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from wsgiref.simple_server import WSGIServer

import prometheus_client as prom

from reconciler import spec as specmod
from reconciler.act import process
from reconciler.act.executor import Events
from reconciler.decide import intents
from reconciler.decide.intent import Plan
from reconciler.observe import STATES, Observed
from reconciler.store import ClusterView

KINDS = ("start", "stop", "restart", "reset", "claim", "release", "takeover", "handover", "forget")
MOVE_RESULTS = ("done", "refused", "timed_out")  # reconciler_moves_total (issue 15)
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PHASE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, node: str, registry: prom.CollectorRegistry | None = None):
        self.node = node
        r = self.registry = registry or prom.CollectorRegistry()
        L = ["node"]
        self.tick_seconds = prom.Histogram(
            "reconciler_tick_duration_seconds", "Time one reconcile pass took (observe, plan, dispatch).", L, registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.ticks = prom.Counter("reconciler_ticks", "Reconcile passes by result.", L + ["result"], registry=r)
        self.last_ok = prom.Gauge(
            "reconciler_last_successful_tick_timestamp_seconds", "Unix time of the last successful reconcile pass.", L, registry=r
        )
        self.actions = prom.Counter("reconciler_actions", "Actions executed by kind and result.", L + ["kind", "result"], registry=r)
        self.retries = prom.Counter("reconciler_action_retries", "Store calls retried within an action.", L + ["kind"], registry=r)
        self.entries = prom.Gauge("reconciler_entries", "Entries by group and state on this node.", L + ["group", "state"], registry=r)
        self.members_live = prom.Gauge("reconciler_members_live", "Cluster members this node sees alive.", L, registry=r)
        self.groups_owned = prom.Gauge("reconciler_groups_owned", "Groups this node holds the claim of.", L, registry=r)
        self.group_running = prom.Gauge("reconciler_group_running", "1 if the group runs on this node.", L + ["group"], registry=r)
        self.group_desired = prom.Gauge("reconciler_group_desired", "1 if the group's desired runlevel is not stop.", L + ["group"], registry=r)
        self.claims = prom.Counter("reconciler_claims", "Claim attempts by result.", L + ["result"], registry=r)
        self.failovers = prom.Counter("reconciler_failovers", "Groups this node took over from a dead owner.", L + ["group"], registry=r)
        self.phase = prom.Histogram(
            "reconciler_failover_phase_seconds", "Duration of each failover phase: detect, fence, start.", L + ["phase"],
            registry=r, buckets=PHASE_BUCKETS,
        )
        self.events = prom.Counter("reconciler_events", "Events of the cluster's history by result (appended to the store, or dropped).",
                                   L + ["result"], registry=r)
        self.fence = prom.Counter("reconciler_fence", "Fence hook runs by result.", L + ["result"], registry=r)
        self.spec_valid = prom.Gauge("reconciler_spec_valid", "1 if the last spec load succeeded.", L, registry=r)
        self.reloads = prom.Counter("reconciler_spec_reloads", "Spec loads by result.", L + ["result"], registry=r)
        self.spec_info = prom.Info("reconciler_spec", "Digest of the spec this node runs.", L, registry=r)
        self.spec_revision = prom.Gauge(
            "reconciler_spec_revision", "The cluster spec revision this node runs (0: its local files, none from the store).",
            L, registry=r,
        )
        self.respawns = prom.Counter("reconciler_respawns", "Respawns of exited processes.", L + ["group", "tag"], registry=r)
        self.twin = prom.Gauge(
            "reconciler_node_twin", "1 while another agent publishes under this node's name (it claims nothing then).", L,
            registry=r,
        )
        self.skipped = prom.Counter(
            "reconciler_store_entries_skipped", "Malformed or stray store entries skipped, counted at every read.", L,
            registry=r,
        )
        self.store_age = prom.Gauge(
            "reconciler_store_round_trip_age_seconds",
            "Seconds since this node last published its heartbeat and read the store back (counted from the agent's start "
            "until the first round trip).", L, registry=r,
        )
        self.lease_left = prom.Gauge(
            "reconciler_lease_remaining_seconds", "Seconds until this node's lease runs out (0: lapsed, or none held).", L,
            registry=r,
        )
        self._failsafe_metrics()
        # Health (issue 16): labels are bounded (kind: command|tcp|http; result: ok|fail;
        # cause: unhealthy|exit for restarts, decide/health.CAUSES for failures).
        self.probes = prom.Counter("reconciler_probes", "Health probes by group, kind and result.",
                                   L + ["group", "kind", "result"], registry=r)
        self.probe_seconds = prom.Histogram("reconciler_probe_duration_seconds", "How long each health probe took, by kind.",
                                            L + ["kind"], registry=r, buckets=PROBE_BUCKETS)
        self.restarts = prom.Counter(
            "reconciler_restarts", "Restarts of entries by cause: unhealthy (its health probe failed), exit (a respawn).",
            L + ["group", "cause"], registry=r)
        self.failures = prom.Counter(
            "reconciler_group_failures", "Failures of a group on this node, by cause (unhealthy, rapid_exit, start_failed).",
            L + ["group", "cause"], registry=r)
        self.unhealthy = prom.Gauge("reconciler_entry_unhealthy", "1 while the entry's last health probe failed.",
                                    L + ["group", "tag"], registry=r)
        self.banned = prom.Gauge(
            "reconciler_group_banned", "1 while this node is banned from the group (it gave it up: max_failures); 0 if not,"
            " for every group this node may run.", L + ["group"], registry=r)
        self.bans = prom.Counter("reconciler_bans", "Bans of this node from a group (give-ups).", L + ["group"], registry=r)
        # Operator intents (issue 15): see intents_seen and the executor's intent events.
        self.in_maintenance = prom.Gauge(
            "reconciler_groups_in_maintenance", "Groups of the spec this node leaves alone: in maintenance.", L, registry=r)
        self.in_standby = prom.Gauge("reconciler_nodes_in_standby", "Nodes in standby, as this node reads the store.", L,
                                     registry=r)
        self.maintenance_since = prom.Gauge(
            "reconciler_maintenance_started_timestamp_seconds",
            "Unix time the oldest maintenance this node sees was set (its writer's clock; 0: none).", L, registry=r)
        self.moves = prom.Counter("reconciler_moves", "Moves of groups this node ended, by result (done on the target).",
                                  L + ["result"], registry=r)
        self.switchover = prom.Histogram(
            "reconciler_switchover_seconds",
            "A move's phases: stop (the owner: its stop began -> claim handed over), start (the target: the handed "
            "claim first seen -> the group runs there).", L + ["phase"], registry=r, buckets=PHASE_BUCKETS)
        self._intents_shown = True  # the intent gauges are not all zero yet (set at the first pass)
        self._moving: dict[str, float] = {}  # group -> monotonic time its stop for a move (owner) or its arrival (target) began
        self._banned_now: set[str] = set()
        self._probe_children: dict[tuple[str, str, str], tuple] = {}
        self._unhealthy_now: set[tuple[str, str]] = set()
        self._skipped_seen = 0
        self._known_groups: set[str] = set()
        self._banned_values: dict[str, int] = {}  # group -> what reconciler_group_banned says
        self._group_values: dict[str, tuple] = {}  # group -> what its gauges were last set to
        self._pending_start: dict[str, float] = {}
        # group -> (generation of the dead owner's claim, seconds its heartbeat had stood still
        # when the takeover was first dispatched): the detect phase, observed on success
        self._takeover_started: dict[str, tuple[int, float]] = {}
        for k in KINDS:
            for res in ("ok", "error"):
                self.actions.labels(node, k, res)
        for res in ("ok", "error"):
            self.ticks.labels(node, res)
            self.reloads.labels(node, res)
        for res in ("won", "lost"):
            self.claims.labels(node, res)
        for res in MOVE_RESULTS:
            self.moves.labels(node, res)
        self.maintenance_since.labels(node).set(0)
        for res in ("ok", "failed"):
            self.fence.labels(node, res)
        for res in ("appended", "dropped"):
            self.events.labels(node, res)
        self.twin.labels(node).set(0)
        self.skipped.labels(node)

    # --- hooks the agent calls ------------------------------------------------------------

    def spec_running(self, revision: int) -> None:
        """The cluster spec revision this node runs now (0: its local files)."""
        self.spec_revision.labels(self.node).set(revision)

    def spec_loaded(self, spec, *, ok: bool) -> None:
        self.reloads.labels(self.node, "ok" if ok else "error").inc()
        self.spec_valid.labels(self.node).set(1 if ok else 0)
        if spec is not None:
            self.spec_info.labels(self.node).info({"digest": spec.digest()})

    def follow_store(
        self, *, round_trip_at: Callable[[], float], lease_until: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Compute the store-health gauges from `round_trip_at` (when the last publish + read
        came back) and `lease_until`, both on `clock`. At scrape time rather than in tick():
        the renewer thread moves both, and an outage must show as a growing age even while
        no reconcile pass runs."""
        started = clock()
        self.store_age.labels(self.node).set_function(lambda: clock() - max(round_trip_at(), started))
        self.lease_left.labels(self.node).set_function(lambda: max(0.0, lease_until() - clock()))

    def follow_failsafe(self, counters) -> None:
        """Read the failsafe's gauge and counters (cluster/failsafe.Counters) from
        `counters` from now on (until then, and without the failsafe: 0)."""
        self._failsafe = counters

    def _failsafe_metrics(self) -> None:
        """The failsafe's (issue 17), read at scrape time: its thread and the peer endpoint
        count, not the loop. Exported (as 0) with the failsafe off too: one dashboard fits all."""
        self._failsafe = None
        prom.Gauge("reconciler_failsafe_active",
                   "1 while this node runs its groups on its peers' promises (its store renewals fail).", ["node"],
                   registry=self.registry).labels(self.node).set_function(
                       lambda: 1.0 if self._failsafe is not None and self._failsafe.active else 0.0)
        # (counters whose values the failsafe counts: prometheus_client offers no counter read
        # at scrape time, so a small collector reports each)
        for name, doc, attr in (
            ("reconciler_failsafe_promises_asked", "Promises this node asked of its peers while its store renewals failed.", "asked"),
            ("reconciler_failsafe_promises_given", "Promises this node gave to owners that could not reach the store.", "given"),
            ("reconciler_failsafe_promises_refused", "Requests for a promise this node refused (it reached the store, or the "
             "request was forged, replayed, misaddressed or from a stranger).", "refused"),
        ):
            self.registry.register(_CounterOf(name, doc, self.node, self._failsafe_reader(attr)))

    def _failsafe_reader(self, attr: str) -> Callable[[], float]:
        return lambda: float(getattr(self._failsafe, attr)) if self._failsafe is not None else 0.0

    def tick_failed(self, seconds: float) -> None:
        """A reconcile pass that raised."""
        self.tick_seconds.labels(self.node).observe(seconds)
        self.ticks.labels(self.node, "error").inc()

    def tick(
        self, observed: Observed, view: ClusterView, seconds: float, *, groups: Mapping[str, specmod.Group], dead_after: float,
        plan: Plan, busy: Collection[str], skipped_total: int,
    ) -> None:
        """A reconcile pass that planned `plan` for the spec's `groups` from `observed` and
        `view`; `busy`: groups with actions in flight; `skipped_total`: the store's count of
        malformed entries skipped so far."""
        n = self.node
        self.tick_seconds.labels(n).observe(seconds)
        self.ticks.labels(n, "ok").inc()
        self.last_ok.labels(n).set(time.time())
        self.twin.labels(n).set(1 if view.twin else 0)
        self.intents_seen(view, groups)
        if skipped_total > self._skipped_seen:
            self.skipped.labels(n).inc(skipped_total - self._skipped_seen)
        self._skipped_seen = max(self._skipped_seen, skipped_total)
        now = time.monotonic()
        self.members_live.labels(n).set(sum(1 for m in set(view.members) | {n} if view.alive(m, now, dead_after)))
        mine = {g for g, c in view.claims.items() if c.node == n}
        self.groups_owned.labels(n).set(len(mine))
        for gone in self._known_groups - groups.keys():
            self._group_values.pop(gone, None)
            for s in STATES:
                _remove(self.entries, n, gone, s)
            for gauge in (self.group_running, self.group_desired):
                _remove(gauge, n, gone)
        self._known_groups = set(groups)
        states: dict[str, list[str]] = {}
        for st in observed.entries.values():
            states.setdefault(st.group, []).append(st.state)
        for g in groups:
            here = states.get(g, ())
            # What the gauges show, compared first in this cheap form (sorted states):
            # an idle node's groups all match, and the counts per state are built only for
            # a group that changed.
            key = (
                tuple(sorted(here)),
                1 if g in mine and "running" in here else 0,
                0 if groups[g].runlevel == "stop" else 1,
            )
            if self._group_values.get(g) == key:
                continue  # its gauges say so already (a label lookup per gauge is the cost here)
            self._group_values[g] = key
            for s in STATES:
                self.entries.labels(n, g, s).set(key[0].count(s))
            self.group_running.labels(n, g).set(key[1])
            self.group_desired.labels(n, g).set(key[2])
        self._health(observed, groups, now)
        running = {g for g, here in states.items() if "running" in here}
        for g, since in list(self._pending_start.items()):
            if g not in mine:
                del self._pending_start[g]
            elif g in running and not plan.for_group(g) and g not in busy:
                self.phase.labels(n, "start").observe(now - since)
                del self._pending_start[g]

    def _health(self, observed: Observed, groups: Mapping[str, specmod.Group], now: float) -> None:
        n = self.node
        banned = {g for g, until in observed.bans.items() if until > now and g in groups}
        for g in banned - self._banned_now:
            self.bans.labels(n, g).inc()
        for g in groups:  # (an idle node: one dict look-up per group)
            value = 1 if g in banned else 0
            if (not groups[g].nodes or n in groups[g].nodes) and self._banned_values.get(g) != value:
                self.banned.labels(n, g).set(value)
                self._banned_values[g] = value
        for g in set(self._banned_values) - set(groups):
            _remove(self.banned, n, g)
            del self._banned_values[g]
        self._banned_now = banned
        unhealthy = {k for k, p in observed.probes.items() if p.result == "fail"}
        for k in unhealthy - self._unhealthy_now:
            self.unhealthy.labels(n, *k).set(1)
        for k in self._unhealthy_now - unhealthy:
            self.unhealthy.labels(n, *k).set(0)
        self._unhealthy_now = unhealthy

    def probed(self, group: str, kind: str, result: str, seconds: float) -> None:
        # (every probe: 50 a second with 100 groups probed every 2 s; the labelled children
        # are kept rather than looked up under the metric's lock each time)
        key = (group, kind, result)
        children = self._probe_children.get(key)
        if children is None:
            if len(self._probe_children) >= 65536:
                self._probe_children.clear()
            children = self._probe_children[key] = (self.probes.labels(self.node, group, kind, result),
                                                     self.probe_seconds.labels(self.node, kind))
        children[0].inc()
        children[1].observe(seconds)

    def failure(self, group: str, cause: str) -> None:
        self.failures.labels(self.node, group, cause).inc()

    def takeover_dispatched(self, group: str, generation: int, stalled: float) -> None:
        """A takeover of `group` from the dead owner's claim `generation` was dispatched, its
        heartbeat having stood still `stalled` seconds: the detect phase, observed once per
        failover when the takeover succeeds (the first dispatch counts)."""
        if self._takeover_started.get(group, (None,))[0] != generation and stalled != float("inf"):
            self._takeover_started[group] = (generation, stalled)

    def executor_events(self, *, supervisor: process.Supervisor) -> Events:
        """The executor's events that metrics count (`supervisor`: its records say whether a
        start was a respawn). `claimed` is not among them: the agent wires that itself."""
        n = self.node

        def action(a, result, seconds):
            self.actions.labels(n, a.kind, result).inc()
            if a.kind == "stop" and a.reason.startswith("moving to"):
                self._moving.setdefault(a.group, time.monotonic() - seconds)
            if a.kind == "restart":
                self.restarts.labels(n, a.group, "unhealthy").inc()
            elif a.kind == "start" and a.reason.startswith("respawn"):
                self.restarts.labels(n, a.group, "exit").inc()
            if a.kind == "start" and result == "ok":
                rec = supervisor.records.get((a.group, a.tag))
                if rec is not None and rec.respawns and a.reason.startswith("respawn"):
                    self.respawns.labels(n, a.group, a.tag).inc()

        def fenced(group, outcome):
            self.fence.labels(n, "ok" if outcome.ok else "failed").inc()
            self.phase.labels(n, "fence").observe(outcome.seconds)

        def taken_over(group, claim):
            self.failovers.labels(n, group).inc()
            self._pending_start[group] = time.monotonic()
            detect = self._takeover_started.pop(group, None)
            if detect is not None:
                self.detected(detect[1])

        def handed_over(group, claim):
            began = self._moving.pop(group, None)
            if began is not None:
                self.switchover.labels(n, "stop").observe(time.monotonic() - began)

        def intent_ended(intent, result):
            kind = "done" if result.startswith("move done") else "timed_out" if result.startswith("timed out") else "refused"
            self.moves.labels(n, kind).inc()
            began = self._moving.pop(intent.group, None)
            if kind == "done" and began is not None:
                self.switchover.labels(n, "start").observe(time.monotonic() - began)

        return Events(
            action=action, retry=lambda kind: self.retries.labels(n, kind).inc(), fenced=fenced, taken_over=taken_over,
            claim_attempt=lambda group, won: self.claim_attempt(won), handed_over=handed_over, intent_ended=intent_ended,
        )

    def events_appended(self, n: int) -> None:
        self.events.labels(self.node, "appended").inc(n)

    def events_dropped(self, n: int) -> None:
        self.events.labels(self.node, "dropped").inc(n)

    def intents_seen(self, view: ClusterView, groups: Mapping[str, specmod.Group]) -> None:
        """The operator's intents as this pass read them (decide/intents.py)."""
        n = self.node
        found = view.intents
        if not found and not self._intents_shown:
            return  # (the usual case: zero, as set at the start)
        self._intents_shown = bool(found)
        upkeep = [i for i in found.values() if i.kind == "maintenance"]
        self.in_standby.labels(n).set(sum(1 for i in found.values() if i.kind == "standby"))
        self.maintenance_since.labels(n).set(min((i.created for i in upkeep), default=0))
        self.in_maintenance.labels(n).set(sum(1 for g in groups if upkeep and intents.frozen(view, g, view.claims.get(g))))
        for g, c in view.claims.items():  # a claim handed to this node: the start phase of a move begins
            move = found.get(f"move/{g}")
            if c.node == n and move is not None and move.target == n:
                self._moving.setdefault(g, time.monotonic())

    def detected(self, seconds: float) -> None:
        self.phase.labels(self.node, "detect").observe(seconds)

    def claim_attempt(self, won: bool) -> None:
        self.claims.labels(self.node, "won" if won else "lost").inc()

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)


def _remove(metric: prom.Gauge, *labels: str) -> None:
    """Drop one labelled child of `metric`, if it has one (a group removed from the spec)."""
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never set for these labels


def serve(metrics: Metrics, address: str) -> WSGIServer:
    """Serve /metrics on HOST:PORT in a thread; returns the server (shutdown() to stop)."""
    host, _, port = address.rpartition(":")
    server, _thread = prom.start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=metrics.registry)
    return server


class _CounterOf:
    """A counter whose value another object counts (read at scrape time)."""

    def __init__(self, name: str, doc: str, node: str, value: Callable[[], float]):
        self.name, self.doc, self.node, self.value = name, doc, node, value

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.doc, labels=["node"])
        family.add_metric([self.node], self.value())
        yield family

    def describe(self):
        return []
