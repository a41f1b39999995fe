"""Issue 14: the spec's texts on disk (reconciler/spec/files.py): what a revision of a spec
holds, when a node's files are in step with one, and writing one back (atomic, nothing lost)."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

from hypothesis import given, strategies as st

from reconciler import spec as specmod
from reconciler.published import SpecFile
from reconciler.spec import files, loader
from reconciler.spec.local import NODE_FILE, strip_local

from helpers import good_spec, write_file as write
from test_spec_local import FAST, error  # (the one-line SpecError of a call; the property tests' settings)

GOOD = good_spec()
LOCAL = 'store = "dir:/var/lib/x"\nstate_dir = "st"\n'
WITH_LOCAL = GOOD.replace('name = "t"\n', f'name = "t"\n{LOCAL}')
DB = '# the database\n[groups.db]\nrunlevel = "stop"\n'


def in_step(spec_path, revision_files) -> bool:
    return files.read_stripped(spec_path) == files.comparable(revision_files, files.layout(spec_path))


def test_layout(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    assert files.layout(d) == files.Layout(path=str(d), directory=True)
    assert files.layout(tmp_path / "s.toml").name == "s.toml" and not files.layout(tmp_path / "s.toml").directory
    assert files.layout(tmp_path / "reconciler.conf").name == "spec.toml"
    assert files.layout(tmp_path / "node.toml").name == "spec.toml"
    assert files.layout(str(tmp_path / "new") + "/").directory


def test_revision_files_dir(tmp_path):
    d = tmp_path / "d"
    write(d / "b.toml", WITH_LOCAL)
    write(d / "a.toml", DB)
    write(d / NODE_FILE, '[cluster]\netcd_user = "u"\n')
    write(d / ".hidden.toml", "x = 1\n")
    write(d / "notes.txt", "x")
    got = files.revision_files(d)
    assert got == (SpecFile(name="a.toml", text=DB), SpecFile(name="b.toml", text=GOOD))
    assert files.read_stripped(d) == {"a.toml": DB, "b.toml": GOOD}
    assert files.files_local(d) == {"store": "dir:/var/lib/x", "state_dir": "st"}


def test_revision_files_one_file(tmp_path):
    f = write(tmp_path / "reconciler.conf", WITH_LOCAL)
    assert files.revision_files(f) == (SpecFile(name="spec.toml", text=GOOD),)
    assert in_step(f, [SpecFile("spec.toml", GOOD)]) and in_step(f, [("zz.toml", GOOD)])
    assert not in_step(f, [("a.toml", GOOD.replace('"run"', '"stop"', 1))])


def test_read_refuses_untrusted_files(tmp_path):
    d = tmp_path / "d"
    write(d / "a.toml", GOOD, mode=0o666)
    assert "writable by others" in error(files.read_stripped, d)


def test_comparable_and_concatenate():
    pairs = [("b.toml", DB), ("a.toml", "[cluster]\nname = \"x\"")]
    d = files.Layout(path="/x", directory=True)
    one = files.Layout(path="/x/s.toml", directory=False, name="s.toml")
    assert files.comparable(pairs, d) == {"a.toml": '[cluster]\nname = "x"', "b.toml": DB}
    assert files.comparable(pairs, one) == {"s.toml": '[cluster]\nname = "x"\n' + DB}
    assert files.concatenate([("a.toml", "x")]) == "x"  # one file: its text exactly
    assert files.concatenate([]) == ""
    assert "not a spec file name" in error(files.comparable, [("../etc/passwd", "")], d)
    assert "not a spec file name" in error(files.comparable, [("node.toml", "")], d)


def test_concatenation_that_changes_the_meaning_is_refused():
    # b.toml starts with top-level keys: after a.toml's [groups.web] they would belong to it
    pairs = [("a.toml", GOOD), ("b.toml", 'groups.db.runlevel = "stop"\n')]
    assert "would mean something else" in error(files.check_concatenation, pairs, origin="revision 4")
    twice = [("a.toml", '[groups.web]\nrunlevel = "stop"\n'), ("b.toml", '[groups.web]\nrunlevel = "run"\n')]
    assert error(files.check_concatenation, twice, origin="revision 4") == (
        "revision 4/b.toml: groups.web: also defined in another file: the files cannot be joined into one"
    )
    ok = [("a.toml", GOOD), ("b.toml", DB), ("c.toml", "[cluster.timing]\nretest = \"20s\"\n")]
    assert tomllib.loads(files.check_concatenation(ok, origin="r")) == {
        **tomllib.loads(GOOD) | {"cluster": {"name": "t", "timing": {"retest": "20s"}}},
        "groups": {**tomllib.loads(GOOD)["groups"], "db": {"runlevel": "stop"}},
    }


group_texts = st.lists(
    st.tuples(
        st.from_regex(r"\A[a-z]{1,6}\Z"),
        st.sampled_from(["", "# c\n", "\n\n"]),
        st.booleans(),
    ),
    max_size=4,
    unique_by=lambda t: t[0],
)


@FAST
@given(group_texts)
def test_concatenation_of_table_files_means_the_same(groups):
    """Property: files that each hold [groups.NAME] tables (with or without a last line
    break) join into one text that means what they mean apart; comparable agrees."""
    pairs = [(f"{name}.toml", f'{head}[groups.{name}]\nrunlevel = "stop"' + ("\n" if nl else "")) for name, head, nl in groups]
    text = files.check_concatenation(pairs, origin="r")
    assert tomllib.loads(text) == ({"groups": {n: {"runlevel": "stop"} for n, _h, _nl in groups}} if groups else {})
    assert files.comparable(pairs, files.Layout(path="s.toml", directory=False, name="s.toml")) == {"s.toml": text}
    assert files.texts_hash({"s.toml": text}) == files.texts_hash({"s.toml": text})


def test_texts_hash():
    a = files.texts_hash({"a.toml": "x", "b.toml": "y"})
    assert a == files.texts_hash({"b.toml": "y", "a.toml": "x"}) and len(a) == 64
    assert a != files.texts_hash({"a.toml": "xb.toml", "": "y"}) and a != files.texts_hash({"a.toml": "y", "b.toml": "x"})


# --- write_back --------------------------------------------------------------------------------


def test_write_back_dir(tmp_path):
    d = tmp_path / "d"
    write(d / "a.toml", WITH_LOCAL, mode=0o640)
    write(d / "old.toml", DB)
    write(d / NODE_FILE, '[cluster]\netcd_prefix = "/p"\n')
    rev = [SpecFile("a.toml", GOOD.replace('runlevel = "run"', 'runlevel = "stop"')), SpecFile("b.toml", '[groups.new]\nrunlevel = "stop"\n')]
    done = files.write_back(d, rev, revision=7, local=files.files_local(d), first_sync=True)
    assert done == [str(d / "a.toml.before-r7"), str(d / "a.toml"), str(d / "b.toml"), str(d / "old.toml.removed-r7")]
    assert (d / "a.toml.before-r7").read_text() == WITH_LOCAL and (d / "old.toml.removed-r7").read_text() == DB
    assert not (d / "old.toml").exists() and (d / NODE_FILE).read_text() == '[cluster]\netcd_prefix = "/p"\n'
    # the local keys went back into the file that holds [cluster]; mode kept; new file 0644
    assert (d / "a.toml").read_text() == WITH_LOCAL.replace('runlevel = "run"', 'runlevel = "stop"')
    assert stat.S_IMODE(os.stat(d / "a.toml").st_mode) == 0o640 and stat.S_IMODE(os.stat(d / "b.toml").st_mode) == 0o644
    assert in_step(d, rev)
    s = specmod.load(d)
    assert s.cluster.store == "dir:/var/lib/x" and s.cluster.etcd_prefix == "/p" and set(s.groups) == {"web", "new"}
    # again: nothing to do; a later revision keeps no more backups, and never overwrites one
    assert files.write_back(d, rev, revision=7, local=files.files_local(d), first_sync=True) == []
    write(d / "a.toml", WITH_LOCAL)
    done = files.write_back(d, rev, revision=7, local=files.files_local(d), first_sync=True)
    assert done == [str(d / "a.toml.before-r7.1"), str(d / "a.toml")]
    assert files.write_back(d, [SpecFile("b.toml", DB)], revision=8, local={}, first_sync=False) == [
        str(d / "b.toml"), str(d / "a.toml.removed-r8")
    ]


def test_write_back_local_keys_go_where_they_were(tmp_path):
    d = tmp_path / "d"
    write(d / "a.toml", DB)
    write(d / "b.toml", GOOD.replace("[cluster]\n", f"[cluster]\n{LOCAL}").replace('name = "t"\n', ""))
    local = files.files_local(d)
    rev = [SpecFile("a.toml", DB), SpecFile("b.toml", GOOD.replace('[cluster]\nname = "t"\n\n', ""))]
    files.write_back(d, rev, revision=2, local=local, first_sync=False)
    assert files.files_local(d) == local and tomllib.loads((d / "b.toml").read_text())["cluster"] == {"store": "dir:/var/lib/x", "state_dir": "st"}
    assert "local keys would be lost" in error(files.write_back, d, [], revision=3, local=local, first_sync=False)
    assert (d / "a.toml").exists()  # nothing written


def test_write_back_one_file_through_a_link(tmp_path):
    real = write(tmp_path / "etc" / "real.toml", WITH_LOCAL, mode=0o600)
    link = tmp_path / "spec.toml"
    link.symlink_to(real)
    rev = [SpecFile("a.toml", GOOD), SpecFile("b.toml", DB)]
    done = files.write_back(link, rev, revision=3, local=files.files_local(link), first_sync=True)
    assert done == [str(tmp_path / "spec.toml.before-r3"), str(link)]
    assert link.is_symlink() and real.read_text() == WITH_LOCAL + DB
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert in_step(link, rev) and set(specmod.load(link).groups) == {"web", "db"}
    bad = [SpecFile("a.toml", GOOD), SpecFile("b.toml", 'groups.db.runlevel = "stop"\n')]
    assert "would mean something else" in error(files.write_back, link, bad, revision=4, local={}, first_sync=False)
    assert real.read_text() == WITH_LOCAL + DB  # not written


def test_write_back_with_a_node_file_only(tmp_path):
    """A machine that only has its node file: the revision's files appear beside it."""
    d = tmp_path / "d"
    write(d / NODE_FILE, '[cluster]\nstore = "dir:/s"\n')
    assert specmod.load(d).groups == {} and files.read_stripped(d) == {}
    rev = [SpecFile("a.toml", GOOD)]
    assert not in_step(d, rev)
    assert files.write_back(d, rev, revision=1, local=files.files_local(d), first_sync=True) == [str(d / "a.toml")]
    assert in_step(d, rev) and specmod.load(d).cluster.store == "dir:/s"
    assert loader.load_texts([(f.name, f.text) for f in rev], spec_path=d, local=loader.local_settings(d), origin="revision 1").digest() == specmod.load(d).digest()


def test_write_back_refuses_a_bad_name(tmp_path):
    d = tmp_path / "d"
    write(d / "a.toml", GOOD)
    assert "not a spec file name" in error(files.write_back, d, [("../x.toml", "")], revision=1, local={}, first_sync=False)
    assert not (tmp_path / "x.toml").exists()


def test_strip_then_write_back_round_trip(tmp_path):
    """What a node publishes (revision_files), written back on a node with other local keys,
    is in step and keeps that node's own keys."""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "s.toml", WITH_LOCAL.replace('"run"', '"stop"', 1) + DB)
    write(b / "s.toml", GOOD.replace('name = "t"\n', 'name = "t"\nstore = "etcd://h:1"\n'))
    rev = files.revision_files(a / "s.toml")
    files.write_back(b / "s.toml", rev, revision=5, local=files.files_local(b / "s.toml"), first_sync=False)
    assert in_step(b / "s.toml", rev) and specmod.load(b / "s.toml").cluster.store == "etcd://h:1"
    assert specmod.load(a / "s.toml").digest() == specmod.load(b / "s.toml").digest()
    assert strip_local((b / "s.toml").read_text(), file="s") == rev[0].text


# --- set_runlevel (edit.py): the text rewrite of `tell`, for a revision's files ------------------


def test_set_runlevel_keeps_the_layout():
    from reconciler.spec.edit import set_runlevel, set_runlevel_in

    text = "# mine\n[groups.web]  # the web\nrunlevel = \"run\"  # now\n\n[groups.db]\nrunlevel = 'stop'\n"
    assert set_runlevel(text, "web", "maint", file="a.toml") == text.replace('"run"', '"maint"')
    dotted = 'groups.web.runlevel = "run"\ngroups.web.nodes = []\n'
    assert tomllib.loads(set_runlevel(dotted, "web", "stop", file="a.toml"))["groups"]["web"]["runlevel"] == "stop"
    assert error(set_runlevel, text, "nope", "run", file="revision 3/a.toml") == "revision 3/a.toml: groups.nope: no group 'nope' in this file"
    assert error(set_runlevel, "[x", "web", "run", file="a.toml").startswith("a.toml: not valid TOML")
    pairs = [("a.toml", DB), ("b.toml", text)]
    assert set_runlevel_in(pairs, "web", "stop", origin="revision 3") == [("a.toml", DB), ("b.toml", text.replace('"run"', '"stop"'))]
    assert error(set_runlevel_in, pairs, "cache", "run", origin="revision 3") == "revision 3: groups.cache: unknown group 'cache'"


def test_concatenation_names_a_file_that_is_not_toml():
    assert error(files.check_concatenation, [("a.toml", GOOD), ("b.toml", "[x")], origin="revision 2").startswith("revision 2/b.toml: not valid TOML")


WEBDB = """# a cluster
[cluster]
name = "webdb"
store = "dir:/srv/store"
state_dir = "/var/lib/reconciler/state"

# the timing, with a comment that sits right after the local keys
[cluster.timing]
lease = "2s"
"""


def test_a_file_that_shows_the_revision_is_left_alone_and_in_step(tmp_path):
    """Local keys taken out (a revision) and put back (a write-back) move blank lines and the
    comment beside them (tomlkit): never an edit, never a rewrite (a node once rewrote its
    cluster.toml at every revision, then saw it as out of step and wrote it again)."""
    write(tmp_path / "cluster.toml", WEBDB)
    rev = files.revision_files(tmp_path)
    before = os.stat(tmp_path / "cluster.toml")
    written = files.write_back(tmp_path, rev, revision=2, local=files.files_local(tmp_path), first_sync=False)
    assert written == [] and (tmp_path / "cluster.toml").read_text() == WEBDB
    assert os.stat(tmp_path / "cluster.toml").st_ino == before.st_ino
    assert files.texts_hash(files.read_stripped(tmp_path)) == files.texts_hash(files.comparable(rev, files.layout(tmp_path)))
    # and after a real change is written back, the files are in step with it at once
    changed = tuple(SpecFile(f.name, f.text.replace('lease = "2s"', 'lease = "3s"')) for f in rev)
    assert files.write_back(tmp_path, changed, revision=3, local=files.files_local(tmp_path), first_sync=False)
    assert 'store = "dir:/srv/store"' in (tmp_path / "cluster.toml").read_text()
    assert files.texts_hash(files.read_stripped(tmp_path)) == files.texts_hash(files.comparable(changed, files.layout(tmp_path)))


def test_blank_lines_are_not_an_edit():
    assert files.texts_hash({"a.toml": "x = 1\n\n\ny = 2  \n"}) == files.texts_hash({"a.toml": "x = 1\ny = 2\n"})
    assert files.texts_hash({"a.toml": "x = 1\n"}) != files.texts_hash({"a.toml": "x = 2\n"})


def test_a_write_back_keeps_the_comments_of_this_nodes_local_keys(tmp_path):
    """`store = "dir:..."   # relative to this file's directory`: the comment stays when the
    file takes a new revision (it was lost once: put back as a bare value)."""
    text = ('[cluster]\nname = "x"\nstore = "dir:.reconciler/store"      # relative to this file\'s directory\n\n'
            '[groups.web]\nrunlevel = "run"\n')
    write(tmp_path / "spec.toml", text)
    spec_path = tmp_path / "spec.toml"
    rev = tuple(SpecFile(f.name, f.text.replace('runlevel = "run"', 'runlevel = "stop"')) for f in files.revision_files(spec_path))
    assert files.write_back(spec_path, rev, revision=2, local=files.files_local(spec_path), first_sync=False)
    after = spec_path.read_text()
    assert "# relative to this file's directory" in after and 'runlevel = "stop"' in after, after
