"""The cltab/hactl importer: the spec it writes loads, and runs what OpenMosix::HA ran."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import spec
from reconciler.spec.importer import CltabError, command_value, convert

from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent

CLTAB = """\
# OpenMosix::HA cltab of a small shop: web, db and a batch group.
:::socket:/var/run/clinit/clinit.s
:::log:/var/log/clinit.log

web:webtest:test:test:/usr/bin/curl -sf http://127.0.0.1:8080/health
web:webfs:start:once:/bin/mount -o noatime /dev/sdb1 /srv/www
web:httpd:start:respawn:/usr/bin/foo --url=http://a:b --listen=0.0.0.0:80
web:oldhttpd:start:off:/usr/sbin/apache1 -X
#web:disabled:start:respawn:/bin/false
db:dbcheck:12:wait:/usr/local/bin/dbcheck && echo checked >> /var/log/dbcheck
db:dbd:2:respawn:exec /usr/sbin/dbd --config=/etc/dbd.conf
db:dbmaint:run,maint:once:/usr/local/bin/vacuum --full
db:dbbackup:2,maint:respawn:/usr/local/bin/backupd
batch:queue:run:respawn:cd /srv/batch && exec ./queue-runner
batch:sweep:run,12:once:/usr/bin/find /tmp -mtime +7 -delete
batch:never:run:off:/bin/true
idle:idler:5:respawn:/bin/sleep 1000
"""

HACTL = """\
# desired level per group
web start
db 2
batch run   # trailing comments are fine
"""


def write_spec(directory: Path, text: str, name: str = "imported.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


# --- the original semantics, computed here without the importer ------------------------


def original_entries(cltab: str) -> list[tuple[str, str, str, str]]:
    """(group, tag, runlevels field, mode) for every entry line of a cltab."""
    out = []
    for line in cltab.splitlines():
        if not line.strip() or line.startswith("#") or line.startswith(":::"):
            continue
        group, tag, field, mode, _cmd = line.split(":", 4)
        out.append((group, tag, field, mode))
    return out


def original_levels(hactl: str) -> dict[str, str]:
    levels = {}
    for line in hactl.splitlines():
        words = line.split("#")[0].split()
        if words:
            levels[words[0]] = words[1]
    return levels


def original_runs(cltab: str, group: str, level: str) -> set[str]:
    """Tags Cluster::Init runs for group at level: whole field equal, or one of its items."""
    if level == "stop":
        return set()
    tags = set()
    for g, tag, field, mode in original_entries(cltab):
        parts = field.split(",") if "," in field else list(field)
        if g == group and mode != "off" and (field == level or level in parts):
            tags.add(tag)
    return tags


def active(loaded: spec.Spec, group: str, level: str) -> set[str]:
    return {e.tag for e in loaded.groups[group].entries if e.active_at(level)}


# --- conversion ---------------------------------------------------------------------


def test_realistic_cltab_loads_and_runs_what_the_original_ran(tmp_path):
    text, notes = convert(CLTAB, HACTL)
    loaded = spec.load(write_spec(tmp_path, text))
    wanted = original_levels(HACTL)
    groups = {g for g, *_ in original_entries(CLTAB)}
    assert list(loaded.groups) == ["web", "db", "batch", "idle"]  # cltab order
    for group in groups:
        level = wanted.get(group, "stop")
        assert loaded.groups[group].runlevel == level
        assert active(loaded, group, level) == original_runs(CLTAB, group, level), group
        # every level the group names behaves as before too, not only today's hactl level
        for other in loaded.groups[group].levels():
            assert active(loaded, group, other) == original_runs(CLTAB, group, other), (group, other)
    assert active(loaded, "web", "start") == {"webfs", "httpd"}
    assert active(loaded, "db", "2") == {"dbcheck", "dbd", "dbbackup"}
    assert active(loaded, "batch", "run") == {"queue", "sweep"}
    assert [e.tag for e in loaded.groups["web"].entries] == ["webtest", "webfs", "httpd", "oldhttpd"]
    assert "disabled" not in {e.tag for g in loaded.groups.values() for e in g.entries}


def test_runlevel_fields_become_level_lists(tmp_path):
    loaded = spec.load(write_spec(tmp_path, convert(CLTAB, HACTL)[0]))
    assert loaded.entry("db", "dbcheck").runlevels == ("1", "2")  # "12": two one-digit levels
    assert loaded.entry("db", "dbmaint").runlevels == ("run", "maint")
    assert loaded.entry("web", "webtest").runlevels == ("test",)  # a whole name, not t, e, s
    assert loaded.entry("batch", "sweep").runlevels == ("run", "12")
    assert loaded.entry("web", "oldhttpd").mode == "off"
    assert loaded.entry("web", "webtest").mode == "test"


def test_commands_keep_colons_and_shell_meaning(tmp_path):
    loaded = spec.load(write_spec(tmp_path, convert(CLTAB, HACTL)[0]))
    assert loaded.entry("web", "httpd").command == ("/usr/bin/foo", "--url=http://a:b", "--listen=0.0.0.0:80")
    assert loaded.entry("db", "dbcheck").command == (
        "/bin/sh",
        "-c",
        "/usr/local/bin/dbcheck && echo checked >> /var/log/dbcheck",
    )
    assert loaded.entry("batch", "queue").command == ("/bin/sh", "-c", "cd /srv/batch && exec ./queue-runner")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("/bin/echo a b", ["/bin/echo", "a", "b"]),
        ("/usr/bin/foo --url=http://a:b", ["/usr/bin/foo", "--url=http://a:b"]),
        ("echo a", "echo a"),  # PATH lookup and builtins stay the shell's business
        ("FOO=1 /bin/x", "FOO=1 /bin/x"),  # an assignment, not a program
        ("/bin/echo *", "/bin/echo *"),
        ("/bin/echo $HOME", "/bin/echo $HOME"),
        ("/bin/echo 'a b'", "/bin/echo 'a b'"),
        ("/bin/x > /dev/null", "/bin/x > /dev/null"),
        ("/bin/x ~/y", "/bin/x ~/y"),
    ],
)
def test_command_value(command, expected):
    assert command_value(command) == expected


def test_notes_report_settings_levels_and_missing_groups():
    _, notes = convert(CLTAB, HACTL)
    text = "\n".join(notes)
    assert "cltab:2: setting socket = '/var/run/clinit/clinit.s' ignored" in text
    assert "cltab:3: setting log" in text
    assert "cltab:10: runlevels '12' read as the levels 1, 2" in text
    assert "group idle is not in hactl: runlevel 'stop'" in text
    assert "webtest listed for 'test'" in text
    assert "[cluster]" in text


def test_notes_are_also_comments_in_the_output():
    text, notes = convert(CLTAB, HACTL)
    for n in notes:
        assert f"#   {n}" in text


def test_hactl_level_no_entry_lists_becomes_stop(tmp_path):
    cltab = "g:a:1:respawn:/bin/sleep 30\n"
    text, notes = convert(cltab, "g 3\n")
    loaded = spec.load(write_spec(tmp_path, text))
    assert loaded.groups["g"].runlevel == "stop"
    assert any("hactl:1: no entry of group g lists level '3'" in n for n in notes)


def test_whole_field_equal_to_the_hactl_level(tmp_path):
    # Cluster::Init: "12" at level "12" runs by equality; "1" does not, nor does "123".
    cltab = "g:a:12:once:/bin/true\ng:b:1:once:/bin/true\ng:c:123:once:/bin/true\ng:d:x,12:once:/bin/true\n"
    loaded = spec.load(write_spec(tmp_path, convert(cltab, "g 12\n")[0]))
    assert loaded.groups["g"].runlevel == "12"
    assert active(loaded, "g", "12") == original_runs(cltab, "g", "12") == {"a", "d"}
    assert active(loaded, "g", "1") == original_runs(cltab, "g", "1") == {"a", "b", "c"}


def test_single_letter_hactl_level_inside_a_word(tmp_path):
    # Cluster::Init ran "start" at level "s" (s is one of its characters): kept for the used level.
    cltab = "g:a:start:respawn:/bin/true\ng:b:s:once:/bin/true\n"
    text, notes = convert(cltab, "g s\n")
    loaded = spec.load(write_spec(tmp_path, text))
    assert active(loaded, "g", "s") == original_runs(cltab, "g", "s") == {"a", "b"}
    assert any("also matched level(s) s" in n for n in notes)


def test_no_hactl_means_every_group_stops(tmp_path):
    text, notes = convert(CLTAB, None)
    loaded = spec.load(write_spec(tmp_path, text))
    assert {g.runlevel for g in loaded.groups.values()} == {"stop"}
    assert any("every group is told 'stop'" in n for n in notes)


def test_stop_level_entries_are_dropped_with_a_note(tmp_path):
    cltab = "g:a:start:respawn:/bin/true\ng:cleanup:stop:wait:/bin/cleanup\ng:both:start,stop:once:/bin/true\n"
    text, notes = convert(cltab, "g start\n")
    loaded = spec.load(write_spec(tmp_path, text))
    assert [e.tag for e in loaded.groups["g"].entries] == ["a", "both"]
    assert loaded.entry("g", "both").runlevels == ("start",)
    assert any("cltab:2: entry cleanup ran only at 'stop': dropped" in n for n in notes)


def test_hactl_group_without_entries_is_noted():
    _, notes = convert("g:a:1:once:/bin/true\n", "g 1\nghost 1\n")
    assert any("hactl:2: group ghost has no entries in cltab: ignored" in n for n in notes)


# --- errors name the file and line ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cltab", "message"),
    [
        ("# c\ng:foo1:1:once:/bin/a\n\ng:foo2:1:once:/bin/b\nh:x:1:once:/bin/c\n\nh:foo1:2:once:/bin/d\n", "cltab:7: duplicate tag foo1 (first on line 2)"),
        ("g:a:1:sysinit:/bin/a\n", "cltab:1: bad mode 'sysinit': must be one of wait, once, respawn, test, off"),
        ("g:a:1:/bin/a\n", "cltab:1: expected group:tag:runlevels:mode:command, found 4 field(s)"),
        ("\n\ng:a\n", "cltab:3: expected group:tag:runlevels:mode:command, found 2 field(s)"),
        ("g:a:1:once:\n", "cltab:1: empty command"),
        ("g:a::once:/bin/a\n", "cltab:1: empty runlevels field"),
        (":a:1:once:/bin/a\n", "cltab:1: group and tag must not be empty"),
        ("g:bad tag:1:once:/bin/a\n", "cltab:1: tag 'bad tag' must be"),
        ("g:a:run level:once:/bin/a\n", "cltab:1: runlevel 'run level' must be"),
        (":::socket\n", "cltab:1: a setting line must be :::name:value"),
    ],
)
def test_cltab_errors(cltab, message):
    with pytest.raises(CltabError) as info:
        convert(cltab, None)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("hactl", "message"),
    [
        ("g 1\n# x\ng 2\n", "hactl:3: group g given twice (first on line 1)"),
        ("g\n", "hactl:1: expected 'group level', found 1 word(s)"),
        ("g 1 2\n", "hactl:1: expected 'group level', found 3 word(s)"),
        ("g bad/level\n", "hactl:1: level 'bad/level' must be"),
    ],
)
def test_hactl_errors(hactl, message):
    with pytest.raises(CltabError) as info:
        convert("g:a:1:once:/bin/true\n", hactl)
    assert str(info.value).startswith(message)


def test_errors_use_the_given_file_names():
    with pytest.raises(CltabError, match=r"^/etc/cltab:2: duplicate tag a \(first on line 1\)$") as info:
        convert("g:a:1:once:/bin/a\ng:a:1:once:/bin/a\n", None, cltab_name="/etc/cltab")
    assert (info.value.file, info.value.line) == ("/etc/cltab", 2)
    with pytest.raises(CltabError, match=r"^/etc/hactl:1: "):
        convert("g:a:1:once:/bin/a\n", "g\n", hactl_name="/etc/hactl")


# --- any cltab of digit sets, names and lists keeps its meaning at the hactl level -----------

_names = st.sampled_from(["1", "2", "3", "12", "123", "run", "start", "s", "maint", "test"])
_fields = st.one_of(
    st.text(alphabet="12345", min_size=1, max_size=4),
    st.sampled_from(["run", "start", "s", "maint", "test", "r1"]),
    st.lists(_names, min_size=2, max_size=3).map(",".join),
)


@settings(max_examples=150, deadline=None)
@given(
    fields=st.lists(st.tuples(_fields, st.sampled_from(["wait", "once", "respawn", "test", "off"])), min_size=1, max_size=6),
    level=_names,
)
def test_any_cltab_runs_the_same_entries_at_its_hactl_level(fields, level):
    cltab = "".join(f"g:t{i}:{f}:{m}:/bin/true\n" for i, (f, m) in enumerate(fields))
    text, _ = convert(cltab, f"g {level}\n")
    with tempfile.TemporaryDirectory() as d:
        loaded = spec.load(write_spec(Path(d), text))
    g = loaded.groups["g"]
    assert active(loaded, "g", g.runlevel) == original_runs(cltab, "g", level)
    for other in g.levels():
        assert active(loaded, "g", other) == original_runs(cltab, "g", other)


# --- round trip: a small cltab of harmless commands ------------------------------------------


def small_cltab(work: Path) -> str:
    return (
        f"rt:toucher:start:wait:touch {work}/touched\n"
        f"rt:sleeper:start:respawn:echo $$ > {work}/sleeper.pid; exec sleep 30\n"
        f"rt:offline:start:off:touch {work}/off-ran\n"
        f"rt:later:2:once:touch {work}/level2-ran\n"
    )


def test_round_trip_spec_is_accepted(tmp_path):
    text, _ = convert(small_cltab(tmp_path), "rt start\n")
    loaded = spec.load(write_spec(tmp_path / "spec", text))
    g = loaded.groups["rt"]
    assert g.runlevel == "start"
    assert [(e.tag, e.mode, e.runlevels) for e in g.entries] == [
        ("toucher", "wait", ("start",)),
        ("sleeper", "respawn", ("start",)),
        ("offline", "off", ("start",)),
        ("later", "once", ("2",)),
    ]
    assert loaded.entry("rt", "toucher").command == ("/bin/sh", "-c", f"touch {tmp_path}/touched")
    assert active(loaded, "rt", "start") == {"toucher", "sleeper"}


@pytest.mark.integration  # runs an agent
def test_round_trip_runs_under_the_agent(tmp_path):
    text, _ = convert(small_cltab(tmp_path), "rt start\n")
    specdir = tmp_path / "spec"
    write_spec(specdir, text)
    write_spec(specdir, f'[cluster]\nstore = "dir:{tmp_path}/store"\nstate_dir = "{tmp_path}/state"\n', "cluster.toml")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", "from reconciler.cli import main; main()", "run", "--once", "--spec", str(specdir), "--node", "n1",
           "--metrics-address", "off"]
    pidfile = tmp_path / "sleeper.pid"
    try:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "touched").exists()
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 5, what="the respawn entry to start")
        assert not (tmp_path / "off-ran").exists()
        assert not (tmp_path / "level2-ran").exists()
    finally:
        if pidfile.exists() and pidfile.read_text().strip():
            pid = int(pidfile.read_text())
            try:
                if "sleep" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
