"""Issue 14: what changed between two specs, in a few words (reconciler/spec/changes.py)."""

from __future__ import annotations

import attrs
from hypothesis import given, strategies as st

from reconciler import spec as specmod
from reconciler.spec.changes import changes, one_line
from reconciler.spec.model import Cluster, Entry, Group, Spec, Timing


def entry(tag: str, **kw) -> Entry:
    return Entry(tag=tag, mode=kw.pop("mode", "respawn"), runlevels=("run", "maint"), command=("sleep", "1"), **kw)


WEB = Group(name="web", runlevel="run", entries=(entry("server"), entry("cron")), nodes=("a", "b"))
DB = Group(name="db", runlevel="stop", entries=(entry("pg"),))
OLD = Spec(cluster=Cluster(name="c"), groups={"web": WEB, "db": DB})


def evolve_group(spec: Spec, name: str, **kw) -> Spec:
    return attrs.evolve(spec, groups={**spec.groups, name: attrs.evolve(spec.groups[name], **kw)})


def test_no_change_and_local_keys_ignored():
    new = attrs.evolve(OLD, cluster=attrs.evolve(OLD.cluster, store="etcd://h:1", state_dir="/x", etcd_user="u"))
    assert changes(OLD, new) == [] and one_line(OLD, new) == "no change"
    moved = evolve_group(OLD, "web", source="other.toml")
    assert changes(OLD, moved) == []


def test_each_kind_of_change():
    assert changes(OLD, evolve_group(OLD, "web", runlevel="maint")) == ["group web: runlevel run -> maint"]
    assert changes(OLD, evolve_group(OLD, "web", nodes=("b", "a"))) == ["group web: nodes a, b -> b, a"]
    assert changes(OLD, evolve_group(OLD, "web", nodes=())) == ["group web: nodes a, b -> any"]
    assert changes(OLD, evolve_group(OLD, "web", failback=True)) == ["group web: failback false -> true"]
    assert changes(OLD, evolve_group(OLD, "web", fence=("ipmi", "{node}"))) == ["group web: fence set"]
    assert changes(OLD, evolve_group(OLD, "web", fence_timeout=30.0)) == ["group web: fence_timeout 10s -> 30s"]
    entries = (entry("server", mode="once"), entry("new"))
    assert changes(OLD, evolve_group(OLD, "web", entries=entries)) == [
        "group web: entry new added",
        "group web: entry cron removed",
        "group web: entry server changed",
    ]
    assert changes(OLD, evolve_group(OLD, "web", entries=WEB.entries[::-1])) == ["group web: entries reordered"]
    new = attrs.evolve(OLD, groups={"web": WEB, "cache": Group(name="cache", runlevel="run", entries=(entry("m"),))})
    assert changes(OLD, new) == ["group cache added (run)", "group db removed"]
    timing = Timing(lease=1.0, dead_after=2.0, clock_slack=0.05)
    new = attrs.evolve(OLD, cluster=Cluster(name="d", stop_all=True, timing=timing))
    assert changes(OLD, new) == [
        "cluster name c -> d",
        "stop_all false -> true",
        "timing.lease 400ms -> 1s",
        "timing.dead_after 650ms -> 2s",
        "timing.clock_slack 0.02 -> 0.05",
    ]
    assert changes(None, OLD) == ["first spec: web, db"]
    assert changes(None, Spec(cluster=Cluster(), groups={})) == ["first spec: no groups"]


def test_one_line():
    assert one_line(OLD, evolve_group(OLD, "web", runlevel="maint")) == "group web: runlevel run -> maint"
    many = attrs.evolve(OLD, groups={f"g{i:02}": attrs.evolve(DB, name=f"g{i:02}") for i in range(20)})
    line = one_line(OLD, many)
    assert len(line) <= 100 and line.startswith("group g00 added (stop); group g01 added (stop)") and line.endswith(" more)")
    long = attrs.evolve(OLD, cluster=Cluster(name="x" * 300))
    assert len(one_line(OLD, long)) <= 100 and one_line(OLD, long).endswith("...")


@given(st.lists(st.sampled_from(["run", "maint", "stop"]), min_size=1, max_size=30), st.integers(20, 200))
def test_one_line_never_too_long(levels, limit):
    new = attrs.evolve(OLD, groups={f"group{i}": attrs.evolve(DB, name=f"group{i}", runlevel=lvl) for i, lvl in enumerate(levels)})
    line = one_line(OLD, new, limit=limit)
    assert len(line) <= limit and "\n" not in line
    if len(changes(OLD, new)) > 1 and "more)" in line:
        shown = line.count(";") + 1
        assert line.endswith(f"(+{len(changes(OLD, new)) - shown} more)") or line.endswith("more)")


def test_from_loaded_specs(tmp_path):
    from helpers import good_spec, write_file as write

    a = specmod.load(write(tmp_path / "a.toml", good_spec()))
    b = specmod.load(write(tmp_path / "b.toml", good_spec().replace('runlevel = "run"', 'runlevel = "stop"', 1)))
    assert changes(a, b) == ["group web: runlevel run -> stop"]
