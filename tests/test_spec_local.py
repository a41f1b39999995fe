"""Issue 14: what is each node's own in a spec (the local keys, the node file), and the
loader's part of one spec for the cluster (load with a node file, local_settings, load_texts,
the digest of the cluster-wide part)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings, strategies as st

from reconciler import spec as specmod
from reconciler.spec import SpecError, loader
from reconciler.spec.local import LOCAL_KEYS, NODE_FILE, load_node_file, local_items, put_local, strip_local

from helpers import good_spec, write_file as write

GOOD = good_spec()
WITH_LOCAL = GOOD.replace(
    'name = "t"\n', 'name = "t"  # the name\n# where the cluster meets\nstore = "dir:/var/lib/x"\nstate_dir = "st"\nmembership = "store"\n'
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def error(fn, *args, **kw) -> str:
    with pytest.raises(SpecError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --- strip_local / local_items / put_local --------------------------------------------------


def test_strip_keeps_everything_else():
    out = strip_local(WITH_LOCAL, file="s.toml")
    assert out == GOOD.replace('name = "t"\n', 'name = "t"  # the name\n# where the cluster meets\n')
    assert local_items(WITH_LOCAL, file="s.toml") == {"store": "dir:/var/lib/x", "state_dir": "st", "membership": "store"}
    assert local_items(out, file="s.toml") == {}


def test_strip_without_local_keys_is_the_same_text():
    weird = "# x\n[cluster]\nname   =   'q'   # keep\n\n\n[groups.a]\nrunlevel='stop'\n"
    assert strip_local(weird, file="s.toml") is weird or strip_local(weird, file="s.toml") == weird
    assert strip_local("", file="s.toml") == ""


@pytest.mark.parametrize(
    "text",
    [
        'cluster.name = "c"\ncluster.store = "dir:/x"\ngroups.web.runlevel = "stop"\n',
        'cluster = {name = "c", store = "dir:/x", etcd_user = "u"}\n[groups.web]\nrunlevel = "stop"\n',
        '[cluster]\nstore = "dir:/x"\n\n[cluster.timing]\nlease = "1s"\n',
        '[groups.web]\nrunlevel = "stop"\n[cluster]\netcd_prefix = "/p"\nname = "n"\n',
    ],
)
def test_strip_and_put_in_any_layout(text):
    plain = tomllib.loads(text)
    stripped = strip_local(text, file="s.toml")
    want = {k: v for k, v in plain["cluster"].items() if k not in LOCAL_KEYS}
    assert tomllib.loads(stripped).get("cluster", {}) == want
    back = put_local(stripped, local_items(text, file="s.toml"), file="s.toml")
    assert tomllib.loads(back) == plain


def test_put_adds_a_cluster_table_at_the_top():
    text = "# groups only\n[groups.web]\nrunlevel = \"stop\"\n"
    out = put_local(text, {"store": "dir:/s", "state_dir": "/var/st"}, file="s.toml")
    assert out.startswith('[cluster]\nstore = "dir:/s"\nstate_dir = "/var/st"\n\n# groups only\n')
    # a text that starts with top-level keys cannot take a table above them: it goes after them
    dotted = 'groups.web.runlevel = "stop"\n'
    out = put_local(dotted, {"store": "dir:/s"}, file="s.toml")
    assert tomllib.loads(out) == {"groups": {"web": {"runlevel": "stop"}}, "cluster": {"store": "dir:/s"}}


def test_put_replaces_exactly_the_local_keys():
    out = put_local(WITH_LOCAL, {"etcd_prefix": "/p"}, file="s.toml")
    c = tomllib.loads(out)["cluster"]
    assert c == {"name": "t", "etcd_prefix": "/p"}
    assert put_local(WITH_LOCAL, {}, file="s.toml") == strip_local(WITH_LOCAL, file="s.toml")
    assert "s.toml: cluster.name: not a local key" in error(put_local, GOOD, {"name": "x"}, file="s.toml")


def test_bad_toml_names_the_file():
    assert error(strip_local, "[cluster\n", file="revision 3/a.toml").startswith("revision 3/a.toml: not valid TOML")
    assert error(local_items, "cluster = 3\n", file="a.toml") == "a.toml: cluster: must be a table"


local_values = st.fixed_dictionaries(
    {},
    optional={
        "store": st.sampled_from(["dir:/x", "etcd://h:1", "dir:rel/y"]),
        "state_dir": st.text(min_size=1, max_size=8).filter(str.isprintable),
        "etcd_user": st.text(max_size=6),
        "etcd_prefix": st.sampled_from(["/r", "/a/b"]),
    },
)
other_values = st.fixed_dictionaries({}, optional={"name": st.text(max_size=6), "stop_all": st.booleans()})
layouts = st.sampled_from(["table", "inline", "dotted"])


def render(layout: str, cluster: dict, groups: str) -> str:
    if not cluster:
        return groups
    if layout == "table":  # (top-level dotted keys must come before the first table header)
        table = tomli_w.dumps({"cluster": cluster})
        return groups + table if groups.startswith("groups.") else table + "\n" + groups
    if layout == "inline":
        inline = ", ".join(f"{k} = {tomli_w.dumps({'v': v})[4:].strip()}" for k, v in cluster.items())
        return f"cluster = {{{inline}}}\n" + groups
    return "".join(f"cluster.{k} = {tomli_w.dumps({'v': v})[4:].strip()}\n" for k, v in cluster.items()) + groups


@FAST
@given(local_values, other_values, layouts, local_values, st.sampled_from(["", '[groups.web]\nrunlevel = "stop"\n', 'groups.a.runlevel = "stop"\n']))
def test_strip_put_round_trip(local, other, layout, new_local, groups):
    """Property: strip takes exactly the local keys out; put puts exactly the items given in;
    put(strip(t), local_items(t)) means t."""
    text = render(layout, {**other, **local}, groups)
    plain = tomllib.loads(text)
    stripped = strip_local(text, file="f.toml")
    assert local_items(stripped, file="f.toml") == {}
    assert {k: v for k, v in tomllib.loads(stripped).get("cluster", {}).items()} == other
    assert local_items(text, file="f.toml") == local
    assert tomllib.loads(put_local(stripped, local, file="f.toml")).get("cluster", {}) == plain.get("cluster", {})
    put = put_local(text, new_local, file="f.toml")
    assert tomllib.loads(put).get("cluster", {}) == {**other, **new_local}
    assert tomllib.loads(put).get("groups") == plain.get("groups")


# --- the node file ----------------------------------------------------------------------------


def test_node_file_strict(tmp_path):
    nf = write(tmp_path / NODE_FILE, '[cluster]\nstore = "dir:/s"\nstate_dir = "st"\n')
    assert load_node_file(nf) == {"store": "dir:/s", "state_dir": "st"}
    write(nf, '[cluster]\nstore = "dir:/s"\n[groups.web]\nrunlevel = "stop"\n')
    assert error(load_node_file, nf) == f"{nf}: groups: the node file holds only [cluster] local keys ({', '.join(LOCAL_KEYS)})"
    write(nf, '[cluster]\nname = "x"\n')
    assert error(load_node_file, nf).startswith(f"{nf}: cluster.name: the node file holds only [cluster] local keys")
    write(nf, '[cluster]\nstore = 3\n')
    assert error(load_node_file, nf) == f"{nf}: cluster.store: must be a string, not an integer"
    write(nf, '[cluster]\nstore = "nfs:/x"\n')
    assert error(load_node_file, nf).startswith(f"{nf}: cluster.store: must be")
    write(nf, '[cluster]\nmembership = "x"\n')
    assert error(load_node_file, nf).startswith(f"{nf}: cluster.membership: must be")
    write(nf, "[cluster\n")
    assert error(load_node_file, nf).startswith(f"{nf}: not valid TOML")
    write(nf, '[cluster]\nstore = "dir:/s"\n', mode=0o666)
    assert "writable by others" in error(load_node_file, nf)


def test_dir_spec_with_node_file(tmp_path):
    d = tmp_path / "spec"
    write(d / "a.toml", WITH_LOCAL)
    write(d / NODE_FILE, '[cluster]\nstore = "dir:/node/store"\netcd_user = "u"\n')
    assert [p.name for p in loader.spec_files(d)] == ["a.toml"]
    s = specmod.load(d)
    assert s.cluster.store == "dir:/node/store" and s.cluster.state_dir == "st" and s.cluster.etcd_user == "u"
    assert s.node_file == str(d / NODE_FILE) and s.files == (str(d / "a.toml"),)
    assert loader.local_settings(d) == {"store": "dir:/node/store", "state_dir": "st", "membership": "store", "etcd_user": "u"}
    # the same spec without the local keys, anywhere else: the same digest
    write(tmp_path / "other.toml", GOOD)
    assert specmod.load(tmp_path / "other.toml").digest() == s.digest()
    # a bad node file stops the load, naming it
    write(d / NODE_FILE, '[groups.x]\nrunlevel = "stop"\n')
    assert error(specmod.load, d).startswith(f"{d / NODE_FILE}: groups: the node file holds only")


def test_one_file_spec_with_node_file(tmp_path):
    f = write(tmp_path / "s.toml", WITH_LOCAL)
    nf = write(tmp_path / "elsewhere" / "mine.toml", '[cluster]\nstate_dir = "nodestate"\n')
    s = specmod.load(f, node_file=nf)
    # node file > spec file > defaults; relative paths resolve against the spec's directory
    assert s.cluster.state_dir == "nodestate" and s.state_dir == str(tmp_path / "nodestate")
    assert s.cluster.store == "dir:/var/lib/x"
    assert specmod.load(f).cluster.state_dir == "st"  # without it: as before
    assert loader.local_settings(f, node_file=nf)["state_dir"] == "nodestate"


def test_node_file_password_replaces_the_spec_files(tmp_path):
    d = tmp_path / "spec"
    write(d / "a.toml", GOOD.replace('name = "t"\n', 'name = "t"\netcd_user = "u"\netcd_password = "from-spec"\n'))
    write(d / "pw", "from-file\n", mode=0o600)
    write(d / NODE_FILE, '[cluster]\netcd_password_file = "pw"\n')
    s = specmod.load(d)
    assert s.cluster.etcd_password == "from-file" and s.cluster.etcd_user == "u"
    write(d / NODE_FILE, '[cluster]\netcd_password_file = "missing"\n')
    assert error(specmod.load, d).startswith(f"{d / NODE_FILE}: cluster.etcd_password_file: ")


def test_directory_with_only_the_node_file(tmp_path):
    d = tmp_path / "spec"
    write(d / NODE_FILE, '[cluster]\nstore = "dir:/s"\n')
    s = specmod.load(d)
    assert s.groups == {} and s.cluster.store == "dir:/s" and s.files == ()
    assert loader.peek(d).cluster.store == "dir:/s"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error(specmod.load, empty) == f"{empty}: no *.toml files in this directory"
    assert specmod.load(empty, allow_empty=True).groups == {}


def test_peek_applies_the_node_file(tmp_path):
    d = tmp_path / "spec"
    write(d / "a.toml", GOOD.replace('[groups.web]\nrunlevel = "run"', '[groups.web]\nrunlevel = "nope"'))
    write(d / NODE_FILE, '[cluster]\nstore = "dir:/s"\n')
    assert loader.peek(d).cluster.store == "dir:/s" and loader.peek(d).cluster.name == "t"


# --- load_texts --------------------------------------------------------------------------------


def test_load_texts_as_the_spec_would_be(tmp_path):
    d = tmp_path / "spec"
    write(d / "a.toml", WITH_LOCAL)
    local = loader.local_settings(d)
    files = [("b.toml", '[groups.db]\nrunlevel = "stop"\n'), ("a.toml", strip_local(WITH_LOCAL, file="a.toml"))]
    s = loader.load_texts(files, spec_path=d, local=local, origin="revision 7")
    assert s.cluster.store == "dir:/var/lib/x" and s.state_dir == str(d / "st")
    assert s.groups["web"].source == "revision 7/a.toml" and s.groups["db"].source == "revision 7/b.toml"
    assert s.files == (str(d / "a.toml"), str(d / "b.toml"))
    write(d / "b.toml", files[0][1])
    assert s.digest() == specmod.load(d).digest()
    bad = [("a.toml", GOOD.replace('runlevel = "run"', 'runlevel = "nope"'))]
    assert error(loader.load_texts, bad, spec_path=d, local=local, origin="revision 7").startswith(
        "revision 7/a.toml: groups.web.runlevel: 'nope' is not a runlevel"
    )
    unstripped = [("a.toml", WITH_LOCAL)]
    assert error(loader.load_texts, unstripped, spec_path=d, local=local, origin="revision 7") == (
        "revision 7/a.toml: cluster.store: a revision holds no local keys (they are each node's own: node.toml)"
    )
    assert error(loader.load_texts, [("a.toml", "x = 1\n")], spec_path=d, local={}, origin="revision 2").startswith("revision 2/a.toml: x: unknown table")


def test_load_texts_one_file_spec(tmp_path):
    f = write(tmp_path / "s.toml", WITH_LOCAL)
    s = loader.load_texts([("s.toml", GOOD)], spec_path=f, local={"state_dir": "x"}, origin="revision 1")
    assert s.files == (str(f),) and s.base == str(tmp_path) and s.state_dir == str(tmp_path / "x")
    assert s.cluster.store == specmod.Cluster().store


def test_digest_leaves_every_local_key_out(tmp_path):
    base = specmod.load(write(tmp_path / "a.toml", GOOD)).digest()
    for line in ('store = "etcd://h:1"', 'state_dir = "/x"', 'membership = "hpc:/proc/hpc"', 'etcd_prefix = "/q"', 'etcd_ca = "/ca"', 'etcd_user = "u"'):
        f = write(tmp_path / "b.toml", GOOD.replace('name = "t"\n', f'name = "t"\n{line}\n'))
        assert specmod.load(f).digest() == base, line
    for line in ('name = "u"', "stop_all = true", '[cluster.timing]\nretest = "20s"'):
        f = write(tmp_path / "c.toml", GOOD.replace('name = "t"\n', f'name = "t"\n{line}\n' if "name" not in line else f"{line}\n"))
        assert specmod.load(f).digest() != base, line


def test_local_keys_are_the_documented_ones():
    assert set(LOCAL_KEYS) | {"name", "timing", "stop_all"} == {a.name for a in specmod.Cluster.__attrs_attrs__}
    assert os.path.basename(NODE_FILE) == "node.toml"
    assert Path(specmod.__file__).parent.joinpath("local.py").exists()


def test_the_watch_sees_the_node_file(tmp_path):
    from reconciler.spec import watch

    f = write(tmp_path / "s.toml", GOOD)
    nf = write(tmp_path / "node" / "mine.toml", '[cluster]\nstate_dir = "x"\n')
    dirs, names = watch.roots(str(f), specmod.load(f, node_file=nf))
    assert str(tmp_path / "node") in dirs and "mine.toml" in names and "s.toml" in names
    before = watch.fingerprint(str(f), str(nf))
    assert len(before) == 2 and watch.fingerprint(str(f)) != before
    d = tmp_path / "d"
    write(d / "a.toml", GOOD)
    write(d / NODE_FILE, '[cluster]\nstate_dir = "x"\n')
    dirs, names = watch.roots(str(d), specmod.load(d))
    assert dirs == (str(d),) and names == frozenset({watch.ANY_TOML})
    assert [e[0] for e in watch.fingerprint(str(d))] == [str(d / "a.toml"), str(d / NODE_FILE)]


def test_peek_refuses_a_bad_node_file(tmp_path):
    d = tmp_path / "spec"
    write(d / "a.toml", WITH_LOCAL)
    write(d / NODE_FILE, 'name = "x"\n')
    assert error(loader.peek, d).startswith(f"{d / NODE_FILE}: name: the node file holds only")
