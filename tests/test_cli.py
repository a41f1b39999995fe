"""The command line's conventions (issue 18, item 3): exit codes, refused option combinations,
--json on check and --dry-run, help examples, shell completion, `reconcile logs`, and `tell`
on any TOML layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from click.shell_completion import BashComplete

from reconciler import cli
from reconciler import spec as specmod
from reconciler.act import logs, stamps

from helpers import reconcile, wait_until, write_file

SPEC = """\
# the cluster
[cluster]
name = "t"

[groups.web]
runlevel = "run"
nodes = ["n1", "n2"]

[[groups.web.entries]]
tag = "server"
runlevels = ["run", "maint"]
command = ["sleep", "100"]

[groups.db]
nodes = ["n3"]
runlevel = "stop"

[[groups.db.entries]]
tag = "pg"
runlevels = ["run"]
command = ["sleep", "100"]
"""


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)  # the loader's trust checks
    return write_file(tmp_path / "cluster.toml", SPEC)


# --- exit codes and refused combinations ----------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["--dry-run", "--bogus"], "No such option '--bogus'"),
    (["bogus"], "No such command 'bogus'"),
    (["tell"], "Missing argument 'GROUP'"),
    (["--node-down", "n2"], "--node-down needs --dry-run"),
    (["--json"], "--json needs --dry-run"),
    (["--dry-run", "status"], "--dry-run is not an option of `status`"),
    (["--dry-run", "check"], "--dry-run is not an option of `check`"),
    (["--json", "check"], "--json goes after the command"),
    (["--node-down", "n2", "status"], "--node-down: not used by `status`"),
    (["--node", "n1", "check"], "--node: not used by `check`"),
    (["--spec", "x", "import", "cltab"], "--spec: not used by `import`"),
    (["run", "--node-down", "n2"], "--node-down needs --dry-run"),
    (["run", "--json"], "--json needs --dry-run"),
    (["--node-down", "n2", "run"], "--node-down needs --dry-run"),
    (["run", "--once", "--dry-run"], "--once: not used with --dry-run"),
    (["run", "--dry-run", "--metrics-address", "off"], "--metrics-address: not used with --dry-run"),
    (["run", "--dry-run", "--log-format", "json"], "--log-format: not used with --dry-run"),
    (["run", "--dry-run", "-v"], "--verbose: not used with --dry-run"),
    (["--spec", "a.toml", "check", "--spec", "b.toml"], "--spec given twice (a.toml and b.toml)"),
    (["logs", "web"], "'web': expected GROUP/TAG"),
    (["logs", "web/server", "-n", "-1"], "-1 is not in the range x>=0"),
])
def test_usage_errors_exit_64_with_one_line(args, says):
    p = reconcile(*args)
    assert p.returncode == cli.EX_USAGE == 64, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("reconcile: ") and says in p.stderr, p.stderr


def test_dry_run_exit_codes_differ_from_usage_and_error(spec):
    p = reconcile("--dry-run", "--spec", str(spec), "--node", "n1")
    assert p.returncode == 2, p.stderr  # changes pending: the store was never set up, web is unclaimed
    assert "claim web: unclaimed and this node is candidate 1 of 2" in p.stdout
    p = reconcile("--dry-run", "--spec", str(spec.with_name("missing.toml")), "--node", "n1")
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    # the group's --spec and --node are the command's, and the group's --node-down run's
    p = reconcile("--spec", str(spec), "--node", "n1", "--node-down", "n2", "run", "--dry-run")
    assert p.returncode == 2 and "claim web" in p.stdout, p.stderr


def test_help_has_an_example_and_the_exit_codes_for_every_command():
    for command in [[], *[[name] for name in cli.main.commands]]:
        p = reconcile(*command, "--help")
        assert p.returncode == 0, p.stderr
        assert "Examples:\n    reconcile " in p.stdout, (command, p.stdout)
        assert "64 usage error" in p.stdout.replace("\n ", " ").replace("  ", " "), (command, p.stdout)
    assert set(cli.USES) == set(cli.main.commands)  # each command says which group options it reads


def test_the_exit_codes_are_documented_in_one_table():
    doc = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 64 |"):
        assert code in doc
    assert "docs/cli.md" in (Path(__file__).parent.parent / "README.md").read_text()


# --- --json -----------------------------------------------------------------------------------


def test_dry_run_json_is_the_plan_with_its_reasons(spec):
    p = reconcile("--dry-run", "--json", "--spec", str(spec), "--node", "n1")
    assert p.returncode == 2, p.stderr
    doc = json.loads(p.stdout)
    assert doc["node"] == "n1" and doc["converged"] is False and doc["notes"] == {} and doc["stopped"] == ""
    assert [(a["node"], a["kind"], a["group"], a["tag"]) for a in doc["steps"]] == [("n1", "claim", "web", ""),
                                                                                    ("n1", "start", "web", "server")]
    assert doc["steps"][0]["reason"] == "unclaimed and this node is candidate 1 of 2" and doc["steps"][0]["at"] == 0
    assert doc["state"] == {"web": {"owner": "n1", "runs_on": ["n1"]}, "db": {"owner": None, "runs_on": []}}
    text = reconcile("run", "--dry-run", "--spec", str(spec), "--node", "n1")
    # one document, two renderings: every step (node, time), then the state it leads to
    assert text.stdout.splitlines() == [f"{a['describe']}  (n1, +0.00s)" for a in doc["steps"]] + [
        "then:", "  db: runs nowhere", "  web: runs on n1"]
    p = reconcile("--dry-run", "--json", "--spec", str(spec), "--node", "n3")  # db's only node; db is stopped
    assert p.returncode == 0 and json.loads(p.stdout)["converged"] is True, p.stdout


def test_check_json(spec):
    p = reconcile("check", "--json", "--spec", str(spec))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["digest"] == specmod.load(spec).digest() and doc["problems"] == [] and doc["warnings"] == []
    assert [g["name"] for g in doc["groups"]] == ["web", "db"]
    web = doc["groups"][0]
    assert web["nodes"] == ["n1", "n2"] and web["runlevel"] == "run" and web["worst_failover"] == pytest.approx(web["detect"])
    assert set(doc["timing"]) == {"heartbeat", "lease", "dead_after", "minimum_dead_after"}
    write_file(spec, SPEC.replace('["sleep", "100"]', '["/nonexistent/x"]', 1))
    p = reconcile("check", "--json", "--spec", str(spec))
    assert p.returncode == 1
    assert json.loads(p.stdout)["problems"] == [f"{spec}: groups.web.entries[0].command: /nonexistent/x: command not found"]


# --- completion ---------------------------------------------------------------------------------


def completions(args: list[str], incomplete: str, env: dict[str, str] | None = None) -> list[str]:
    """What the shell gets (click's bash completion, as `_RECONCILE_COMPLETE=bash_complete` runs it)."""
    return [c.value for c in BashComplete(cli.main, {}, "reconcile", "_RECONCILE_COMPLETE").get_completions(args, incomplete)]


def test_completion_of_groups_nodes_and_entries(spec, monkeypatch):
    assert completions(["--spec", str(spec), "tell"], "") == ["web", "db"]
    assert completions(["--spec", str(spec), "tell"], "w") == ["web"]
    assert completions(["--spec", str(spec), "--dry-run", "--node-down"], "n") == ["n1", "n2", "n3"]
    assert completions(["--spec", str(spec), "logs"], "") == ["web/server", "db/pg"]
    monkeypatch.setenv("RECONCILER_SPEC", str(spec))  # no --spec typed: the default's
    assert completions(["tell"], "d") == ["db"]


def test_completion_never_fails_the_shell_on_a_bad_spec(spec, tmp_path):
    write_file(spec, "[groups.web\n")
    assert completions(["--spec", str(spec), "tell"], "") == []
    assert completions(["--spec", str(tmp_path / "missing"), "--node"], "") == []
    # through the installed script, as the shell calls it
    script = Path(sys.executable).parent / "reconcile"
    env = {**os.environ, "_RECONCILE_COMPLETE": "bash_complete", "COMP_WORDS": f"reconcile --spec {spec} tell ", "COMP_CWORD": "4"}
    p = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    write_file(spec, SPEC)
    p = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert p.stdout.split() == ["plain,web", "plain,db"], p.stdout


def test_completion_script_is_generated():
    script = Path(sys.executable).parent / "reconcile"
    p = subprocess.run([str(script)], env={**os.environ, "_RECONCILE_COMPLETE": "bash_source"}, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "_reconcile_completion" in p.stdout, p.stderr


# --- reconcile logs ----------------------------------------------------------------------------


def log_path(spec: Path, node: str = "n1") -> Path:
    path = Path(specmod.load(spec).state_dir) / node / "logs" / "web.server.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as fh:
        fh.write("".join(f"{line}\n" for line in lines))


def unstamped(out: list[str]) -> list[str]:
    return [line.split(" ", 1)[1] for line in out if not line.startswith("-- ")]


def test_logs_stamp_each_line_from_the_index_of_times(spec):
    path = log_path(spec)
    append(path, "one", "two")
    stamps.Stamps(path.parent).note(logs.sizes(path.parent), time.mktime((2026, 12, 7, 12, 0, 1, 0, 0, -1)) + 0.25)
    append(path, "three")
    os.utime(path, (time.mktime((2026, 12, 7, 12, 0, 2, 0, 0, -1)),) * 2)
    p = reconcile("logs", "web/server", "--spec", str(spec), "--node", "n1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1:] == ["2026-12-07T12:00:01.250 one", "2026-12-07T12:00:01.250 two", "2026-12-07T12:00:02.000 three"]


def test_logs_across_rotations_with_n(spec):
    path = log_path(spec)
    policy = logs.Policy(max_bytes=1, keep=3)
    append(path, "one", "two")
    logs.rotate(path, policy)
    append(path, "three")
    logs.rotate(path, policy)
    append(path, "four", "five")
    p = reconcile("logs", "web/server", "--spec", str(spec), "--node", "n1")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    # each line stamped (no agent wrote an index here: its segment's mtime, act/stamps.py)
    assert all(re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} \w+", line) for line in out if not line.startswith("-- ")), out
    assert unstamped(out) == ["one", "two", "three", "four", "five"]
    heads = [line for line in out if line.startswith("-- ")]
    assert [h.split(":")[0] for h in heads] == ["-- web.server.log.2", "-- web.server.log.1", "-- web.server.log"]
    assert all(" last written 20" in h for h in heads)
    p = reconcile("logs", "web/server", "-n", "3", "--spec", str(spec), "--node", "n1")
    assert unstamped(p.stdout.splitlines()) == ["three", "four", "five"]
    assert p.stdout.splitlines()[0].startswith("-- web.server.log.1: last written ")
    p = reconcile("logs", "web/server", "-n", "0", "--spec", str(spec), "--node", "n1")
    assert p.returncode == 0 and p.stdout == ""


def test_logs_refuses_an_unknown_entry_and_a_missing_directory(spec):
    p = reconcile("logs", "web/nope", "--spec", str(spec), "--node", "n1")
    assert p.returncode == 1 and "no entry web/nope (known: web/server, db/pg)" in p.stderr and len(p.stderr.splitlines()) == 1
    p = reconcile("logs", "web/server", "--spec", str(spec), "--node", "n9")
    assert p.returncode == 1 and "no logs here" in p.stderr, p.stderr


def test_logs_follow_across_a_rotation(spec):
    path = log_path(spec)
    append(path, "old")
    proc = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "logs", "web/server", "-f", "--spec", str(spec), "--node", "n1"],
                            stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(s.endswith(" old\n") for s in seen), 10, "the existing line")
        append(path, "before rotation")
        wait_until(lambda: any(s.endswith(" before rotation\n") for s in seen), 10, "a followed line")
        # written, then rotated before the follower looked: read from the copy
        append(path, "just before")
        logs.rotate(path, logs.Policy(max_bytes=1, keep=2))
        append(path, "after rotation")
        wait_until(lambda: any(s.endswith(" after rotation\n") for s in seen), 10, "a line after the rotation")
        followed = [s.split(" ", 1)[1] for s in seen if not s.startswith("-- ") and not s.endswith(" old\n")]
        assert followed == ["before rotation\n", "just before\n", "after rotation\n"], seen
        assert all(s[:4].isdigit() and s[10] == "T" for s in seen if s.endswith("rotation\n"))  # a timestamp each
    finally:
        proc.terminate()  # (a plain SIGTERM ends it: only `run` keeps the early signals)
        assert proc.wait(10) == -15


def test_follower_after_the_live_file_grew_past_the_old_offset():
    """A rotation, then more written than before, all between two polls: the new .1 tells."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g.t.log"
        append(path, "a")
        f = logs.Follower(path)
        append(path, "b")
        logs.rotate(path, logs.Policy(max_bytes=1, keep=1))
        append(path, "c" * 10)
        assert f.poll() == ["b", "c" * 10]
        append(path, "partial")
        assert f.poll() == ["partial"]
        with open(path, "a") as fh:
            fh.write("no newline yet")
        assert f.poll() == []
        append(path, "")
        assert f.poll() == ["no newline yet"]


# --- tell on any layout ---------------------------------------------------------------------------

DOTTED = """\
# web, written with dotted keys
cluster.name = "t"
groups.web.runlevel = "run"   # keep this comment
groups.web.entries = [
  { tag = "server", runlevels = ["run", "maint"], command = ["sleep", "100"] },  # and this
]
"""


def test_tell_on_dotted_keys_keeps_comments(tmp_path):
    os.chmod(tmp_path, 0o755)
    text = DOTTED
    f = write_file(tmp_path / "web.toml", text)
    assert specmod.load(f).groups["web"].runlevel == "run"
    p = reconcile("tell", "web", "maint", "--spec", str(f))
    assert p.returncode == 0, p.stderr
    new = f.read_text()
    assert new == text.replace('groups.web.runlevel = "run"   # keep', 'groups.web.runlevel = "maint"   # keep')
    assert specmod.load(f).groups["web"].runlevel == "maint"


@pytest.mark.parametrize("text", [
    '[cluster]\nname = "t"\n\n[groups]\n# the web group\nweb.runlevel = "run"\nweb.entries = [{ tag = "s", runlevels = ["run", "maint"], command = ["sleep", "1"] }]\n',
    'groups = { web = { runlevel = "run", entries = [{ tag = "s", runlevels = ["run", "maint"], command = ["sleep", "1"] }] } }  # inline\n[cluster]\nname = "t"\n',
    '[cluster]\nname = "t"\n\n[groups.web]  # no runlevel key yet: it defaults\n\n[[groups.web.entries]]\ntag = "s"\nrunlevels = ["run", "maint"]\ncommand = ["sleep", "1"]\n',
])
def test_tell_on_other_layouts(tmp_path, text):
    os.chmod(tmp_path, 0o755)
    f = write_file(tmp_path / "web.toml", text)
    p = reconcile("tell", "web", "maint", "--spec", str(f))
    assert p.returncode == 0, p.stderr
    new = f.read_text()
    assert specmod.load(f).groups["web"].runlevel == "maint"
    for line in text.splitlines():
        if "#" in line:
            assert line.split("#", 1)[1] in new  # comments survive
    before, after = tomllib.loads(text), tomllib.loads(new)
    before["groups"]["web"]["runlevel"] = "maint"
    assert before == after


def test_follower_during_a_rotation_reads_nothing_twice(tmp_path):
    """The copy renamed into place, the live file not truncated yet: the follower reads on
    from the copy's end, and from 0 once the truncation comes."""
    import shutil

    path = tmp_path / "g.t.log"
    append(path, "a")
    f = logs.Follower(path)
    append(path, "b")
    shutil.copy(path, tmp_path / "tmp")
    os.replace(tmp_path / "tmp", tmp_path / "g.t.log.1")
    assert f.poll() == ["b"]
    append(path, "c")  # written between the copy and the truncation (the copy lacks it; the follower read it)
    assert f.poll() == ["c"]
    os.truncate(path, 0)
    append(path, "d")
    assert f.poll() == ["d"]
