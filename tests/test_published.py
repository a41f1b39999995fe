"""What a node publishes about itself (reconciler/published.py): one typed record, the same
JSON on the wire as before it was typed, and a malformed one refused with its field path."""

from __future__ import annotations

import json
import logging

import pytest

from reconciler import published
from reconciler.agent import overview
from reconciler.agent import status as statusmod
from reconciler.cluster.survey import Look
from reconciler.decide.plan import Plan
from reconciler.model import Claim, ClusterView, EntryState, Member, Observed
from reconciler.published import EMPTY, EntryStatus, GroupStatus, MemberStatus, NodeStatus, StatusError
from reconciler.spec import Cluster, Entry, Group, Spec
from reconciler.store import Heartbeat, Snapshot
from reconciler.store.factory import open_store

NOW = 500.0

# What node_status published before the record was typed, for the inputs of test_wire_shape
# (written out by hand from agent/status.py as it was): the wire format must not change.
WIRE = {
    "digest": "abc",
    "spec_error": "",
    "spec_revision": 0,
    "state_errors": ["process table: disk full"],
    "store_ok": True,
    "store_error": "",
    "quorum": True,
    "twin": "",
    "store_skipped": ["claims/-x"],
    "members": {"n2": {"alive": True, "up": True}},
    "eligible_groups": ["web"],
    "groups": {
        "web": {
            "desired": "run",
            "owner": "n1",
            "generation": 4,
            "mine": True,
            "actual": "degraded",  # (issue 16: not "run" while r crash-loops)
            "eligible": True,
            "active": True,
            "note": "",
            "entries": {
                "t": {"state": "passed", "exit_code": 0},
                "s": {"state": "running", "pid": 42},
                "r": {"state": "exited", "exit_code": 1, "message": "exit 1", "retry_in": 1.5},
            },
        },
        "db": {
            "desired": "run",
            "owner": None,
            "generation": None,
            "mine": False,
            "actual": "stop",
            "eligible": False,
            "active": False,
            "note": "not allowed here (nodes = n2)",
            "entries": {"d": {"state": "stopped"}},
        },
    },
}


def inputs():
    web = Group(name="web", runlevel="run", entries=(
        Entry(tag="t", runlevels=("run",), mode="test", command=("true",)),
        Entry(tag="s", runlevels=("run",), mode="respawn", command=("true",)),
        Entry(tag="r", runlevels=("run",), mode="respawn", command=("true",))))
    db = Group(name="db", runlevel="run", nodes=("n2",), entries=(Entry(tag="d", runlevels=("run",), command=("true",)),))
    spec = Spec(cluster=Cluster(), groups={"web": web, "db": db})
    obs = Observed(node="n1", entries={
        ("web", "t"): EntryState(group="web", tag="t", state="passed", exit_code=0),
        ("web", "s"): EntryState(group="web", tag="s", state="running", pid=42),
        ("web", "r"): EntryState(group="web", tag="r", state="exited", exit_code=1, message="exit 1", retry_at=NOW + 1.5),
    })
    view = ClusterView(node="n1", members={"n2": Member(name="n2", last_change=NOW)},
                       claims={"web": Claim(group="web", node="n1", generation=4)}, skipped=("claims/-x",))
    plan = Plan(notes={"db": "not allowed here (nodes = n2)"})
    return spec, obs, view, plan


def test_wire_shape():
    spec, obs, view, plan = inputs()
    status = statusmod.node_status(spec, obs, view, plan, NOW, digest="abc", state_errors=("process table: disk full",))
    assert json.loads(published.dumps(status)) == WIRE
    assert published.loads(json.dumps(WIRE)) == status  # and an older node's record reads back


def test_round_trip_and_equal_records_give_equal_text():
    s = NodeStatus(digest="d", members={"n1": MemberStatus(alive=False, up=False)},
                   groups={"g": GroupStatus(eligible=None, entries={"e": EntryStatus(state="error", message="x")})})
    assert published.loads(published.dumps(s)) == s
    assert published.dumps(published.loads(published.dumps(s))) == published.dumps(s)
    assert published.loads("{}") == EMPTY == NodeStatus()


def test_an_older_record_without_the_newer_fields_reads():
    old = {k: v for k, v in WIRE.items() if k not in ("twin", "store_skipped", "state_errors", "spec_revision")}
    old["groups"] = {"web": {k: v for k, v in WIRE["groups"]["web"].items() if k != "active"}}
    s = published.loads(json.dumps(old))
    assert s.twin == "" and s.store_skipped == () and s.state_errors == () and s.groups["web"].active is False
    assert s.spec_revision == 0


@pytest.mark.parametrize("doc, error", [
    ({"groups": {"web": {"entries": {"db": {"state": "bogus"}}}}},
     "status.groups.web.entries.db.state: 'bogus' is not a state"),
    ({"groups": {"web": {"entries": {"db": {}}}}}, "status.groups.web.entries.db.state: is required"),
    ({"groups": {"web": {"entries": {"db": {"state": "running", "pid": "12"}}}}},
     "status.groups.web.entries.db.pid: must be an integer, not a string"),
    ({"groups": {"web": {"eligible": "yes"}}}, "status.groups.web.eligible: must be true or false, not a string"),
    ({"groups": {"web": {"active": 1}}}, "status.groups.web.active: must be true or false, not an integer"),
    ({"groups": {"web": "running"}}, "status.groups.web: must be an object, not a string"),
    ({"groups": ["web"]}, "status.groups: must be an object, not a list"),
    ({"groups": {"-rf": {}}}, "status.groups: '-rf' is not a valid name"),
    ({"groups": {"web": {"owner": 3}}}, "status.groups.web.owner: must be a string, not an integer"),
    ({"groups": {"web": {"generation": True}}}, "status.groups.web.generation: must be an integer, not a boolean"),
    ({"members": {"n1": {"alive": "yes"}}}, "status.members.n1.alive: must be true or false, not a string"),
    ({"eligible_groups": ["web", 1]}, "status.eligible_groups[1]: must be a string, not an integer"),
    ({"eligible_groups": ["--all"]}, "status.eligible_groups[0]: '--all' is not a valid name"),
    ({"state_errors": "disk full"}, "status.state_errors: must be a list of strings, not a string"),
    ({"store_ok": None}, "status.store_ok: must be true or false, not null"),
    ({"s": 1}, "status: unknown field s"),
    ({"groups": {"web": {"pad": "x"}}}, "status.groups.web: unknown field pad"),
    ([1, 2], "status: must be an object, not a list"),
])
def test_a_malformed_record_is_refused_with_its_field_path(doc, error):
    with pytest.raises(StatusError) as info:
        published.loads(json.dumps(doc))
    assert str(info.value).startswith(error) and "\n" not in str(info.value), str(info.value)


def test_not_json_is_refused():
    for raw in (b"not json", b"\xff\xfe", b""):
        with pytest.raises(StatusError, match="^status is not JSON$"):
            published.loads(raw)


def test_a_store_skips_a_status_that_does_not_parse_and_keeps_the_heartbeat(tmp_path, caplog):
    """The record is checked where every store value is (store/records.py): a peer whose
    status has the wrong shape is read with an empty status, listed in Snapshot.skipped."""
    import asyncio

    async def body():
        s = open_store(f"dir:{tmp_path}")
        s.create()
        await s.publish(Heartbeat(node="n1", counter=3, digest="d", status=NodeStatus(digest="d")))
        (tmp_path / "status" / "n1.json").write_text(json.dumps({"groups": {"web": {"eligible": "yes"}}}))
        snap: Snapshot = await s.read()
        await s.close()
        return snap

    with caplog.at_level(logging.WARNING, logger="reconciler.store"):
        snap = asyncio.run(body())
    assert snap.members["n1"].counter == 3 and snap.members["n1"].status == EMPTY
    assert snap.skipped == ("status/n1.json",)
    assert any("status/n1.json: status.groups.web.eligible: must be true or false" in r.getMessage() for r in caplog.records)


def test_cluster_status_reads_the_records():
    spec, obs, view, plan = inputs()
    mine = statusmod.node_status(spec, obs, view, plan, NOW, digest=spec.digest())
    peer = NodeStatus(twin="another agent", groups={"db": GroupStatus(desired="run", note="not allowed")},
                      members={"n1": MemberStatus(alive=False)})
    snap = Snapshot(members={"n1": Heartbeat(node="n1", counter=1, digest=spec.digest(), status=mine),
                             "n2": Heartbeat(node="n2", counter=1, digest="old", status=peer)},
                    claims={"web": Claim(group="web", node="n1", generation=4)})
    # n1's counter moved while status looked: live, whatever n2 publishes about it; n2's stood still
    doc = statusmod.cluster_status(spec, Look(snapshot=snap, ended=NOW, advanced=frozenset({"n1"}), silent={"n2": 9.0}), now=0.0)
    assert doc.nodes["n1"].live is True and doc.nodes["n2"].live is False
    assert doc.nodes["n2"].twin == "another agent" and doc.nodes["n2"].spec_differs is True
    assert doc.nodes["n1"].state_errors == () and doc.nodes["n1"].store_skipped == ("claims/-x",)
    assert overview.to_json(doc)["groups"]["web"]["entries"] == WIRE["groups"]["web"]["entries"]
    assert doc.groups["web"].actual == "degraded" and doc.groups["web"].owner == "n1"
    assert doc.groups["web"].state == "degraded"  # r waits out its backoff
    assert doc.groups["db"].actual == "stop"
    assert doc.groups["db"].notes == {"n1": "not allowed here (nodes = n2)"}  # n2's, not live, is stale
    assert "web" in overview.render(doc, now=0.0)


def test_a_memoised_entry_never_stands_for_a_value_of_another_type():
    ok = {"groups": {"web": {"entries": {"s": {"state": "running", "pid": 1}}}}}
    assert published.loads(json.dumps(ok)).groups["web"].entries["s"] == EntryStatus(state="running", pid=1)
    ok["groups"]["web"]["entries"]["s"]["pid"] = True
    with pytest.raises(StatusError, match=r"^status\.groups\.web\.entries\.s\.pid: must be an integer, not a boolean$"):
        published.loads(json.dumps(ok))
    ok["groups"]["web"]["entries"]["s"]["pid"] = [1]
    with pytest.raises(StatusError, match=r"\.pid: must be an integer, not a list$"):
        published.loads(json.dumps(ok))


# --- the cluster spec's revision record ----------------------------------------------------

REV = published.SpecRevision(number=3, digest="d" * 12, files=(published.SpecFile("a.toml", "# c\n[groups.web]\n"),
                                                               published.SpecFile("b.toml", "")),
                             node="n1", wall=1.5, summary="web: runlevel run -> stop")


def test_a_revision_round_trips():
    assert published.revision_loads(published.revision_dumps(REV)) == REV


@pytest.mark.parametrize("change, error", [
    ({"number": 0}, "spec revision.number: must be at least 1, not 0"),
    ({"files": [{"name": "node.toml", "text": ""}]}, "spec revision.files[0].name: 'node.toml' is not a spec file name"),
    ({"files": [{"name": "../x.toml", "text": ""}]}, "spec revision.files[0].name: '../x.toml' is not a spec file name"),
    ({"files": [{"name": "b.toml", "text": ""}, {"name": "a.toml", "text": ""}]}, "spec revision.files: must be sorted by name"),
    ({"files": [{"name": "a.toml", "text": 1}]}, "spec revision.files[0].text: must be a string, not an integer"),
    ({"extra": 1}, "spec revision"),
])
def test_a_malformed_revision_is_refused_naming_the_field(change, error):
    doc = json.loads(published.revision_dumps(REV)) | change
    with pytest.raises(published.StatusError) as exc:
        published.revision_loads(json.dumps(doc))
    assert str(exc.value).startswith(error), str(exc.value)
