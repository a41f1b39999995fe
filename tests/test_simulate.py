"""The whole-transition simulator (reconciler/decide/simulate.py): what `reconcile --dry-run`
shows. Worked examples (a fresh spec, a node down, an edit), and properties over random specs
and cluster states: it always terminates converged, its final state plans nothing on any node,
and no group ever runs on two nodes on the way."""

from __future__ import annotations

import attrs
from hypothesis import HealthCheck, given, settings, strategies as st

from reconciler.decide import plan as planmod
from reconciler.decide import simulate as sim
from reconciler.model import Claim, EntryState, Observed
from reconciler.spec import STOP, Cluster, Entry, Group, Spec
from test_plan_properties import LEVELS, groups

NOW = 1000.0


def E(tag: str, mode: str = "respawn", **kw) -> Entry:
    return Entry(tag=tag, runlevels=("run",), mode=mode, command=("true",), **kw)


def spec_of(*gs: Group) -> Spec:
    return Spec(cluster=Cluster(), groups={g.name: g for g in gs})


WEB = Group(name="web", runlevel="run", nodes=("n1", "n2"), entries=(E("fit", "test"), E("prep", "wait"), E("db"), E("app")))


def fresh(*nodes: str) -> sim.ClusterState:
    return sim.ClusterState(observed={n: Observed(node=n) for n in nodes})


def steps(tr: sim.Transition) -> list[tuple[str, str, str]]:
    return [(s.node, s.action.kind, s.action.tag or s.action.group) for s in tr.steps]


def running(tag: str, group: str = "web") -> EntryState:
    return EntryState(group=group, tag=tag, state="running", pid=10)


def test_a_fresh_spec_lists_the_tests_the_claim_and_every_start_in_order():
    tr = sim.simulate(spec_of(WEB), fresh("n1", "n2"), NOW)
    assert steps(tr) == [
        ("n1", "start", "fit"), ("n2", "start", "fit"),  # every candidate runs its leading tests
        ("n1", "claim", "web"),  # the preferred node claims
        ("n1", "start", "prep"), ("n1", "start", "db"), ("n1", "start", "app"),  # in file order
    ]
    assert [s.at for s in tr.steps] == [0.0] * 6  # nothing waits
    assert tr.converged and tr.stopped == "" and tr.placement == {"web": ("n1",)} and not tr.overlaps
    assert tr.final.claims["web"] == Claim(group="web", node="n1", generation=1)
    assert tr.first_notes["n2"] == {"web": "unclaimed; tests have not passed here yet"}


def test_alone_the_second_node_waits_its_turn_then_claims():
    """Only n2 runs an agent: n1 (preferred, never heard from) ranks first, so n2 waits
    dead_after before it claims: the step's time says so."""
    spec = spec_of(WEB)
    tr = sim.simulate(spec, fresh("n2"), NOW)
    assert steps(tr)[:2] == [("n2", "start", "fit"), ("n2", "claim", "web")]
    assert abs(tr.steps[1].at - spec.cluster.timing.dead_after) < 1e-3
    assert tr.placement == {"web": ("n2",)} and tr.converged


def converged_on_n1() -> sim.ClusterState:
    n1 = Observed(node="n1", entries={("web", "fit"): EntryState(group="web", tag="fit", state="passed", since=NOW - 1),
                                      ("web", "prep"): EntryState(group="web", tag="prep", state="done"),
                                      ("web", "db"): running("db"), ("web", "app"): running("app")})
    n2 = Observed(node="n2", entries={("web", "fit"): EntryState(group="web", tag="fit", state="passed", since=NOW - 1)})
    return sim.ClusterState(observed={"n1": n1, "n2": n2}, claims={"web": Claim(group="web", node="n1", generation=4)})


def test_a_converged_cluster_has_no_steps():
    tr = sim.simulate(spec_of(WEB), converged_on_n1(), NOW)
    assert tr.steps == () and tr.converged and tr.placement == {"web": ("n1",)}


def test_node_down_shows_the_takeover_then_the_starts():
    start = converged_on_n1()
    start = attrs.evolve(start, observed={"n2": start.observed["n2"]}, down=frozenset({"n1"}))
    tr = sim.simulate(spec_of(WEB), start, NOW)
    assert steps(tr) == [("n2", "takeover", "web"), ("n2", "start", "prep"), ("n2", "start", "db"), ("n2", "start", "app")]
    assert "owner n1 silent for" in tr.steps[0].action.reason
    assert tr.final.claims["web"].generation == 5 and tr.placement == {"web": ("n2",)}


def test_node_down_with_fencing_shows_the_fence():
    web = attrs.evolve(WEB, fence=("fence-node", "{node}"))
    start = converged_on_n1()
    start = attrs.evolve(start, observed={"n2": start.observed["n2"]}, down=frozenset({"n1"}))
    tr = sim.simulate(spec_of(web), start, NOW)
    assert tr.steps[0].action.kind == "takeover" and tr.steps[0].action.fence == ("fence-node", "n1")


def test_an_edit_shows_its_stops_and_starts():
    """apply --dry-run: the cluster as it runs the old spec, simulated to the new one: an
    entry removed stops, one added starts, and what did not change is left alone."""
    new = attrs.evolve(WEB, entries=(E("fit", "test"), E("prep", "wait"), E("db"), E("cache")))
    tr = sim.simulate(spec_of(new), converged_on_n1(), NOW)
    # (the removed entry's record is then forgotten: a reset, as the agent does it)
    assert steps(tr) == [("n1", "stop", "app"), ("n1", "start", "cache"), ("n1", "reset", "app")]
    assert tr.steps[0].action.reason == "entry removed from the spec"
    stopped = sim.simulate(spec_of(attrs.evolve(WEB, runlevel=STOP)), converged_on_n1(), NOW)
    assert [s for s in steps(stopped) if s[1] != "reset"] == [("n1", "stop", "app"), ("n1", "stop", "db"),  # reverse order
                                                              ("n1", "release", "web")]
    assert {s for s in steps(stopped) if s[1] == "reset"} == {("n1", "reset", "fit"), ("n1", "reset", "prep"), ("n2", "reset", "fit")}
    assert stopped.placement == {"web": ()}


def test_the_step_limit_is_said():
    tr = sim.simulate(spec_of(WEB), fresh("n1", "n2"), NOW, limit=3)
    assert len(tr.steps) == 3 and not tr.converged and tr.stopped == "step limit 3 reached"


# --- properties ------------------------------------------------------------------------------

NODES = ("n1", "n2", "n3")
settings.register_profile("simulate", max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def clusters(draw):
    """A spec (groups with `nodes` lists, failback, runlevels) and a cluster that is
    consistent as a real one is between two passes: each group runs on at most one live node
    (its claim's owner, or anyone while unclaimed), live nodes and dead ones."""
    n = draw(st.integers(1, 3))
    gs = {}
    for i in range(n):
        g = draw(groups(f"g{i}", modes=("respawn", "once", "wait", "test", "off")))
        gs[g.name] = attrs.evolve(g, nodes=tuple(draw(st.lists(st.sampled_from(NODES), unique=True, max_size=3))),
                                  failback=draw(st.booleans()))
    spec = Spec(cluster=Cluster(), groups=gs)
    live = draw(st.lists(st.sampled_from(NODES), unique=True, min_size=1, max_size=3))
    others = [n for n in NODES if n not in live]
    down = draw(st.lists(st.sampled_from(others), unique=True)) if others else []
    observed = {n: {} for n in live}
    claims = {}
    for g in spec.groups.values():
        owner = draw(st.sampled_from([None, *NODES]))
        if owner is not None:
            claims[g.name] = Claim(group=g.name, node=owner, generation=draw(st.integers(1, 5)))
        host = owner if owner in live else draw(st.sampled_from([None, *live])) if owner is None else None
        for e in g.entries:
            for n in live:
                if e.mode == "test" and draw(st.booleans()):
                    observed[n][(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, state="passed", since=NOW - 1)
                elif n == host and e.mode != "test" and draw(st.booleans()):
                    state = {"respawn": "running", "once": "running", "wait": "done", "off": "running"}[e.mode]
                    observed[n][(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, state=state, pid=7, since=NOW - 2)
    return spec, sim.ClusterState(observed={n: Observed(node=n, entries=es) for n, es in observed.items()}, claims=claims,
                             down=frozenset(down))


@settings(settings.get_profile("simulate"))
@given(clusters())
def test_the_simulation_terminates_converged_plans_nothing_after_and_never_runs_a_group_twice(case):
    spec, start = case
    tr = sim.simulate(spec, start, NOW)
    assert tr.converged, (tr.stopped, [s.action.describe() for s in tr.steps[-5:]])
    assert tr.overlaps == (), tr.overlaps
    assert all(len(nodes) <= 1 for nodes in tr.placement.values()), tr.placement
    # The final state: no node plans anything (now, or after any wait).
    again = sim.simulate(spec, tr.final, tr.ended)
    assert again.steps == () and again.converged
    for node, obs in tr.final.observed.items():
        assert planmod.plan(spec, obs, sim._view(spec, tr.final, node, tr.ended, NOW, {}), tr.ended).empty
    # What should run, runs (where a live node may run it).
    for g in spec.groups.values():
        can = [n for n in start.observed if not g.nodes or n in g.nodes]
        wanted = g.runlevel != STOP and any(e.active_at(g.runlevel) and e.mode in ("respawn", "once") for e in g.entries)
        if wanted and can and not any(e.active_at(g.runlevel) and e.mode == "off" for e in g.entries):
            assert tr.final.claims.get(g.name) is not None and tr.final.claims[g.name].node in can, (g, tr.final.claims)


def test_what_is_under_way_is_taken_as_done_and_an_unhealthy_entry_is_restarted_once():
    from reconciler.model import Probe
    from reconciler.spec import Health

    web = attrs.evolve(WEB, entries=(E("fit", "test"), E("prep", "wait"), E("db", health=Health(command=("true",))), E("app")))
    start = converged_on_n1()
    n1 = start.observed["n1"]
    entries = dict(n1.entries)
    entries[("web", "app")] = EntryState(group="web", tag="app", state="stopping", pid=11)
    sick = {("web", "db"): Probe(pid=10, failures=5, result="fail", message="refused")}
    start = attrs.evolve(start, observed={**start.observed, "n1": attrs.evolve(n1, entries=entries, probes=sick)})
    tr = sim.simulate(spec_of(web), start, NOW)
    assert steps(tr) == [("n1", "restart", "db"), ("n1", "start", "app")], steps(tr)
    assert tr.converged and tr.placement == {"web": ("n1",)}


def test_a_move_intent_stops_hands_over_and_starts_on_the_target_then_is_forgotten():
    from reconciler.published import Intent

    move = Intent(kind="move", id="ab12", group="web", target="n2", created=1.0, expires=None, who="cli@h")
    tr = sim.simulate(spec_of(WEB), attrs.evolve(converged_on_n1(), intents={move.key: move}, wall=1.0), NOW)
    kinds = steps(tr)
    # The owner stops the group (reverse order: app, db, then prep's record), hands the claim over; n2 starts it.
    assert kinds.index(("n1", "handover", "web")) > max(i for i, s in enumerate(kinds) if s[:2] == ("n1", "stop"))
    assert ("n2", "start", "app") in kinds and kinds[-1] == ("n2", "forget", "web")  # removed once it runs there
    assert tr.converged and not tr.overlaps and tr.placement == {"web": ("n2",)}
    assert tr.final.claims["web"] == Claim(group="web", node="n2", generation=5) and not tr.final.intents


def test_maintenance_plans_nothing_for_the_group_even_on_a_node_down():
    from reconciler.published import Intent

    upkeep = Intent(kind="maintenance", id="cd34", group="web", who="cli@h")
    start = attrs.evolve(converged_on_n1(), intents={upkeep.key: upkeep})
    down = attrs.evolve(start, observed={"n2": start.observed["n2"]}, down=frozenset({"n1"}))
    tr = sim.simulate(spec_of(WEB), down, NOW)
    assert tr.steps == () and tr.final.claims["web"].node == "n1"
