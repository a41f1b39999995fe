"""Issue 12, "Validation": every duration has a documented range, every timing the loader
accepts keeps the safety inequality of docs/design.md, and control characters are refused.

The reproduction of item 1 (`clock_slack = -0.9`, `dead_after = "60ms"`: `reconcile check`
said "safe" and two agents ran one group at once) is test_negative_clock_slack_refused.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from reconciler import spec as specmod
from reconciler.spec import loader
from reconciler.spec import ENTRY_RANGES, GROUP_RANGES, TIMING_RANGES, Cluster, Spec, SpecError, Timing

from helpers import good_spec, reconcile, spec_error, write_file as write

ROOT = Path(__file__).resolve().parent.parent

GOOD = good_spec()


def with_timing(table: str) -> str:
    return GOOD.replace('name = "t"\n', f'name = "t"\n[cluster.timing]\n{table}\n')


def error_of(path: Path) -> str:
    msg = spec_error(path)
    assert msg.startswith(f"{path}: "), msg
    return msg


def check(path: Path) -> subprocess.CompletedProcess:
    return reconcile("check", "--spec", str(path))


# --- item 1, reproduced --------------------------------------------------------------------------


def test_negative_clock_slack_refused(tmp_path):
    """Item 1: with clock_slack = -0.9 the inequality's right-hand side shrank to 55 ms, so
    dead_after = 60ms passed as "safe" (and two agents ran one group at once)."""
    f = write(tmp_path / "s.toml", with_timing('clock_slack = -0.9\ndead_after = "60ms"'))
    assert error_of(f) == f"{f}: cluster.timing.clock_slack: -0.9 is out of range: must be at least 0 and at most 0.1"
    p = check(f)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr.strip() == f"reconcile: {f}: cluster.timing.clock_slack: -0.9 is out of range: must be at least 0 and at most 0.1"
    assert "safe" not in p.stdout


def test_an_agent_refuses_to_start_with_a_negative_clock_slack(tmp_path):
    """Item 1 ran two agents on this spec; now neither starts."""
    os.chmod(tmp_path, 0o755)
    f = write(tmp_path / "s.toml", with_timing('clock_slack = -0.9\ndead_after = "60ms"'))
    p = subprocess.run([sys.executable, "-m", "reconciler.cli", "run", "--spec", str(f), "--node", "n1", "--metrics-address", "off"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and p.stderr.strip().endswith(f"reconcile: {f}: cluster.timing.clock_slack: -0.9 is out of range: must be at least 0 and at most 0.1"), p.stderr
    assert not (tmp_path / ".reconciler").exists()  # nothing was set up


def test_digest_of_an_ordinary_spec_is_the_cluster_wide_part(tmp_path):
    """The digest is the one issue 14 defined: the cluster-wide part of the spec only (the
    local keys, such as the store and the state directory, left out; stop_all only when set),
    so nodes that reach the store differently publish the same digest. (It differs from the
    digest of the versions before issue 14, which hashed the local keys too: during a rolling
    upgrade, old and new nodes report each other's spec as different.)"""
    import hashlib
    import json

    import attrs

    os.chmod(tmp_path, 0o755)
    spec = specmod.load(write(tmp_path / "example.toml", (ROOT / "specs" / "example.toml").read_text()))
    cluster = attrs.asdict(spec.cluster)
    data = {
        "cluster": {"name": cluster["name"], "timing": cluster["timing"]},
        "groups": {n: attrs.asdict(g) for n, g in spec.groups.items()},
    }
    for g in data["groups"].values():
        g.pop("source")
        for key in ("max_failures", "failure_window", "ban"):  # issue 16's, unset
            g.pop(key)
        for e in g["entries"]:
            e.pop("health")
    assert spec.digest() == hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def test_zero_retest_refused(tmp_path):
    """Item 1: retest = "0s" re-ran a failing test 2,168 times in 5 s."""
    f = write(tmp_path / "s.toml", with_timing('retest = "0s"'))
    assert error_of(f) == f"{f}: cluster.timing.retest: 0s is out of range: must be at least 1s and at most 1h"
    p = check(f)
    assert p.returncode == 1 and "cluster.timing.retest" in p.stderr, (p.stdout, p.stderr)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0.5", "-0.0001"])
def test_clock_slack_must_be_a_small_finite_number(tmp_path, value):
    f = write(tmp_path / "s.toml", with_timing(f"clock_slack = {value}"))
    assert error_of(f).startswith(f"{f}: cluster.timing.clock_slack: ")


# --- each range, at and beyond both ends ---------------------------------------------------------------

def budget(**fields: float) -> Timing:
    """The default timing with `fields` set; lease and dead_after follow them unless given."""
    t = dict(heartbeat=0.1, lease=0.4, demote_margin=0.1, clock_slack=0.02, kill_slack=0.05, retest=10.0, tick=1.0)
    t.update(fields)
    if "lease" not in fields:
        t["lease"] = max(t["lease"], 2 * t["heartbeat"], t["demote_margin"] + 0.01)
    if "demote_margin" not in fields:
        t["demote_margin"] = min(t["demote_margin"], t["lease"] / 2)
    if "dead_after" not in fields:
        t["dead_after"] = (t["lease"] + t["kill_slack"] + t["heartbeat"]) * (1 + t["clock_slack"]) * 1.01
    return Timing(**t)


def validate_timing(t: Timing) -> str | None:
    try:
        loader.validate(Spec(cluster=Cluster(timing=t), groups={}), "f.toml")
    except SpecError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("field", sorted(TIMING_RANGES))
def test_each_timing_range(field):
    least, most = TIMING_RANGES[field]
    tight = dict(heartbeat=0.01, lease=0.02, demote_margin=0.0, kill_slack=0.02, clock_slack=0.0)
    # Both ends are accepted (dead_after's least only as the bound the inequality makes stricter)...
    at_least = budget(**{**(tight if field in ("heartbeat", "lease", "kill_slack") else {}), field: least})
    if field == "dead_after":
        assert validate_timing(at_least).startswith("f.toml: cluster.timing.dead_after: 50ms is unsafe")
        assert validate_timing(budget(**tight, dead_after=0.0501)) is None
    else:
        assert validate_timing(at_least) is None, (field, least)
    if field == "demote_margin":  # below lease, which is at most 1h too
        assert validate_timing(budget(lease=3600.0, demote_margin=most)).startswith("f.toml: cluster.timing.demote_margin: must be at least 0 and less than lease")
        assert validate_timing(budget(lease=3600.0, demote_margin=most - 0.001)) is None
    else:
        assert validate_timing(budget(**{field: most})) is None, (field, most)
    # ... and anything beyond them is refused, naming the field.
    for value in (least - 0.001, least - 1.0, most + 0.001, most * 10, math.nan, math.inf, -math.inf):
        others = {k: v for k, v in (("lease", 0.4), ("dead_after", 10.0)) if k != field}  # in range, whatever `value`
        msg = validate_timing(budget(**others, **{field: value}))
        assert msg is not None and msg.startswith(f"f.toml: cluster.timing.{field}: ") and "out of range" in msg, (field, value, msg)


@pytest.mark.parametrize(
    "field, least, most",
    [(f, lo, hi) for f, (lo, hi) in ENTRY_RANGES.items()],
)
def test_each_entry_range(tmp_path, field, least, most):
    extra = "" if field != "timeout" else 'mode = "wait"\n'
    for value, ok in ((least, True), (most, True), (most * 2, False)) + (((least / 2, False),) if least else ()):
        f = write(tmp_path / "s.toml", GOOD.replace('runlevels = ["run"]\n', f'runlevels = ["run"]\n{extra}{field} = "{value}s"\n'))
        if ok:
            specmod.load(f)
        else:
            assert error_of(f).startswith(f"{f}: groups.web.entries[0].{field}: "), (field, value)


def test_fence_timeout_range(tmp_path):
    for value, ok in (("50ms", False), ("100ms", True), ("1h", True), ("61m", False)):
        f = write(tmp_path / "s.toml", GOOD.replace('runlevel = "run"\n', f'runlevel = "run"\nfence = ["/bin/true", "{{node}}"]\nfence_timeout = "{value}"\n'))
        if ok:
            specmod.load(f)
        else:
            assert error_of(f) == f"{f}: groups.web.fence_timeout: {value} is out of range: must be at least 100ms and at most 1h"


def test_overflowing_duration_refused(tmp_path):
    f = write(tmp_path / "s.toml", with_timing(f'retest = "{"9" * 400}s"'))
    assert "cluster.timing.retest: " in error_of(f)


def test_ranges_are_the_documented_ones():
    """docs/spec.md states each range; it must be the one the loader enforces."""
    doc = (ROOT / "docs" / "spec.md").read_text()
    for field, (least, most) in TIMING_RANGES.items():
        show = (lambda v: f"{v:g}") if field == "clock_slack" else specmod.format_duration
        row = re.search(rf"^\| `{field}` \| [^|]+ \| ([^|]+) \|", doc, re.M)
        assert row is not None, field
        assert row.group(1).strip() == f"{show(least)} – {show(most)}", (field, row.group(1))
    for field, (least, most) in {**ENTRY_RANGES, **GROUP_RANGES}.items():
        row = re.search(rf"^\| `{field}` \|.*$", doc, re.M)
        assert row is not None and f"{specmod.format_duration(least)} – {specmod.format_duration(most)}" in row.group(0), field


# --- the property: accepted => safe ----------------------------------------------------------------

durations = st.one_of(
    st.floats(min_value=-1.0, max_value=20000.0, allow_nan=False),
    st.sampled_from([0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.4, 0.65, 1.0, 3600.0, 14400.0]),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0]),
)
slacks = st.one_of(st.floats(min_value=-2.0, max_value=1.0), st.sampled_from([-0.9, -0.0, 0.0, 0.02, 0.1, 0.1000001, math.nan, math.inf]))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hb=durations, lease=durations, dm=durations, dead=durations, cs=slacks, ks=durations, retest=durations, tick=durations)
@example(hb=0.1, lease=0.4, dm=0.1, dead=0.06, cs=-0.9, ks=0.05, retest=10.0, tick=1.0)  # item 1
@example(hb=0.1, lease=0.4, dm=0.1, dead=0.65, cs=0.02, ks=0.05, retest=0.0, tick=1.0)  # item 1, retest
@example(hb=0.1, lease=0.4, dm=0.1, dead=0.65, cs=0.02, ks=0.05, retest=10.0, tick=1.0)  # the defaults
def test_every_accepted_timing_is_safe(hb, lease, dm, dead, cs, ks, retest, tick):
    t = Timing(heartbeat=hb, lease=lease, demote_margin=dm, dead_after=dead, clock_slack=cs, kill_slack=ks, retest=retest, tick=tick)
    fields = dict(heartbeat=hb, lease=lease, demote_margin=dm, dead_after=dead, clock_slack=cs, kill_slack=ks, retest=retest, tick=tick)
    preconditions = all(math.isfinite(v) and v >= 0 for v in fields.values()) and cs >= 0
    try:
        loader.validate(Spec(cluster=Cluster(timing=t), groups={}), "f.toml")
    except SpecError as exc:
        msg = str(exc)
        assert "\n" not in msg and re.match(r"^f\.toml: cluster\.timing\.(\w+): ", msg), msg
        assert re.match(r"^f\.toml: cluster\.timing\.(\w+): ", msg).group(1) in TIMING_RANGES
        return
    # accepted: the safety inequality holds, on values the argument of docs/design.md is about
    assert preconditions, fields
    assert dead > (lease + ks + hb) * (1 + cs), fields
    assert hb * 2 <= lease and 0 <= dm < lease
    for f, v in fields.items():
        assert TIMING_RANGES[f][0] <= v <= TIMING_RANGES[f][1], (f, v)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    values=st.fixed_dictionaries({
        f: st.one_of(st.sampled_from(["0s", "1ms", "10ms", "20ms", "50ms", "100ms", "400ms", "650ms", "1s", "2s", "1h", "5h"]),
                     st.integers(0, 5000).map(lambda n: f"{n}ms"))
        for f in TIMING_RANGES if f != "clock_slack"
    }),
    slack=st.one_of(st.floats(-1, 1, allow_nan=False), st.sampled_from(["nan", "inf", "-inf"])),
)
def test_every_timing_the_loader_accepts_from_toml_is_safe(tmp_path, values, slack):
    table = "\n".join(f'{k} = "{v}"' for k, v in values.items()) + f"\nclock_slack = {slack}"
    f = write(tmp_path / "s.toml", with_timing(table))
    try:
        t = specmod.load(f).cluster.timing
    except SpecError as exc:
        assert re.match(rf"^{re.escape(str(f))}: cluster\.timing\.\w+: ", str(exc)), str(exc)
        return
    assert t.clock_slack >= 0 and t.dead_after > (t.lease + t.kill_slack + t.heartbeat) * (1 + t.clock_slack)


# --- control characters ---------------------------------------------------------------------------------

CONTROLS = ["\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029"]


def toml_str(s: str) -> str:
    return '"' + "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else f"\\u{ord(c):04x}" for c in s) + '"'


PLACES = [
    # (how to put BAD in the spec, the field the error must name)
    (lambda b: GOOD.replace('["sleep", "100"]', f'["sleep", {toml_str("1" + b)}]'), "groups.web.entries[0].command[1]"),
    (lambda b: GOOD.replace('["sleep", "100"]', f'[{toml_str("/bin/sl" + b + "eep")}]'), "groups.web.entries[0].command[0]"),
    (lambda b: GOOD.replace('["sleep", "100"]', toml_str("sleep 1" + b + "; id")), "groups.web.entries[0].command"),
    (lambda b: GOOD.replace('runlevels = ["run"]', f'runlevels = ["run"]\nenv = {{ A = {toml_str("x" + b)} }}'), "groups.web.entries[0].env.A"),
    (lambda b: GOOD.replace('runlevels = ["run"]', f'runlevels = ["run"]\ncwd = {toml_str("/tmp" + b)}'), "groups.web.entries[0].cwd"),
    (lambda b: GOOD.replace('runlevels = ["run"]', f'runlevels = ["run"]\nuser = {toml_str("nobody" + b)}'), "groups.web.entries[0].user"),
    (lambda b: GOOD.replace('command = ["sleep", "100"]', f'mount = {{ source = {toml_str("/dev/x" + b)}, target = "/mnt" }}'), "groups.web.entries[0].mount.source"),
    (lambda b: GOOD.replace('command = ["sleep", "100"]', f'mount = {{ source = "/dev/x", target = {toml_str("/mnt" + b)} }}'), "groups.web.entries[0].mount.target"),
    (lambda b: GOOD.replace('command = ["sleep", "100"]', f'mount = {{ source = "/dev/x", target = "/mnt", options = {toml_str("ro" + b)} }}'), "groups.web.entries[0].mount.options"),
    (lambda b: GOOD.replace('command = ["sleep", "100"]', f'mount = {{ source = "/dev/x", target = "/mnt", fstype = {toml_str("ext4" + b)} }}'), "groups.web.entries[0].mount.fstype"),
    (lambda b: GOOD.replace('command = ["sleep", "100"]', f'address = {{ ip = {toml_str("192.0.2.1/24" + b)}, interface = "eth0" }}'), "groups.web.entries[0].address.ip"),
    (lambda b: GOOD.replace('command = ["sleep", "100"]', f'address = {{ ip = "192.0.2.1/24", interface = {toml_str("eth" + b)} }}'), "groups.web.entries[0].address.interface"),
    (lambda b: GOOD.replace('runlevel = "run"\n', f'runlevel = "run"\nfence = ["/bin/true", {toml_str("{node}" + b)}]\n'), "groups.web.fence[1]"),
    (lambda b: GOOD.replace('runlevel = "run"\n', f'runlevel = "run"\nnodes = [{toml_str("n1" + b)}]\n'), "groups.web.nodes"),
    (lambda b: GOOD.replace('name = "t"', f"name = {toml_str('t' + b)}"), "cluster.name"),
    (lambda b: GOOD.replace('name = "t"', f'name = "t"\nstate_dir = {toml_str("/var/x" + b)}'), "cluster.state_dir"),
    (lambda b: GOOD.replace('name = "t"', f'name = "t"\netcd_user = {toml_str("u" + b)}'), "cluster.etcd_user"),
    (lambda b: GOOD.replace('name = "t"', f'name = "t"\netcd_password = {toml_str("p" + b)}'), "cluster.etcd_password"),
    (lambda b: GOOD.replace('tag = "server"', f"tag = {toml_str('server' + b)}"), "groups.web.entries[0].tag"),
    (lambda b: GOOD.replace("[groups.web]", f"[groups.{toml_str('web' + b)}]").replace("[[groups.web.entries]]", f"[[groups.{toml_str('web' + b)}.entries]]"), "groups.web"),
]


@pytest.mark.parametrize("bad", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
@pytest.mark.parametrize("place", range(len(PLACES)))
def test_control_characters_refused(tmp_path, place, bad):
    make, field = PLACES[place]
    f = write(tmp_path / "s.toml", make(bad))
    msg = error_of(f)
    assert msg.startswith(f"{f}: {field}"), msg
    if field != "groups.web" and "tag" not in field and "interface" not in field and "nodes" not in field and "ip" not in field:
        assert "control character" in msg, msg


def test_control_characters_in_user_and_group_of_a_spec_built_in_code():
    e = specmod.Entry(tag="t", runlevels=("run",), command=("true",), user="nobody\x00")
    g = specmod.Group(name="g", runlevel="run", entries=(e,), source="f.toml")
    with pytest.raises(SpecError) as info:
        loader.validate(Spec(cluster=Cluster(), groups={"g": g}), "f.toml")
    assert str(info.value) == "f.toml: groups.g.entries[0].user: contains the control character \\x00: refused"


def test_trailing_newline_in_a_name_refused():
    assert specmod.NAME_RE.match("web\n") is None and specmod.NAME_RE.match("web")


def test_nul_in_env_refused_by_check(tmp_path):
    """Item 10: NUL bytes in `env` passed `check`."""
    f = write(tmp_path / "s.toml", GOOD.replace('runlevels = ["run"]', 'runlevels = ["run"]\nenv = { A = "x\\u0000y" }'))
    p = check(f)
    assert p.returncode == 1 and p.stderr.strip() == f"reconcile: {f}: groups.web.entries[0].env.A: contains the control character \\x00: refused", p.stderr


# --- the empty spec, as `reconcile check` and loader.check_replacement see it ------------------------


def test_check_warns_about_an_empty_spec(tmp_path):
    os.chmod(tmp_path, 0o755)
    f = write(tmp_path / "s.toml", "")
    p = check(f)
    assert p.returncode == 0, p.stderr
    assert p.stderr == (
        f"reconcile: warning: {f}: groups: no groups: a running agent refuses this spec, which would stop every group"
        " that runs, and keeps its last good one; set stop_all = true in [cluster] to stop them all\n"
    )
    f = write(tmp_path / "s.toml", "[cluster]\nstop_all = true\n")
    p = check(f)
    assert p.returncode == 0 and "cluster.stop_all: true" in p.stderr, p.stderr
    assert check(write(tmp_path / "s.toml", GOOD)).stderr == ""


def _spec(groups: dict[str, str], stop_all: bool = False) -> Spec:
    return Spec(
        cluster=Cluster(stop_all=stop_all),
        groups={n: specmod.Group(name=n, runlevel=lvl, source="f.toml") for n, lvl in groups.items()},
    )


@pytest.mark.parametrize(
    "current, new, stop_all, refused",
    [
        ({"web": "run"}, {}, False, True),  # : > spec.toml
        ({"web": "run", "db": "run"}, {"other": "stop"}, False, True),  # every running group gone
        ({"web": "run"}, {}, True, False),  # the operator says so
        ({"web": "run", "db": "run"}, {"db": "run"}, False, False),  # some remain
        ({"web": "run"}, {"web": "stop"}, False, False),  # stopped by name: explicit
        ({"web": "stop"}, {}, False, False),  # nothing ran
        ({}, {}, False, False),  # nothing at all
    ],
)
def test_check_replacement(current, new, stop_all, refused):
    try:
        loader.check_replacement(_spec(current), _spec(new, stop_all), "/etc/reconciler/")
    except SpecError as exc:
        assert refused, str(exc)
        assert str(exc).startswith("/etc/reconciler/: groups: would stop every group that runs (")
        return
    assert not refused
