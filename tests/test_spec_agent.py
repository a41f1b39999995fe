"""Issue 12, items 8 and 9, on a running agent: an emptied spec stops nothing (unless the spec
says `stop_all = true`), and edits of a spec reached through a symbolic link are applied.

Uses the single-agent harness of tests/test_agent.py (real `reconcile run` processes).
"""

from __future__ import annotations

import os
import time

import pytest

from test_agent import HEADER, TEST_TIMING, agents, entry, env, group, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration  # every test starts an agent


def test_an_emptied_spec_keeps_the_group_running(env, agents):
    """Item 9: `: > spec.toml` was a valid spec with no groups, and stopped everything."""
    env.write(group("g") + entry("srv", "respawn", ["sleep", "1001"]))
    agents()
    pid = wait_for(lambda: env.running("srv"), 10, "srv running")
    with open(env.spec_file, "w"):
        pass  # : > spec.toml
    error = wait_for(lambda: env.status()["spec_error"], 5, "the refusal published")
    assert error == (
        f"{env.spec_dir}: groups: would stop every group that runs (g) by removing it: refused, the last good spec stays;"
        ' to stop them all, set stop_all = true in [cluster] (or each group\'s runlevel to "stop")'
    ), error
    time.sleep(1.0)  # several reconcile passes: the group is still wanted (the time passing is the test)
    assert env.running("srv") == pid
    assert env.status()["groups"]["g"]["desired"] == "run"

    # The operator says so: the same [cluster], stop_all = true, no groups.
    env.write("", timing="stop_all = true\n" + TEST_TIMING)
    wait_for(lambda: not env.running("srv"), 15, "srv stopped")
    wait_for(lambda: env.status()["spec_error"] == "", 5, "spec_error cleared")
    assert env.marked("sleep 1001") == []


def test_groups_set_to_stop_by_name_are_not_refused(env, agents):
    env.write(group("g") + entry("srv", "respawn", ["sleep", "1002"]))
    agents()
    wait_for(lambda: env.running("srv"), 10, "srv running")
    env.write(group("g", "stop") + entry("srv", "respawn", ["sleep", "1002"]))
    wait_for(lambda: not env.running("srv"), 15, "srv stopped")
    assert env.status()["spec_error"] == ""


def test_first_start_with_an_empty_spec_is_fine(env, agents):
    env.write("")
    agents()
    wait_for(lambda: env.status()["spec_error"] == "" and env.status()["groups"] == {}, 10, "an empty status")


def test_edits_of_a_symlinked_spec_are_applied(env, agents, tmp_path):
    """Item 8: only the link's directory was watched, so editing the file it points to (in
    another directory) was never applied."""
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    target = real / "web.toml"

    def write_target(runlevel: str) -> None:  # atomically, as an editor would, in the target's directory
        tmp = real / ".web.toml.tmp"
        text = HEADER.format(timing=TEST_TIMING) + group("g", runlevel) + entry("srv", "respawn", ["sleep", "1003"])
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)

    write_target("run")
    link = env.spec_dir / "spec.toml"
    link.symlink_to(target)  # relative paths in [cluster] resolve against the link's directory
    agents("--spec", str(link))  # (the last --spec wins)
    pid = wait_for(lambda: env.running("srv"), 10, "srv running")
    write_target("stop")
    wait_for(lambda: not env.running("srv"), 10, "the edit of the target applied: srv stopped")
    assert not os.path.exists(f"/proc/{pid}") or env.marked("sleep 1003") == []
    assert link.is_symlink()


def test_a_repointed_link_is_followed(env, agents, tmp_path):
    """The link is made to point into a third directory: edits there are applied too."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir(mode=0o755)

    def write_in(d, runlevel: str) -> None:
        tmp = d / ".web.toml.tmp"
        tmp.write_text(HEADER.format(timing=TEST_TIMING) + group("g", runlevel) + entry("srv", "respawn", ["sleep", "1004"]))
        os.chmod(tmp, 0o644)
        os.replace(tmp, d / "web.toml")

    write_in(dirs[0], "run")
    write_in(dirs[1], "party")  # not a runlevel of any entry: the link will first lead to a bad spec
    link = env.spec_dir / "spec.toml"
    link.symlink_to(dirs[0] / "web.toml")
    agents("--spec", str(link))
    wait_for(lambda: env.running("srv"), 10, "srv running")
    new_link = env.spec_dir / ".spec.toml.new"
    new_link.symlink_to(dirs[1] / "web.toml")
    os.replace(new_link, link)  # the link's directory changes: reloaded (refused), and b/ is watched from now on
    wait_for(lambda: "groups.g.runlevel: 'party'" in env.status()["spec_error"], 10, "the bad target reported")
    assert env.running("srv")
    write_in(dirs[1], "stop")
    wait_for(lambda: not env.running("srv"), 10, "the edit in the new target's directory applied")


def test_a_repointed_directory_link_is_applied_without_a_watch_event(env, agents, tmp_path):
    """The spec is a symlink to a directory; re-pointing that link changes nothing in any
    watched directory (the watch follows the link's old target), so no watch event reports it:
    the agent's once-a-tick look at the spec files (specwatch.fingerprint) still applies it.
    The same look catches an edit made while the watch was still being set up."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d, runlevel in zip(dirs, ("run", "stop")):
        d.mkdir(mode=0o755)
        (d / "web.toml").write_text(HEADER.format(timing=TEST_TIMING) + group("g", runlevel) + entry("srv", "respawn", ["sleep", "1005"]))
        os.chmod(d / "web.toml", 0o644)
    link = tmp_path / "spec.d"
    link.symlink_to(dirs[0])
    agents("--spec", str(link))
    wait_for(lambda: env.running("srv"), 10, "srv running")
    new_link = tmp_path / ".spec.d.new"
    new_link.symlink_to(dirs[1])
    os.replace(new_link, link)  # tmp_path itself is not watched: only the tick can see this
    wait_for(lambda: not env.running("srv"), 10, "the re-pointed directory applied: srv stopped")
