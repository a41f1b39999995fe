"""Whose is a mount or an address (reconciler/decide/ownership.py): a decision table, the
rule's invariants over every combination, and the agent's observer and `--dry-run` giving
the same answer because both call it."""

from __future__ import annotations

import itertools
import json

import attrs
import pytest

from reconciler.act.book import ResourceBook, listed
from reconciler.agent import dryrun
from reconciler.decide import ownership
from reconciler.decide.ownership import LEFT_ALONE, Held, decide
from reconciler.model import Claim, ClusterView, EntryState, Observed
from reconciler.observe.observer import Observer
from reconciler.spec import Address, Cluster, Entry, Group, Mount, Spec

PROC = Entry(tag="app", runlevels=("run",), command=("true",))
DATA = Entry(tag="data", runlevels=("run",), mount=Mount(source="/dev/vdb", target="/srv", fstype="ext4"))
VIP = Entry(tag="vip", runlevels=("run", "maint"), address=Address(ip="192.0.2.10/24", interface="eth0"))
OFF = Entry(tag="spare", runlevels=("run",), mode="off", address=Address(ip="192.0.2.11/24", interface="eth0"))
GONE = Entry(tag="old", runlevels=("run",), address=Address(ip="192.0.2.12/24", interface="eth0"))  # removed from the spec
G = Group(name="web", runlevel="run", entries=(PROC, DATA, VIP, OFF))
MAINT = attrs.evolve(G, runlevel="maint")
STOPPED = attrs.evolve(G, runlevel="stop")

OURS = Held(owned=True, since=5.0)
FAILED = Held(retry_at=9.0, message="busy: pids 12 13")

# (why, entry, group in the spec, kernel (state, message), claimed here, held,
#  -> shown state, shown message, owned, since)
TABLE = [
    ("present and wanted here: ours; found so, its since comes from the file order",
     DATA, G, ("running", ""), True, Held(), "running", "", True, 2e-6),
    ("the third entry in file order", VIP, G, ("running", ""), True, Held(), "running", "", True, 3e-6),
    ("present and wanted, applied by us: keeps its since", DATA, G, ("running", ""), True, OURS, "running", "", True, 5.0),
    ("present on a standby (claimed elsewhere): left alone",
     DATA, G, ("running", ""), False, Held(), "stopped", LEFT_ALONE, False, 0.0),
    ("present, claimed here but runlevel stop, never ours: left alone",
     DATA, STOPPED, ("running", ""), True, Held(), "stopped", LEFT_ALONE, False, 0.0),
    ("present, claimed here, not in this runlevel's entries, never ours: left alone",
     DATA, MAINT, ("running", ""), True, Held(), "stopped", LEFT_ALONE, False, 0.0),
    ("mode off, present, never ours: left alone", OFF, G, ("running", ""), True, Held(), "stopped", LEFT_ALONE, False, 0.0),
    ("ours and no longer wanted (runlevel stop): shown, for the plan to remove",
     DATA, STOPPED, ("running", ""), True, OURS, "running", "", True, 5.0),
    ("ours and the claim lost: shown, for the plan to remove", DATA, G, ("running", ""), False, OURS, "running", "", True, 5.0),
    ("gone while not claimed here (the keeper removed it): not ours any more",
     DATA, G, ("stopped", ""), False, OURS, "stopped", "", False, 5.0),
    ("gone while not claimed here, but a start is in flight: still ours",
     DATA, G, ("stopped", ""), False, Held(owned=True, applying=True, since=5.0), "stopped", "", True, 5.0),
    ("gone while claimed here: still ours (the plan restores it)", DATA, G, ("stopped", ""), True, OURS, "stopped", "", True, 5.0),
    ("never there, never ours", DATA, G, ("stopped", ""), True, Held(), "stopped", "", False, 0.0),
    ("different while wanted: shown (the plan remounts it)",
     DATA, G, ("mismatch", "options differ"), True, Held(), "mismatch", "options differ", False, 0.0),
    ("different, ours, not wanted: shown (the plan removes it)",
     DATA, G, ("mismatch", "options differ"), False, OURS, "mismatch", "options differ", True, 5.0),
    ("someone else's filesystem at the target on a standby: left alone, with the kernel's word",
     DATA, G, ("mismatch", "tmpfs at /srv"), False, Held(), "stopped", "tmpfs at /srv", False, 0.0),
    ("the interface missing on a standby: left alone, with the kernel's word",
     VIP, G, ("error", "no interface eth0"), False, Held(), "stopped", "no interface eth0", False, 0.0),
    ("the interface missing where wanted: an error", VIP, G, ("error", "no interface eth0"), True, Held(),
     "error", "no interface eth0", False, 0.0),
    ("a failed attempt: an error with the executor's message until present",
     DATA, G, ("stopped", ""), True, FAILED, "error", "busy: pids 12 13", False, 0.0),
    ("a failed attempt without a message: the kernel's", VIP, G, ("error", "no interface eth0"), True,
     Held(retry_at=9.0), "error", "no interface eth0", False, 0.0),
    ("a failed attempt wins over leaving it alone", DATA, G, ("mismatch", "tmpfs at /srv"), False, FAILED,
     "error", "busy: pids 12 13", False, 0.0),
    ("present despite a failed attempt: running", DATA, G, ("running", ""), True, FAILED, "running", "", True, 2e-6),
    ("removed from the spec, still ours: shown, for the plan to remove", GONE, G, ("running", ""), True, OURS,
     "running", "", True, 5.0),
    # (the observer asks about a removed entry only while its book says it is ours)
    ("removed from the spec, found present where its runlevel would want it: ours, no since from the file order",
     GONE, G, ("running", ""), True, Held(), "running", "", True, 0.0),
    ("its group removed from the spec, still ours", DATA, None, ("running", ""), True, OURS, "running", "", True, 5.0),
    ("its group removed from the spec, not ours: left alone", DATA, None, ("running", ""), True, Held(),
     "stopped", LEFT_ALONE, False, 0.0),
]


@pytest.mark.parametrize("why, entry, group, kernel, claimed, held, state, message, owned, since", TABLE, ids=[r[0] for r in TABLE])
def test_decision_table(why, entry, group, kernel, claimed, held, state, message, owned, since):
    d = decide("web", entry, group, kernel=kernel, claimed=claimed, held=held)
    assert (d.state.state, d.state.message, d.owned, d.since) == (state, message, owned, since)
    assert d.state == EntryState(group="web", tag=entry.tag, kind=entry.kind, state=state, since=since,
                                 retry_at=held.retry_at, owned=owned, message=message)


KERNEL = [("running", ""), ("stopped", ""), ("mismatch", "differs"), ("error", "no interface")]
HELD = [Held(owned=o, applying=a, since=s, retry_at=r, message="m" if r else "")
        for o, a, s, r in itertools.product((False, True), (False, True), (0.0, 5.0), (None, 9.0))]
CASES = list(itertools.product((DATA, VIP, OFF, GONE), (G, MAINT, STOPPED, None), KERNEL, (False, True), HELD))


def test_invariants():
    for case in CASES:
        _check_invariants(*case)


def _check_invariants(entry, group, kernel, claimed, held):
    d = decide("web", entry, group, kernel=kernel, claimed=claimed, held=held)
    wanted = claimed and group is not None and entry.active_at(group.runlevel)
    # the planner may act only on what is wanted here or ours: anything else shows as stopped
    # (or as a failed attempt of this node's own)
    if not (wanted or d.owned):
        assert d.state.state in ("stopped", "error")
        assert d.state.state == "stopped" or held.retry_at is not None
    # ownership is gained only by finding it present where wanted, lost only when it is gone
    # while the group is not claimed here and nothing is being applied
    if d.owned and not held.owned:
        assert kernel[0] == "running" and wanted
    if held.owned and not d.owned:
        assert kernel[0] == "stopped" and not claimed and not held.applying
    assert d.since == held.since or (held.since == 0.0 and d.owned and entry in group.entries)
    assert d.state.owned == d.owned and d.state.since == d.since and d.state.retry_at == held.retry_at


# --- the agent's observer and the dry run: the same rule ------------------------------------------


class _Supervisor:
    def snapshot(self):
        return {("web", "app"): EntryState(group="web", tag="app", state="running", pid=7)}


SPEC = Spec(cluster=Cluster(), groups={"web": G, "db": attrs.evolve(G, name="db")})


def _kernel(entries):
    return {"data": ("running", ""), "vip": ("mismatch", "prefix /16"), "spare": ("running", "")}


@pytest.mark.parametrize("claimed", [(), ("web",), ("web", "db")])
def test_observer_and_dry_run_agree(claimed):
    book = ResourceBook(node="n1")
    observer = Observer(node="n1", supervisor=_Supervisor(), book=book, read_kernel=_kernel, spec=lambda: SPEC,
                        claimed=lambda: claimed, busy=lambda: {"db"}, blocked=lambda: {"db": (3.0, "fence failed")})
    seen = observer.observe(1.0)
    assert seen.busy == frozenset({"db"}) and seen.blocked == {"db": (3.0, "fence failed")}
    assert seen.entries[("web", "app")].pid == 7

    # the dry run: the raw kernel states, then the rule, with what the agent's book listed
    raw = {(g, e.tag): EntryState(group=g, tag=e.tag, kind=e.kind, state=st, message=msg)
           for g in SPEC.groups for e in SPEC.groups[g].entries if e.kind != "process"
           for st, msg in [_kernel(None).get(e.tag, ("stopped", ""))]}
    view = ClusterView(node="n1", claims={g: Claim(group=g, node="n1", generation=1) for g in claimed})
    shown = dryrun.owned_here(SPEC, Observed(node="n1", entries=raw), view, held={})
    resources = {k: st for k, st in seen.entries.items() if st.kind != "process"}
    assert resources == shown.entries

    # and the observer told the book what it concluded
    for (g, tag), st in resources.items():
        assert book.held(g, tag).owned == st.owned
    assert {g for g, _e in book.owned_entries()} == set(claimed)


def test_book_round_trip_through_the_keepers_listing(tmp_path):
    """What the agent's book lists for the keeper is what the dry run reads back as held."""
    path = tmp_path / "resources.json"
    book = ResourceBook(node="n1", resource_file=path)
    book.record("web", DATA).owned = True
    rec = book.record("web", VIP)
    rec.applying = True
    book.record("web", OFF)  # neither owned nor applying: not listed
    book.save()
    assert listed(path) == {("web", "data"): Held(owned=True), ("web", "vip"): Held(applying=True)}
    assert listed(tmp_path / "missing.json") == {}
    path.write_text(json.dumps({"resources": [{"group": 1}, "x", {"group": "g", "tag": "t"}]}))
    assert listed(path) == {("g", "t"): Held(owned=True)}
    path.write_text("{")
    assert listed(path) == {}


def test_dry_run_shows_what_the_agents_book_holds():
    """A mount this node's agent applied, of a group no longer claimed here: the agent will
    remove it, and the dry run, given its book's listing, says so."""
    raw = {("web", "data"): EntryState(group="web", tag="data", kind="mount", state="running")}
    view = ClusterView(node="n1", claims={"web": Claim(group="web", node="n2", generation=3)})
    obs = Observed(node="n1", entries=raw)
    assert dryrun.owned_here(SPEC, obs, view, held={}).entries[("web", "data")].state == "stopped"
    held = {("web", "data"): ownership.Held(owned=True)}
    assert dryrun.owned_here(SPEC, obs, view, held=held).entries[("web", "data")].state == "running"
