"""`reconcile status`, its pure parts: a group's state (a decision table), the entry lines,
the measured columns, the summary line, what --check fails on, the JSON keys, the look's
rules (decide/view.py) and the overview built from a look (agent/status.py)."""

from __future__ import annotations

import json

import pytest

from reconciler.agent import overview
from reconciler.agent import status as statusmod
from reconciler.agent.overview import (DEGRADED, FAILED, RUNNING, STARTING, STOPPED, STOPPING, UNKNOWN, UNOWNED,
                                       EntryStatus, GroupRow, NodeRow)
from reconciler.cluster.survey import Look
from reconciler.decide import view as rules
from reconciler.model import Claim, Heartbeat, Snapshot
from reconciler.published import GroupStatus, MemberStatus, NodeStatus
from reconciler.spec.model import Cluster, Entry, Group, Spec

RUN = EntryStatus(state="running", pid=7)
LOOPING = EntryStatus(state="exited", exit_code=3, message="exit 3; respawning too rapidly, next try in 2.00s", retry_in=2.0)
EXITED_ONCE = EntryStatus(state="exited", exit_code=0, message="exit 0")  # respawned at once: no backoff
ERROR = EntryStatus(state="error", message="mount: no such device")


@pytest.mark.parametrize("desired, owner, owner_live, actual, entries, failed_everywhere, state", [
    # desired stop
    ("stop", None, False, None, (), False, STOPPED),
    ("stop", "n1", True, "stop", (), False, STOPPED),
    ("stop", "n1", True, "stopping", (RUN,), False, STOPPING),
    ("stop", "n1", False, "run", (RUN,), False, STOPPED),  # its dead owner's keeper stopped it
    # desired run, owned by a live node
    ("run", "n1", True, "run", (RUN,), False, RUNNING),
    ("run", "n1", True, "run", (RUN, LOOPING), False, DEGRADED),
    ("run", "n1", True, "->run", (LOOPING,), False, DEGRADED),
    ("run", "n1", True, "run", (RUN, ERROR), False, DEGRADED),
    ("run", "n1", True, "run", (RUN, EXITED_ONCE), False, RUNNING),  # one exit, respawned at once
    ("run", "n1", True, "->run", (RUN,), False, STARTING),
    ("run", "n1", True, "stop", (), False, STARTING),  # claimed, nothing started yet
    ("run", "n1", True, "stopping", (RUN,), False, STOPPING),
    ("run", "n1", True, "failed", (), False, FAILED),
    ("run", "n1", True, None, (), False, UNKNOWN),  # the owner publishes nothing of it
    ("run", "n1", True, "maint", (RUN,), False, UNKNOWN),
    # nobody runs it
    ("run", None, False, None, (), False, UNOWNED),
    ("run", "n1", False, "run", (RUN,), False, UNOWNED),  # its owner is dead
    ("run", None, False, None, (), True, FAILED),  # its tests failed on every node
    ("run", "n1", False, "failed", (), True, FAILED),
    ("run", "n1", False, "failed", (), False, UNOWNED),  # a dead owner's word counts no more
])
def test_group_state(desired, owner, owner_live, actual, entries, failed_everywhere, state):
    assert overview.group_state(desired=desired, owner=owner, owner_live=owner_live, actual=actual, entries=entries,
                                failed_everywhere=failed_everywhere) == state


@pytest.mark.parametrize("entry, text", [
    (EntryStatus(state="stopped", exit_code=-15, message="stopped (exit -15)"), "exit -15"),
    (EntryStatus(state="stopped"), ""),
    (RUN, "pid 7"),
    (LOOPING, "exit 3; respawning too rapidly, next try in 2.00s"),
    (EntryStatus(state="exited", exit_code=1, message="exit 1", retry_in=1.5), "exit 1, retry in 1.5s"),
    (EntryStatus(state="failed", exit_code=1, message="test failed: exit 1"), "exit 1"),
    (EntryStatus(state="done", exit_code=0, message="exit 0"), "exit 0"),
    (EntryStatus(state="passed", exit_code=0), "exit 0"),
    (EntryStatus(state="running", pid=9, exit_code=1), "pid 9"),
    (ERROR, "mount: no such device"),
])
def test_an_entry_line_says_nothing_twice(entry, text):
    assert overview.entry_detail(entry) == text


def test_columns_are_as_wide_as_their_content():
    lines = overview.table(("NODE", "LIVE", "SPEC"), [("a-very-long-node-name-of-40-characters-x", "yes", "d1"), ("n2", "NO", "d2")])
    assert lines == [
        "NODE" + " " * 36 + "  LIVE  SPEC",
        "a-very-long-node-name-of-40-characters-x  yes   d1",
        "n2" + " " * 38 + "  NO    d2",
    ]


def row(state: str, *, desired: str = "run", failures=()) -> GroupRow:
    return GroupRow(desired=desired, owner="n1", generation=1, actual=desired, state=state, entries={},
                    failures=failures, notes={})


def node(live: bool = True, **kw) -> NodeRow:
    fields = dict(heartbeat_age=0.1, digest="d", spec_differs=False, spec_error="", twin="", state_errors=(), store_skipped=())
    return NodeRow(live=live, **{**fields, **kw})


def test_summary_line_counts_in_a_fixed_order_and_leaves_out_zeros():
    nodes = {"n1": node(), "n2": node(), "n3": node()}
    groups = {"a": row(FAILED), "b": row(RUNNING), "c": row(RUNNING), "d": row(RUNNING), "e": row(RUNNING)}
    assert overview.summary_line(overview.summary(nodes, groups)) == "3 nodes, 3 live; 5 groups: 4 running, 1 failed"
    assert overview.summary_line(overview.summary({"n1": node(False)}, {})) == "1 node, 0 live; 0 groups"


def test_problems_name_what_is_not_as_desired():
    nodes = {"n1": node(), "n2": node(False), "n3": node(twin="instance x"), "n4": node(state_errors=("disk full",))}
    failures = (overview.Failure(node="n1", tag="fit", exit_code=1, since=None),
                overview.Failure(node="n3", tag="fit", exit_code=2, since=None))
    groups = {"ok": row(RUNNING), "off": row(STOPPED, desired="stop"), "loop": row(DEGRADED),
              "bad": row(FAILED, failures=failures), "lost": row(UNOWNED), "late": row(STOPPING, desired="stop")}
    assert overview.problems(nodes, groups) == (
        "node n2: not live",
        "node n3: twin: instance x",
        "node n4: local state: disk full",
        "group loop: degraded, desired run",
        "group bad: failed, desired run (fit failed on n1 (exit 1); fit failed on n3 (exit 2))",
        "group lost: unowned, desired run",
        "group late: stopping, desired stop",
    )
    assert overview.problems({"n1": node()}, {"ok": row(RUNNING), "off": row(STOPPED, desired="stop")}) == ()


def test_the_json_keys_are_the_fields():
    doc = overview.Overview(nodes={"n1": node()}, groups={"g": row(RUNNING)},
                            summary=overview.summary({"n1": node()}, {"g": row(RUNNING)}), problems=())
    out = json.loads(json.dumps(overview.to_json(doc)))
    assert set(out) == {"nodes", "groups", "summary", "problems", "spec_error", "intents"}
    assert out["intents"] == {"maintenance": [], "standby": [], "moves": {}}
    assert set(out["groups"]["g"]) == {"desired", "owner", "generation", "actual", "state", "entries", "failures", "notes",
                                       "group_failures", "bans", "banned_everywhere"}
    assert out["summary"] == {"nodes": 1, "live": 1, "groups": 1, "states": {"running": 1}}


@pytest.mark.parametrize("looked, silences, done", [
    (0.05, [], True),  # every counter moved
    (0.05, [0.05], False),
    (0.30, [0.30], False),  # still, but not for dead_after yet
    (0.30, [5.0], True),  # its wall time says it has been silent longer
    (0.20, [5.0], False),  # ... but a look lasts LOOK_HEARTBEATS heartbeats first
    (0.65, [0.65], True),  # a look of dead_after always ends
    (0.30, [5.0, 0.30], False),
])
def test_when_a_look_ends(looked, silences, done):
    assert rules.look_done(looked, silences, heartbeat=0.1, dead_after=0.65) is done


def test_silence_is_the_look_or_longer():
    assert rules.silence(0.3, None) == 0.3
    assert rules.silence(0.3, 0.1) == 0.3  # its clock may be ahead of ours
    assert rules.silence(0.3, 7.0) == 7.0


# --- the overview from a look --------------------------------------------------------------


def spec() -> Spec:
    fit = Entry(tag="fit", runlevels=("run",), mode="test", command=("true",))
    svc = Entry(tag="svc", runlevels=("run",), mode="respawn", command=("true",))
    return Spec(cluster=Cluster(), groups={
        "web": Group(name="web", runlevel="run", entries=(svc,)),
        "picky": Group(name="picky", runlevel="run", nodes=("n1", "n2"), entries=(fit, svc)),
    })


def published(web: GroupStatus | None = None, picky: GroupStatus | None = None) -> NodeStatus:
    return NodeStatus(groups={k: v for k, v in (("web", web), ("picky", picky)) if v is not None})


def test_a_dead_node_is_not_live_whatever_it_published_and_its_groups_are_unowned():
    s = spec()
    alive_says = NodeStatus(members={"n1": MemberStatus(alive=True)},  # its own opinion, stale
                            groups={"web": GroupStatus(desired="run", actual="run", entries={"svc": RUN})})
    snap = Snapshot(members={"n1": Heartbeat(node="n1", counter=5, wall=990.0, status=alive_says),
                             "n2": Heartbeat(node="n2", counter=9, wall=999.9, status=published())},
                    claims={"web": Claim(group="web", node="n1", generation=3)})
    doc = statusmod.cluster_status(s, Look(snapshot=snap, ended=0.0, advanced=frozenset({"n2"}), silent={"n1": 10.0}), now=1000.0)
    assert not doc.nodes["n1"].live and doc.nodes["n2"].live
    assert doc.nodes["n1"].heartbeat_age == 10.0
    assert doc.groups["web"].state == UNOWNED and doc.groups["web"].owner == "n1"
    assert "node n1: not live" in doc.problems and "group web: unowned, desired run" in doc.problems
    text = overview.render(doc, now=1000.0)
    assert "n1    NO    10s ago" in text
    assert "pid 7" not in text and doc.groups["web"].actual == "stop"  # its last word is stale
    assert text.endswith("\n2 nodes, 1 live; 2 groups: 2 unowned")


def test_a_group_whose_test_fails_on_every_node_that_may_run_it_is_failed_with_each_failure():
    s = spec()
    def picky(n: str, code: int) -> GroupStatus:
        return GroupStatus(desired="run", actual="stop", eligible=False,
                           entries={"fit": EntryStatus(state="failed", exit_code=code, message=f"test failed: exit {code}", since=955.0),
                                    "svc": EntryStatus(state="stopped")})

    members = {
        "n1": Heartbeat(node="n1", counter=1, status=published(picky=picky("n1", 1))),
        "n2": Heartbeat(node="n2", counter=1, status=published(picky=picky("n2", 2))),
        # not allowed (nodes = n1, n2): publishes "not eligible" without running the test
        "n3": Heartbeat(node="n3", counter=1, status=published(picky=GroupStatus(desired="run", actual="stop", eligible=False))),
    }
    look = Look(snapshot=Snapshot(members=members), ended=0.0, advanced=frozenset(members))
    doc = statusmod.cluster_status(s, look, now=1000.0)
    g = doc.groups["picky"]
    assert g.state == FAILED and g.owner is None
    assert [(f.node, f.tag, f.exit_code, f.since) for f in g.failures] == [("n1", "fit", 1, 955.0), ("n2", "fit", 2, 955.0)]
    text = overview.render(doc, now=1000.0)
    assert "  fit  failed  on n1 (exit 1), 45s ago" in text and "  fit  failed  on n2 (exit 2), 45s ago" in text
    assert "3 nodes, 3 live; 2 groups: 1 failed, 1 unowned" in text
    # one node where it may still run: not failed, only unowned while nobody claims it
    members["n2"] = Heartbeat(node="n2", counter=1, status=published(picky=GroupStatus(desired="run", actual="stop", eligible=None)))
    doc = statusmod.cluster_status(s, Look(snapshot=Snapshot(members=members), ended=0.0, advanced=frozenset(members)), now=1000.0)
    assert doc.groups["picky"].state == UNOWNED and [f.node for f in doc.groups["picky"].failures] == ["n1"]


def test_a_crash_looping_entry_makes_its_group_degraded_and_its_line_says_why_once():
    s = spec()
    web = GroupStatus(desired="run", actual="run", mine=True, entries={"svc": LOOPING})
    snap = Snapshot(members={"n1": Heartbeat(node="n1", counter=1, status=published(web=web))},
                    claims={"web": Claim(group="web", node="n1", generation=1)})
    doc = statusmod.cluster_status(s, Look(snapshot=snap, ended=0.0, advanced=frozenset({"n1"})), now=0.0)
    assert doc.groups["web"].state == DEGRADED and doc.groups["web"].actual == "run"
    text = overview.render(doc, now=0.0)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("svc"))
    assert line == "  svc  exited  exit 3; respawning too rapidly, next try in 2.00s"


# --- the look itself (cluster/survey.py), against a store that counts ----------------------


class CountingStore:
    """Reads as a store would: `live` members' counters advance with every read; the others
    stand still, their last heartbeat published `silent_for` seconds ago (wall time)."""

    def __init__(self, live: tuple[str, ...], silent_for: dict[str, float]):
        self.live, self.silent_for, self.reads = live, silent_for, 0

    async def read(self) -> Snapshot:
        import time

        self.reads += 1
        members = {n: Heartbeat(node=n, counter=self.reads, wall=time.time()) for n in self.live}
        members.update({n: Heartbeat(node=n, counter=1, wall=time.time() - age) for n, age in self.silent_for.items()})
        return Snapshot(members=members)


def look(store: CountingStore, dead_after: float = 0.3) -> tuple[Look, float]:
    import asyncio
    import time

    from reconciler.cluster import survey

    t0 = time.monotonic()
    seen = asyncio.run(survey.look(store, heartbeat=0.02, dead_after=dead_after))
    return seen, time.monotonic() - t0


def test_a_look_at_a_live_cluster_ends_at_the_first_read_after_the_first():
    seen, _took = look(store := CountingStore(("n1", "n2"), {}))
    assert seen.advanced == {"n1", "n2"} and seen.silent == {} and store.reads == 2


def test_a_look_waits_out_dead_after_for_a_counter_that_just_stopped_but_not_for_one_long_silent():
    seen, took = look(CountingStore(("n1",), {"n2": 60.0}), dead_after=10.0)
    assert seen.advanced == {"n1"} and seen.silent["n2"] >= 60.0
    assert took < 10.0  # its wall time says long silent: LOOK_HEARTBEATS heartbeats suffice
    seen, took = look(CountingStore(("n1",), {"n2": 0.0}))
    assert seen.advanced == {"n1"} and seen.silent["n2"] >= 0.3 and took >= 0.3


def test_a_failure_is_published_with_its_wall_time_the_same_on_every_pass():
    from reconciler.decide.plan import Plan
    from reconciler.model import ClusterView, EntryState, Observed

    s = spec()
    obs = Observed(node="n1", entries={
        ("picky", "fit"): EntryState(group="picky", tag="fit", state="failed", exit_code=4, since=100.0, message="test failed: exit 4"),
        ("web", "svc"): EntryState(group="web", tag="svc", state="running", pid=5, since=90.0),
    })
    first = statusmod.node_status(s, obs, ClusterView(node="n1"), Plan(), 200.0, digest="d")
    again = statusmod.node_status(s, obs, ClusterView(node="n1"), Plan(), 260.0, digest="d")
    fit = first.groups["picky"].entries["fit"]
    import time

    assert fit.since is not None and abs(fit.since - (time.time() - (time.monotonic() - 100.0))) < 1.0  # wall time
    assert again == first  # an idle node publishes the same record
    assert first.groups["web"].entries["svc"].since is None  # only failures carry a time


def test_the_operators_intents_are_shown():
    from reconciler.agent.status import intent_rows
    from reconciler.published import Intent

    found = {i.key: i for i in (Intent(kind="maintenance", id="a"), Intent(kind="maintenance", id="b", group="web"),
                                Intent(kind="standby", id="c", node="n2"), Intent(kind="move", id="d", group="db", target="n3"))}
    rows = intent_rows(found)
    assert rows == overview.Intents(maintenance=("cluster", "group web"), standby=("n2",), moves={"db": "n3"})
    assert overview.intent_lines(rows) == ["maintenance: cluster, group web (observed only, nothing changed)", "standby: n2",
                                           "moving: db -> n3"]
    assert overview.intent_lines(overview.Intents()) == []
