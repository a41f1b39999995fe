"""Malformed specs always give the one-line error `FILE: FIELD.PATH: message`, never a traceback.

Hypothesis builds a valid spec as a dict, breaks it (wrong types, unknown keys, missing
keys, bad names, durations, modes and signals), renders it with tomli-w and then corrupts
some of the text. Loading must either succeed or raise SpecError whose text is one line that
starts with the file's name. The hand-written cases below pin each documented error.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from reconciler import spec as specmod
from reconciler.spec import SpecError

from helpers import good_spec, spec_error as error_of, write_file as write

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- helpers ------------------------------------------------------------------------------------


def assert_one_line(message: str, file: Path | str) -> None:
    assert message.startswith(f"{file}: "), message
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, repr(message)


# --- the generator ------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["", "0", "1s", "250ms", "-1s", "1.5m", "2h", "10", "1 s", "1d", "TERM", "KILL", "SIGFOO", "stop", "run"]),
    st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.dates(min_value=dt.date(1970, 1, 1), max_value=dt.date(2100, 1, 1)),
)
toml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)),
    max_leaves=6,
)
names = st.one_of(st.from_regex(r"\A[a-z][a-z0-9_.-]{0,8}\Z"), st.text(min_size=1, max_size=10))


@st.composite
def valid_entry(draw, i: int) -> dict:
    e: dict = {
        "tag": f"t{i}",
        "mode": draw(st.sampled_from(specmod.MODES)),
        "runlevels": draw(st.lists(st.sampled_from(["run", "maint"]), min_size=1, max_size=2, unique=True)),
    }
    kind = draw(st.sampled_from(["argv", "shell", "mount", "address"]))
    if kind == "argv":
        e["command"] = ["sleep", "1"]
    elif kind == "shell":
        e["command"] = "echo hi"
    elif kind == "mount":
        e["mount"] = {"source": "/dev/sdz1", "target": "/mnt/x", "fstype": "ext4"}
        e["mode"] = draw(st.sampled_from(["once", "respawn", "off"]))
    else:
        e["address"] = {"ip": "192.0.2.10/24", "interface": "eth0"}
        e["mode"] = draw(st.sampled_from(["once", "respawn", "off"]))
    for key, value in (
        ("stop_timeout", "2s"), ("stop_signal", "INT"), ("min_uptime", "500ms"), ("timeout", "5s"),
        ("env", {"A": "1"}), ("cwd", "/tmp"),
    ):
        if draw(st.booleans()):
            e[key] = value
    return e


@st.composite
def valid_doc(draw) -> dict:
    doc: dict = {}
    if draw(st.booleans()):
        doc["cluster"] = {"name": "fuzz", "store": "dir:store", "state_dir": "state"}
        if draw(st.booleans()):
            doc["cluster"]["timing"] = {"heartbeat": "100ms", "lease": "400ms", "dead_after": "650ms"}
    groups = {}
    for gi in range(draw(st.integers(1, 3))):
        entries = [draw(valid_entry(gi * 10 + i)) for i in range(draw(st.integers(1, 3)))]
        g: dict = {"runlevel": draw(st.sampled_from(["run", "stop"])), "entries": entries}
        g["entries"][0]["runlevels"] = ["run"]
        if draw(st.booleans()):
            g["nodes"] = ["n1", "n2"]
        if draw(st.booleans()):
            g["fence"] = ["/bin/true", "{node}"]
        groups[f"g{gi}"] = g
    doc["groups"] = groups
    return doc


def _paths(obj, prefix=()):
    """Every (path) to a value inside nested dicts/lists, the root included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def broken_doc(draw) -> dict:
    doc = draw(valid_doc())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(doc, path[:-1]), path[-1]
        how = draw(st.sampled_from(["replace", "unknown", "delete", "rename", "name"]))
        if how == "replace":
            parent[key] = draw(toml_values)
        elif how == "unknown" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(toml_values)
        elif how == "delete":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif how == "rename" and isinstance(parent, dict):
            parent[draw(names)] = parent.pop(key)
        elif how == "name" and isinstance(parent, dict) and key in ("tag", "runlevel", "mode"):
            parent[key] = draw(names)
    return doc


@st.composite
def corrupted_text(draw) -> str:
    try:
        text = tomli_w.dumps(draw(broken_doc()))
    except (TypeError, ValueError):  # tomli-w cannot render some values: use a plain break instead
        text = "[groups.g0]\nrunlevel = 1\n"
    for _ in range(draw(st.integers(0, 3))):
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        junk = draw(st.sampled_from(['"', "'", "[", "]", "=", "\n", "#", ",", "{", "}", "\\", "\x00", "é", " ", "[[", "0x"]))
        if op == "insert":
            text = text[:i] + junk + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 5)) :]
        else:
            text = text[:i] + junk + text[i + 1 :]
    return text


# --- properties -----------------------------------------------------------------------------------


@FUZZ
@given(text=corrupted_text())
def test_broken_spec_file_gives_one_line_error(tmp_path, text):
    f = write(tmp_path / "spec.toml", text)
    try:
        specmod.load(f)
    except SpecError as exc:
        assert_one_line(str(exc), f)


@FUZZ
@given(doc=broken_doc())
def test_broken_spec_structure_gives_one_line_error_naming_the_field(tmp_path, doc):
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        assume(False)
    f = write(tmp_path / "spec.toml", text)
    try:
        specmod.load(f)
    except SpecError as exc:
        msg = str(exc)
        assert_one_line(msg, f)
        assert exc.detail, msg


@FUZZ
@given(a=corrupted_text(), b=corrupted_text())
def test_broken_spec_directory_gives_one_line_error(tmp_path, a, b):
    d = tmp_path / "specdir"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    write(d / "a.toml", a)
    write(d / "b.toml", b)
    try:
        specmod.load(d)
    except SpecError as exc:
        msg = str(exc)
        assert any(msg.startswith(f"{d / n}: ") for n in ("a.toml", "b.toml")) or msg.startswith(f"{d}: "), msg
        assert len(msg.splitlines()) == 1, repr(msg)


@FUZZ
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_give_one_line_error(tmp_path, data):
    f = write(tmp_path / "spec.toml", data)
    try:
        specmod.load(f)
    except SpecError as exc:
        assert_one_line(str(exc), f)


# --- each documented error, by hand -------------------------------------------------------------------

GOOD = good_spec(mode="respawn", runlevels=("run", "maint"))


def test_good_spec_loads(tmp_path):
    s = specmod.load(write(tmp_path / "s.toml", GOOD))
    assert list(s.groups) == ["web"]
    e = s.groups["web"].entries[0]
    assert e.command == ("sleep", "100") and e.stop_timeout == 10.0 and e.stop_signal == 15


@pytest.mark.parametrize(
    "text, field, words",
    [
        (GOOD.replace('mode = "respawn"', 'mode = "respawn"\ncolour = "red"'), "groups.web.entries[0]", "unknown field colour"),
        (GOOD.replace('name = "t"', 'name = "t"\nnmae = "x"'), "cluster", "unknown field nmae"),
        (GOOD + "\n[extra]\nx = 1\n", "extra", "unknown table extra"),
        (GOOD.replace('mode = "respawn"', 'mode = "forever"'), "groups.web.entries[0].mode", "must be one of wait, once, respawn, test, off"),
        (GOOD.replace('runlevels = ["run", "maint"]', 'runlevels = ["run"]\nstop_timeout = "10 parsecs"'), "groups.web.entries[0].stop_timeout", "must be a duration"),
        (GOOD.replace('runlevels = ["run", "maint"]', 'runlevels = ["run"]\nstop_timeout = 10'), "groups.web.entries[0].stop_timeout", "must be a duration string"),
        (GOOD.replace('runlevels = ["run", "maint"]', 'runlevels = ["run"]\nstop_signal = "SIGBOGUS"'), "groups.web.entries[0].stop_signal", "signal name"),
        (GOOD.replace('runlevel = "run"', 'runlevel = "party"'), "groups.web.runlevel", "'party' is not a runlevel of any entry (known: run, maint) nor 'stop'"),
        (GOOD.replace('command = ["sleep", "100"]', ""), "groups.web.entries[0].command", "exactly one of command, mount, address"),
        (GOOD.replace('command = ["sleep", "100"]', 'command = []'), "groups.web.entries[0].command", "must not be empty"),
        (GOOD.replace('tag = "server"', 'tag = "bad tag"'), "groups.web.entries[0].tag", "must be 1-64 letters"),
        (GOOD.replace('runlevels = ["run", "maint"]', 'runlevels = ["run", "stop"]'), "groups.web.entries[0].runlevels", "'stop' means nothing runs"),
        (GOOD.replace("[groups.web]", '[groups."we b"]').replace("groups.web.entries", 'groups."we b".entries'), "groups.we b", "group name"),
        (GOOD.replace('name = "t"', 'name = "t"\nstore = "ftp://x"'), "cluster.store", 'must be "dir:PATH"'),
        (GOOD.replace('tag = "server"', 'tag = "server"\nmount = { source = "/dev/x", target = "/mnt" }'), "groups.web.entries[0].command", "(has command, mount)"),
        (GOOD.replace('mode = "respawn"', 'mode = "wait"').replace('command = ["sleep", "100"]', 'mount = { source = "/dev/x", target = "/mnt" }'), "groups.web.entries[0].mode", "mode must be once, respawn or off"),
        (GOOD.replace('command = ["sleep", "100"]', 'mount = { source = "/dev/x", target = "mnt" }'), "groups.web.entries[0].mount.target", "must be an absolute path"),
        (GOOD.replace('command = ["sleep", "100"]', 'address = { ip = "192.0.2.1", interface = "eth0" }'), "groups.web.entries[0].address.ip", "needs a prefix length"),
        (GOOD.replace('runlevel = "run"', 'runlevel = "run"\nfence = ["/sbin/fence"]'), "groups.web.fence", "must pass the dead node"),
        (GOOD.replace('tag = "server"', 'mode = "once"'), "", "not valid TOML"),  # a key given twice
    ],
)
def test_documented_errors(tmp_path, text, field, words):
    f = write(tmp_path / "s.toml", text)
    msg = error_of(f)
    assert_one_line(msg, f)
    assert msg.startswith(f"{f}: {field}: " if field else f"{f}: "), msg
    assert words in msg, msg


def test_missing_required_field(tmp_path):
    f = write(tmp_path / "s.toml", GOOD.replace('tag = "server"\n', ""))
    assert error_of(f) == f"{f}: groups.web.entries[0].tag: is required"


def test_invalid_toml_names_the_file(tmp_path):
    f = write(tmp_path / "s.toml", GOOD + "\n[groups.web\n")
    msg = error_of(f)
    assert_one_line(msg, f)
    assert "not valid TOML" in msg and "line" in msg


def test_unsafe_timing_budget(tmp_path):
    f = write(tmp_path / "s.toml", GOOD.replace('name = "t"', 'name = "t"\n[cluster.timing]\nlease = "400ms"\ndead_after = "500ms"'))
    msg = error_of(f)
    assert msg.startswith(f"{f}: cluster.timing.dead_after: 500ms is unsafe"), msg
    assert "561ms" in msg  # (400 + 50 + 100) x 1.02


def test_heartbeat_must_be_at_most_half_the_lease(tmp_path):
    f = write(tmp_path / "s.toml", GOOD.replace('name = "t"', 'name = "t"\n[cluster.timing]\nheartbeat = "300ms"'))
    assert error_of(f).startswith(f"{f}: cluster.timing.heartbeat: must be at most half of lease")


def test_duplicate_tag_across_files_names_both_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    a = write(d / "a.toml", GOOD)
    b = write(d / "b.toml", GOOD.replace("[cluster]\nname = \"t\"\n", "").replace("web", "api"))
    msg = error_of(d)
    assert_one_line(msg, b)
    assert msg.startswith(f"{b}: groups.api.entries[0].tag: 'server' is already used by"), msg
    assert str(a) in msg and "groups.web.entries[0]" in msg


def test_group_defined_twice_names_both_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    a = write(d / "a.toml", GOOD)
    b = write(d / "b.toml", GOOD.replace("[cluster]\nname = \"t\"\n", "").replace('"server"', '"other"'))
    msg = error_of(d)
    assert msg == f"{b}: groups.web: defined twice: here and in {a}", msg


def test_cluster_defined_twice_names_both_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    a = write(d / "a.toml", GOOD)
    b = write(d / "b.toml", '[cluster]\nname = "again"\n')
    assert error_of(d) == f"{b}: cluster: [cluster] is also defined in {a}"


def test_runlevel_no_entry_mentions_and_tell(tmp_path):
    f = write(tmp_path / "s.toml", GOOD.replace('runlevel = "run"', 'runlevel = "nowhere"'))
    assert "'nowhere' is not a runlevel of any entry" in error_of(f)


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o602])
def test_other_writable_file_refused(tmp_path, mode):
    f = write(tmp_path / "s.toml", GOOD, mode=mode)
    msg = error_of(f)
    assert msg == f"{f}: writable by others (mode {mode:o}): refused"


@pytest.mark.integration
@pytest.mark.needs("root")  # chown
def test_group_writable_file_refused_whatever_the_group(tmp_path):
    # Issue 12: like OpenSSH's StrictModes, a group-writable spec is refused even when the
    # group is root (it used to be accepted: anyone in group 0 could add a command).
    f = write(tmp_path / "s.toml", GOOD, mode=0o664)
    os.chown(f, -1, 0)
    assert error_of(f) == f"{f}: writable by others (mode 664): refused"
    os.chown(f, -1, 4321)
    assert error_of(f) == f"{f}: writable by others (mode 664): refused"


def test_writable_spec_directory_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write(d / "a.toml", GOOD)
    os.chmod(d, 0o777)
    assert error_of(d) == f"{d}: writable by others (mode 777): refused"
    os.chmod(d, 0o755)
    specmod.load(d)


def test_writable_directory_of_a_spec_file_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    f = write(d / "a.toml", GOOD)
    os.chmod(d, 0o757)
    assert error_of(f) == f"{d}: writable by others (mode 757): refused"


@pytest.mark.integration
@pytest.mark.needs("root")  # chown
def test_file_owned_by_someone_else_refused(tmp_path):
    f = write(tmp_path / "s.toml", GOOD)
    os.chown(f, 4321, -1)
    assert error_of(f).startswith(f"{f}: owned by uid 4321")


def test_the_loader_reads_user_and_group(tmp_path):
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    os.chmod(spec_dir, 0o755)
    (spec_dir / "spec.toml").write_text(
        '[cluster]\nname = "t"\nstore = "dir:../store"\nstate_dir = "../state"\n'
        '[groups.g]\nrunlevel = "run"\n'
        '[[groups.g.entries]]\ntag = "id"\nmode = "once"\nrunlevels = ["run"]\ncommand = "id"\nuser = "nobody"\ngroup = "daemon"\n'
    )
    os.chmod(spec_dir / "spec.toml", 0o644)
    e = specmod.load(str(spec_dir)).entry("g", "id")
    assert (e.user, e.group) == ("nobody", "daemon")


def test_missing_path_and_empty_directory(tmp_path):
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such file or directory"
    d = tmp_path / "empty"
    d.mkdir()
    assert error_of(d) == f"{d}: no *.toml files in this directory"


def test_not_utf8(tmp_path):
    f = write(tmp_path / "s.toml", b"[cluster]\nname = \"\xff\xfe\"\n")
    msg = error_of(f)
    assert_one_line(msg, f)


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    f = write(tmp_path / "s.toml", "x = " + "[" * 5000)
    msg = error_of(f)
    assert_one_line(msg, f)
    assert "nested too deeply" in msg


@pytest.mark.parametrize(
    "text",
    [
        '[groups."a\\nb"]\nrunlevel = "stop"\n',
        '[groups.a]\nrunlevel = "stop"\n"x\\ny" = 1\n',
        '["x\\ny"]\n',
        '[groups.a]\nrunlevel = "r"\n[[groups.a.entries]]\ntag = "t"\nrunlevels = ["r"]\ncommand = "x"\nenv = { "A\\nB" = "x" }\n',
        '[groups.a]\nrunlevel = "x\\u2028y"\n',
    ],
)
def test_line_breaks_in_names_are_escaped(tmp_path, text):
    f = write(tmp_path / "s.toml", text)
    assert_one_line(error_of(f), f)


def test_durations():
    assert specmod.parse_duration("250ms") == 0.25
    assert specmod.parse_duration("2s") == 2.0
    assert specmod.parse_duration("1.5m") == 90.0
    assert specmod.parse_duration("1h") == 3600.0
    assert specmod.parse_duration(" 3 s ") == 3.0
    for bad in ("10", 10, 1.5, True, "1d", "-1s", "s", "", "1e3s"):
        with pytest.raises(specmod.model._FieldError):
            specmod.parse_duration(bad)


@pytest.mark.parametrize(
    "drop, field",
    [
        ('runlevels = ["run", "maint"]\n', "groups.web.entries[0].runlevels"),
        ('tag = "server"\n', "groups.web.entries[0].tag"),
    ],
)
def test_each_required_field(tmp_path, drop, field):
    text = GOOD.replace(drop, "")
    if "runlevels" in drop:
        text = text.replace('runlevel = "run"', 'runlevel = "stop"')
    f = write(tmp_path / "s.toml", text)
    assert error_of(f) == f"{f}: {field}: is required"


def test_required_field_of_a_mount(tmp_path):
    f = write(tmp_path / "s.toml", GOOD.replace('command = ["sleep", "100"]', 'mount = { source = "/dev/x" }'))
    assert error_of(f) == f"{f}: groups.web.entries[0].mount.target: is required"


# --- control characters anywhere (issue 12) --------------------------------------------------------------

CONTROL_CHARS = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x1F),
    st.characters(min_codepoint=0x7F, max_codepoint=0x9F),
    st.sampled_from(["\u2028", "\u2029"]),
)


def _field_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


@FUZZ
@given(doc=valid_doc(), data=st.data())
def test_a_control_character_in_any_string_is_refused_naming_its_field(tmp_path, doc, data):
    """NUL and every other control character, in any string value of a valid spec (argv
    elements, shell strings, env values, cwd, mount and address fields, fence argv, node
    names, [cluster] strings): refused with one line naming exactly that value's field."""
    leaves = [p for p in _paths(doc) if p and isinstance(_get(doc, p), str)]
    path = data.draw(st.sampled_from(leaves))
    value = _get(doc, path)
    i = data.draw(st.integers(0, len(value)))
    bad = data.draw(CONTROL_CHARS)
    _get(doc, path[:-1])[path[-1]] = value[:i] + bad + value[i:]
    f = write(tmp_path / "spec.toml", tomli_w.dumps(doc))
    msg = error_of(f)
    assert_one_line(msg, f)
    assert msg.startswith(f"{f}: {_field_path(path)}: "), (path, msg)
