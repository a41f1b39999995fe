"""Issue 12: spec permissions like OpenSSH's StrictModes (item 8), secrets (item 10), and
`reconcile tell` through links and on read-only files (item 10).

Tests run as root and play the non-root attacker as `nobody` (uid 65534): every file the
loader accepts must be beyond nobody's reach, which test_nobody_cannot_change_an_accepted_spec
checks by really trying, as nobody, on randomly built trees.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from reconciler import spec as specmod
from reconciler.spec import edit
from reconciler.spec import loader
from reconciler.spec import SpecError

from helpers import good_spec, reconcile, spec_error as error_of, write_file

NOBODY = 65534
PROBE_PYTHON = "/usr/bin/python3"  # one nobody may run (the venv's lives under /root)

GOOD = good_spec(runlevels=("run", "maint"), command=("id",))


@pytest.fixture
def base():
    """A directory nobody can walk into (unlike pytest's tmp_path, which is 0700): root's,
    0755, in /tmp (root's, sticky)."""
    d = Path(tempfile.mkdtemp(prefix="spec-trust-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def mkdir(path: Path, mode: int = 0o755, uid: int | None = None, gid: int | None = None) -> Path:
    """A directory owned by uid:gid (default: ours, root when the test runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)
    return path


def write(path: Path, text: str = GOOD, mode: int = 0o644, uid: int | None = None, gid: int | None = None) -> Path:
    return write_file(path, text, mode, uid=uid, gid=gid)


def cli(*args: str) -> subprocess.CompletedProcess:
    return reconcile(*args, timeout=60)


# --- item 8: permissions through links and ancestors ------------------------------------------------


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_symlinked_spec_into_a_directory_owned_by_nobody_refused(base):
    """Item 8: the link's own directory was checked, never where it leads."""
    evil = mkdir(base / "home-nobody", uid=NOBODY, gid=NOBODY)
    write(evil / "spec.toml")  # root's file, 0644: but nobody may replace it in its directory
    etc = mkdir(base / "etc")
    (etc / "spec.toml").symlink_to(evil / "spec.toml")
    assert error_of(etc / "spec.toml") == f"{evil}: owned by uid {NOBODY}, not by root or uid 0: refused"
    # the same through a relative link, and as one file of a directory spec
    (etc / "spec.toml").unlink()
    (etc / "spec.toml").symlink_to("../home-nobody/spec.toml")
    assert error_of(etc / "spec.toml") == f"{evil}: owned by uid {NOBODY}, not by root or uid 0: refused"
    assert error_of(etc) == f"{evil}: owned by uid {NOBODY}, not by root or uid 0: refused"


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_symlink_to_a_file_owned_by_nobody_refused(base):
    write(base / "real.toml", uid=NOBODY)
    (base / "spec.toml").symlink_to(base / "real.toml")
    assert error_of(base / "spec.toml") == f"{base / 'real.toml'}: owned by uid {NOBODY}, not by root or uid 0: refused"


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_group_writable_ancestor_refused(base):
    """Item 8: only the direct parent was checked; any ancestor can swap the whole subtree."""
    a = mkdir(base / "a", mode=0o775, gid=0)
    b = mkdir(a / "b")
    f = write(b / "spec.toml")
    assert error_of(f) == f"{a}: writable by others (mode 775): refused"
    assert error_of(b) == f"{a}: writable by others (mode 775): refused"
    os.chmod(a, 0o757)
    assert error_of(f) == f"{a}: writable by others (mode 757): refused"
    os.chmod(a, 0o755)
    specmod.load(f)
    specmod.load(b)


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_symlinked_spec_directory_refused_when_its_target_is_not_trusted(base):
    target = mkdir(base / "nobody-cfg", uid=NOBODY, gid=NOBODY)
    write(target / "spec.toml")
    (base / "reconciler").symlink_to(target)
    assert error_of(base / "reconciler") == f"{target}: owned by uid {NOBODY}, not by root or uid 0: refused"
    good = mkdir(base / "good-cfg")
    write(good / "spec.toml")
    (base / "reconciler").unlink()
    (base / "reconciler").symlink_to(good)
    assert list(specmod.load(base / "reconciler").groups) == ["web"]


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_link_chain_checks_every_link_on_the_way(base):
    """spec.toml -> nobody's dir/hop -> a trusted file: the middle link's directory counts."""
    good = mkdir(base / "good")
    write(good / "spec.toml")
    hops = mkdir(base / "hops", uid=NOBODY, gid=NOBODY)
    (hops / "hop").symlink_to(good / "spec.toml")
    (base / "spec.toml").symlink_to(hops / "hop")
    assert error_of(base / "spec.toml") == f"{hops}: owned by uid {NOBODY}, not by root or uid 0: refused"


def test_a_link_loop_is_an_error(base):
    (base / "a.toml").symlink_to(base / "b.toml")
    (base / "b.toml").symlink_to(base / "a.toml")
    msg = error_of(base / "a.toml")
    assert msg.startswith(f"{base}/"), msg


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_root_sticky_ancestor_accepted_but_not_as_the_spec_directory(base):
    sticky = mkdir(base / "tmp", mode=0o1777)
    d = mkdir(sticky / "cfg")
    f = write(d / "spec.toml")
    specmod.load(f)  # like /tmp: nobody can rename or replace what root put there
    specmod.load(d)
    write(sticky / "spec.toml")
    specmod.load(sticky / "spec.toml")
    assert error_of(sticky) == f"{sticky}: writable by others (mode 1777): refused"  # anyone could add a file
    os.chown(sticky, NOBODY, NOBODY)  # sticky, but not root's: its owner can do anything in it
    assert error_of(f) == f"{sticky}: owned by uid {NOBODY}, not by root or uid 0: refused"


def test_world_writable_directory_above_the_parent_refused(base):
    ww = mkdir(base / "ww", mode=0o777)
    d = mkdir(ww / "etc")
    f = write(d / "spec.toml")
    assert error_of(f) == f"{ww}: writable by others (mode 777): refused"


# --- the property: whatever the loader accepts, nobody cannot change -------------------------------------

_TRY = r"""
import json, os, sys
paths, spec, spec_dir = json.loads(sys.argv[1])
done = []
for p in paths:  # replace or remove any component of the path
    try:
        os.rename(p, p + ".moved"); os.rename(p + ".moved", p); done.append("rename " + p)
    except OSError:
        pass
try:
    with open(spec, "a"):
        done.append("write " + spec)
except OSError:
    pass
if spec_dir:
    try:
        with open(os.path.join(spec_dir, "evil.toml"), "x"):
            done.append("create in " + spec_dir)
    except OSError:
        pass
print(json.dumps(done))
"""

# Mostly what the loader trusts, so that many trees are accepted and probed.
owners = st.sampled_from([0, 0, 0, 0, 0, NOBODY])
dir_modes = st.sampled_from([0o755] * 6 + [0o1777, 0o1777, 0o711, 0o775, 0o777, 0o757])
file_modes = st.sampled_from([0o644] * 4 + [0o600, 0o664, 0o666, 0o646])


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    dirs=st.lists(st.tuples(owners, owners, dir_modes), min_size=1, max_size=3),
    file=st.tuples(owners, owners, file_modes),
    link=st.sampled_from([None, "absolute", "relative", "dir"]),
    as_directory=st.booleans(),
)
def test_nobody_cannot_change_an_accepted_spec(base, dirs, file, link, as_directory):
    root = Path(tempfile.mkdtemp(dir=base))
    os.chmod(root, 0o755)
    d = root
    chain = []
    for i, (uid, gid, mode) in enumerate(dirs):
        d = mkdir(d / f"d{i}", mode=mode, uid=uid, gid=gid)
        chain.append(d)
    f = write(d / "spec.toml", mode=file[2], uid=file[0], gid=file[1])
    target = d if as_directory else f
    path = target
    if link == "absolute":
        path = root / "link"
        path.symlink_to(target)
    elif link == "relative":
        path = root / "link"
        path.symlink_to(os.path.relpath(target, root))
    elif link == "dir":  # a link in place of the first directory of the chain
        path = root / "via" / target.relative_to(chain[0])
        (root / "via").symlink_to(chain[0])
    try:
        specmod.load(path)
    except SpecError:
        event("refused")
        return  # refused: nothing to prove
    components = [str(p) for p in (*chain, f)] + ([str(root / "link")] if link in ("absolute", "relative") else [])
    components += [str(root / "via")] if link == "dir" else []
    p = subprocess.run(
        [PROBE_PYTHON, "-c", _TRY, json.dumps([components, str(f), str(d) if as_directory else ""])],
        user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True, timeout=30,
    )
    assert p.returncode == 0, p.stderr
    event(f"accepted ({link}, {'dir' if as_directory else 'file'})")
    assert json.loads(p.stdout) == [], f"accepted {path}, yet nobody could: {p.stdout}"


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_the_trusted_tree_is_accepted_and_the_probe_works(base):
    """The property above is not vacuous: the probe does catch what nobody can do, and a
    tree of root's is accepted."""
    d = mkdir(base / "d")
    f = write(d / "spec.toml")
    specmod.load(f)
    os.chmod(d, 0o777)
    p = subprocess.run([PROBE_PYTHON, "-c", _TRY, json.dumps([[str(f)], str(f), str(d)])],
                       user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True, timeout=30)
    assert f"rename {f}" in json.loads(p.stdout) and f"create in {d}" in json.loads(p.stdout)
    assert error_of(f) == f"{d}: writable by others (mode 777): refused"


# --- secrets (item 10) ---------------------------------------------------------------------------------


def spec_with(tmp_path: Path, cluster: str, name: str = "s.toml") -> Path:
    return write(tmp_path / name, GOOD.replace('name = "t"\n', f'name = "t"\n{cluster}\n'))


def test_digest_excludes_the_password(tmp_path):
    """Item 10: the digest (published with every heartbeat) hashed the etcd password; a
    dictionary attack over candidate passwords recovered it. Now every candidate gives the
    digest the nodes publish: nothing to match."""
    os.chmod(tmp_path, 0o755)
    published = specmod.load(spec_with(tmp_path, 'etcd_user = "u"\netcd_password = "hunter2"')).digest()
    for guess in ("password", "hunter2", "letmein", ""):
        assert specmod.load(spec_with(tmp_path, f'etcd_user = "u"\netcd_password = "{guess}"', "g.toml")).digest() == published
    # ... and in the URL's userinfo
    a = specmod.load(spec_with(tmp_path, 'store = "etcd://u:hunter2@127.0.0.1:2379"')).digest()
    b = specmod.load(spec_with(tmp_path, 'store = "etcd://u:other@127.0.0.1:2379"', "g.toml")).digest()
    assert a == b
    # the credentials are each node's own (issue 14: local keys): not in the digest at all
    assert specmod.load(spec_with(tmp_path, 'etcd_user = "u"', "g.toml")).digest() == published


def test_password_never_in_a_repr(tmp_path):
    os.chmod(tmp_path, 0o755)
    s = specmod.load(spec_with(tmp_path, 'etcd_user = "u"\netcd_password = "hunter2"'))
    assert s.cluster.etcd_password == "hunter2" and "hunter2" not in repr(s)


def test_redact_url():
    r = specmod.redact_url
    assert r("etcd://bob:hunter2@10.0.0.1:2379,10.0.0.2") == "etcd://bob:***@10.0.0.1:2379,10.0.0.2"
    assert r("etcds://bob:p@ss/w0rd@h:1/prefix") == "etcds://bob:***@h:1/prefix"
    assert r("etcd://h:2379") == "etcd://h:2379" and r("dir:/var/x") == "dir:/var/x" and r("etcd://bob@h") == "etcd://bob@h"
    assert r("x: etcd://a:b@h: timeout, etcd://c:d@i") == "x: etcd://a:***@h: timeout, etcd://c:***@i"
    assert "hunter2" not in str(SpecError("cannot reach etcd://u:hunter2@h", file="f.toml"))


def test_check_redacts_the_url(tmp_path):
    """Item 10: `etcd://user:password@...` was printed by `check`."""
    os.chmod(tmp_path, 0o755)
    f = spec_with(tmp_path, 'store = "etcd://bob:hunter2@127.0.0.1:2379"')
    p = cli("check", "--spec", str(f))
    assert p.returncode == 0, p.stderr
    assert "store etcd://bob:***@127.0.0.1:2379" in p.stdout and "hunter2" not in p.stdout + p.stderr


def test_store_errors_redact_the_url(tmp_path):
    from reconciler.store import StoreError, etcd

    s = etcd.EtcdStore("etcd://bob:hunter2@127.0.0.1:1")
    assert s.url == "etcd://bob:***@127.0.0.1:1"
    with pytest.raises(StoreError) as info:
        etcd.EtcdStore("etcdx://bob:hunter2@127.0.0.1:1")
    assert "hunter2" not in str(info.value) and "bob:***@" in str(info.value)
    with pytest.raises(StoreError) as info:
        etcd.EtcdStore("etcd://bob:hunter2@127.0.0.1:1", user="bob")
    assert "hunter2" not in str(info.value)
    # `reconcile status` against an etcd nobody listens on: the error names the store, redacted
    os.chmod(tmp_path, 0o755)
    f = spec_with(tmp_path, 'store = "etcd://bob:hunter2@127.0.0.1:1"')
    p = cli("status", "--spec", str(f))
    assert p.returncode == 1 and "127.0.0.1:1" in p.stderr, (p.stdout, p.stderr)
    assert "hunter2" not in p.stdout + p.stderr


def test_password_file(tmp_path):
    os.chmod(tmp_path, 0o755)
    pw = write(tmp_path / "etcd.pw", "s3cret\n", mode=0o600)
    s = specmod.load(spec_with(tmp_path, 'etcd_user = "u"\netcd_password_file = "etcd.pw"'))  # relative: to the spec
    assert s.cluster.etcd_password == "s3cret" and s.cluster.etcd_password_file == "etcd.pw"
    assert "s3cret" not in repr(s)
    os.chmod(pw, 0o400)
    assert specmod.load(spec_with(tmp_path, f'etcd_user = "u"\netcd_password_file = "{pw}"')).cluster.etcd_password == "s3cret"
    # the digest is the one of the same spec with any other password
    a = specmod.load(spec_with(tmp_path, f'etcd_user = "u"\netcd_password_file = "{pw}"')).digest()
    pw.chmod(0o600)
    pw.write_text("other\n")
    assert specmod.load(spec_with(tmp_path, f'etcd_user = "u"\netcd_password_file = "{pw}"')).digest() == a


@pytest.mark.parametrize(
    "mode, content, words",
    [
        (0o644, "s3cret\n", "readable by others (mode 644): refused"),
        (0o640, "s3cret\n", "readable by others (mode 640): refused"),
        (0o604, "s3cret\n", "readable by others (mode 604): refused"),
        (0o622, "s3cret\n", "writable by others (mode 622): refused"),
        (0o600, "", "must hold the password alone"),
        (0o600, "a\nb\n", "must hold the password alone"),
        (0o600, "a\x00b\n", "control character"),
    ],
)
def test_password_file_refused(tmp_path, mode, content, words):
    os.chmod(tmp_path, 0o755)
    pw = write(tmp_path / "etcd.pw", content, mode=mode)
    f = spec_with(tmp_path, f'etcd_user = "u"\netcd_password_file = "{pw}"')
    msg = error_of(f)
    assert msg.startswith(f"{f}: cluster.etcd_password_file: {pw}: "), msg
    assert words in msg and "s3cret" not in msg, msg


@pytest.mark.integration
@pytest.mark.needs("root")  # files of root and of nobody, run as nobody
def test_password_file_in_an_untrusted_place_or_with_a_password_refused(base):
    d = mkdir(base / "nobody", uid=NOBODY, gid=NOBODY)
    pw = write(d / "etcd.pw", "s3cret\n", mode=0o600)
    f = spec_with(base, f'etcd_user = "u"\netcd_password_file = "{pw}"')
    assert error_of(f) == f"{f}: cluster.etcd_password_file: {d}: owned by uid {NOBODY}, not by root or uid 0: refused"
    f = spec_with(base, f'etcd_user = "u"\netcd_password = "x"\netcd_password_file = "{pw}"')
    assert error_of(f) == f"{f}: cluster.etcd_password_file: set etcd_password or etcd_password_file, not both"
    f = spec_with(base, 'etcd_user = "u"\netcd_password_file = "missing.pw"')
    assert error_of(f) == f"{f}: cluster.etcd_password_file: {base / 'missing.pw'}: No such file or directory"


# --- tell (item 10) ------------------------------------------------------------------------------------------


def test_tell_writes_through_a_symlink(base):
    """Item 10: tell replaced a symlinked spec with a plain file."""
    real = mkdir(base / "real")
    target = write(real / "web.toml", "# comment\n" + GOOD)
    etc = mkdir(base / "etc")
    (etc / "web.toml").symlink_to(target)
    p = cli("tell", "web", "maint", "--spec", str(etc / "web.toml"))
    assert p.returncode == 0, p.stderr
    assert (etc / "web.toml").is_symlink() and os.readlink(etc / "web.toml") == str(target)
    assert 'runlevel = "maint"' in target.read_text() and target.read_text().startswith("# comment\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in real.iterdir()] == ["web.toml"]  # no temporary left behind
    assert specmod.load(etc / "web.toml").groups["web"].runlevel == "maint"


def test_tell_refuses_a_read_only_file(tmp_path):
    """Item 10: tell rewrote a read-only (0444) spec."""
    os.chmod(tmp_path, 0o755)
    f = write(tmp_path / "web.toml", GOOD, mode=0o444)
    p = cli("tell", "web", "maint", "--spec", str(f))
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr == f"reconcile: {f}: read-only (mode 444): not changed; make it writable to use tell\n"
    assert f.read_text() == GOOD and stat.S_IMODE(f.stat().st_mode) == 0o444


def test_tell_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    os.chmod(tmp_path, 0o755)
    f = write(tmp_path / "web.toml")
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        return real_fsync(fd)

    monkeypatch.setattr(edit.os, "fsync", spy)
    edit.tell(str(f), "web", "maint")
    ino = f.stat().st_ino
    assert synced == [("file", ino), ("dir", tmp_path.stat().st_ino)], synced  # the new file, then its directory


def test_loader_reexports_check_permissions():
    assert loader.check_permissions is not None and callable(loader.check_replacement)
