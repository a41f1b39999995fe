"""Issue 16, "Spec": the `health` table of a process entry and a group's max_failures,
failure_window and ban; every bad input is refused with one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler import spec as specmod
from reconciler.spec import Health

from helpers import good_spec, spec_error, write_file as write

BASE = good_spec()
ENTRY = "groups.web.entries[0]"


def with_health(table: str, group: str = "") -> str:
    return BASE.replace('runlevel = "run"\n', f'runlevel = "run"\n{group}\n', 1) + f"[groups.web.entries.health]\n{table}\n"


def test_defaults(tmp_path: Path) -> None:
    s = specmod.load(write(tmp_path / "s.toml", with_health('http = "http://127.0.0.1:8080/health"')))
    g = s.groups["web"]
    assert g.entries[0].health == Health(http="http://127.0.0.1:8080/health")
    h = g.entries[0].health
    assert (h.interval, h.timeout, h.failures, h.start_period, h.status) == (10.0, 2.0, 3, 0.0, (200, 399))
    assert (g.max_failures, g.failure_window, g.ban) == (None, 600.0, 1800.0)


def test_every_kind_and_the_group_fields(tmp_path: Path) -> None:
    group = 'max_failures = 3\nfailure_window = "5m"\nban = "1h"'
    for table, kind in (
        ('tcp = "[::1]:5432"\ninterval = "1s"\ntimeout = "200ms"\nfailures = 5\nstart_period = "30s"', "tcp"),
        ('command = ["pg_isready", "-q"]', "command"),
        ('command = "test -e /run/ok"', "command"),
        ('http = "http://db.example:8080/x?y=1"\nstatus = [200, 204]', "http"),
    ):
        s = specmod.load(write(tmp_path / "s.toml", with_health(table, group)))
        g = s.groups["web"]
        assert g.entries[0].health is not None and g.entries[0].health.kind == kind
        assert (g.max_failures, g.failure_window, g.ban) == (3, 300.0, 3600.0)


def test_a_spec_without_health_keeps_its_digest() -> None:
    """Unset health fields stay out of the digest: an upgraded node agrees with an older one."""
    import hashlib
    import json

    import attrs

    s = specmod.Spec(cluster=specmod.Cluster(), groups={"web": specmod.Group(name="web", runlevel="run", entries=(
        specmod.Entry(tag="a", runlevels=("run",), command=("true",)),))})
    # (the digest of the cluster-wide part, issue 14: the local keys left out)
    data = {"cluster": {k: v for k, v in attrs.asdict(s.cluster).items() if k not in specmod.LOCAL_KEYS and k != "stop_all"},
            "groups": {n: attrs.asdict(g) for n, g in s.groups.items()}}
    for g in data["groups"].values():
        for k in ("source", "max_failures", "failure_window", "ban"):
            del g[k]
        for e in g["entries"]:
            del e["health"]
    old = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert s.digest() == old


BAD = [
    ('interval = "1s"', f"{ENTRY}.health: needs exactly one of command, tcp, http"),
    ('tcp = "a:1"\nhttp = "http://a/"', f"{ENTRY}.health: needs exactly one of command, tcp, http (has tcp, http)"),
    ('tcp = "localhost"', f"{ENTRY}.health.tcp: 'localhost' is not HOST:PORT (an IPv6 address in brackets: [::1]:80)"),
    ('tcp = "a:70000"', f"{ENTRY}.health.tcp: 'a:70000' is not HOST:PORT (an IPv6 address in brackets: [::1]:80)"),
    ('tcp = "[zz]:80"', f"{ENTRY}.health.tcp: '[zz]:80' is not HOST:PORT (an IPv6 address in brackets: [::1]:80)"),
    ('http = "https://a/"', f"{ENTRY}.health.http: 'https://a/': only http:// URLs are probed"),
    ('http = "http:///x"', f"{ENTRY}.health.http: 'http:///x' has no host"),
    ('http = "http://a:99999/"', f"{ENTRY}.health.http: 'http://a:99999/' is not a URL"),
    ('http = "http://u:p@a/"', f"{ENTRY}.health.http: 'http://u:***@a/': credentials in a probe URL are refused"),
    ('http = "http://a/"\nstatus = [399, 200]', f"{ENTRY}.health.status: must be [LOW, HIGH]"),
    ('http = "http://a/"\nstatus = 200', f"{ENTRY}.health.status: must be [LOW, HIGH]"),
    ('tcp = "a:1"\ninterval = "1s"\ntimeout = "1s"', f"{ENTRY}.health.timeout: 1s must be less than interval (1s)"),
    ('tcp = "a:1"\ninterval = "1s"', f"{ENTRY}.health.timeout: 2s must be less than interval (1s)"),
    ('tcp = "a:1"\ninterval = 10', f"{ENTRY}.health.interval: must be a duration"),
    ('tcp = "a:1"\ninterval = "1ms"', f"{ENTRY}.health.interval: 1ms is out of range"),
    ('tcp = "a:1"\nfailures = 0', f"{ENTRY}.health.failures: 0 is out of range"),
    ('tcp = "a:1"\nfailures = "3"', f"{ENTRY}.health.failures: must be a whole number, not a string"),
    ('tcp = "a:1"\nretries = 3', f"{ENTRY}.health"),
    ('command = []', f"{ENTRY}.health.command: must not be empty"),
]


@pytest.mark.parametrize("table,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_probe_refused(tmp_path: Path, table: str, expected: str) -> None:
    f = write(tmp_path / "s.toml", with_health(table))
    assert spec_error(f).startswith(f"{f}: {expected}")


def test_health_must_be_a_table(tmp_path: Path) -> None:
    f = write(tmp_path / "s.toml", BASE.replace('command = ["sleep", "100"]', 'command = ["sleep", "100"]\nhealth = "http://a/"'))
    assert spec_error(f) == f"{f}: {ENTRY}.health: must be a table, not a string"


@pytest.mark.parametrize("entry,expected", [
    ('mount = { source = "/a", target = "/b", fstype = "none", options = "bind" }', "a mount entry has no health probe"),
    ('address = { ip = "192.0.2.1/24", interface = "lo" }', "an address entry has no health probe"),
    ('mode = "test"\ncommand = "true"', "a test entry is not probed"),
    ('mode = "wait"\ncommand = "true"', "a wait entry is not probed"),
])
def test_health_on_an_entry_that_cannot_have_it(tmp_path: Path, entry: str, expected: str) -> None:
    text = BASE.replace('command = ["sleep", "100"]\n', entry + "\n") + '[groups.web.entries.health]\ntcp = "a:1"\n'
    f = write(tmp_path / "s.toml", text)
    assert spec_error(f) == f"{f}: {ENTRY}.health: {expected}" + (": only process entries do" if "has no" in expected else ": only respawn and once entries run long enough")


@pytest.mark.parametrize("group,expected", [
    ("max_failures = 0", "groups.web.max_failures: 0 is out of range"),
    ("max_failures = 2.5", "groups.web.max_failures: must be a whole number, not a number"),
    ("max_failures = true", "groups.web.max_failures: must be a whole number, not a boolean"),
    ('failure_window = "0s"', "groups.web.failure_window: 0s is out of range"),
    ('ban = "10"', "groups.web.ban: must be a duration"),
    ('ban = "500ms"', "groups.web.ban: 500ms is out of range"),
])
def test_bad_group_fields_refused(tmp_path: Path, group: str, expected: str) -> None:
    f = write(tmp_path / "s.toml", with_health('tcp = "a:1"', group))
    assert spec_error(f).startswith(f"{f}: {expected}")
