"""Mount observation and actions against the real kernel.

The parser and option rules are checked in-process; every scenario that mounts runs in
tests/resource_mount_scenarios.py under `unshare -m --propagation private`, so the
host's mount table is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.observe import mounts as obs
from reconciler.spec import Mount

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "resource_mount_scenarios.py"


def run_scenario(name: str, work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, str(HELPER), name, str(work)],
        capture_output=True, text=True, timeout=40, env=env, cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"


@pytest.mark.integration
@pytest.mark.needs("root", "unshare", "mount")
@pytest.mark.parametrize("scenario", ["tmpfs", "bind", "options", "busy", "bad_input"])
def test_scenario(scenario: str, tmp_path: Path) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    run_scenario(scenario, tmp_path)
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    assert before.count("\n") == Path("/proc/self/mountinfo").read_text().count("\n")


@pytest.mark.integration
@pytest.mark.needs("root", "unshare", "mount", "loop")
def test_loop_scenario(tmp_path: Path) -> None:
    run_scenario("loop", tmp_path)


# --- parsing and comparison, in-process --------------------------------------------------

SAMPLE = (
    "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n"
    "40 1 0:5 / /x rw - tmpfs  rw,size=4k\n"
    "41 40 0:6 / /x rw,nosuid - tmpfs top rw,size=1024k,mode=755\n"
    "42 1 0:7 / /tab\\011and\\012nl\\134 ro - proc proc rw\n"
    "garbage line\n"
)


def test_parse_escapes_optional_fields_and_super_options() -> None:
    t = obs.parse(SAMPLE)
    assert len(t) == 4
    a = t[0]
    assert (a.source, a.target, a.fstype, a.root) == ("/dev/root", "/mnt two", "ext3", "/mnt1")
    assert a.options == ("rw", "noatime") and a.optional == ("master:1", "shared:2")
    assert a.super_options == ("rw", "errors=continue") and (a.major, a.minor) == (98, 0)
    assert t[1].source == "" and t[1].super_options == ("rw", "size=4k")
    assert t[3].target == "/tab\tand\nnl\\"


def test_find_picks_the_topmost_of_stacked_mounts() -> None:
    t = obs.parse(SAMPLE)
    assert obs.find(t, "/x").source == "top"
    assert obs.find(t, "/nothing") is None


def test_real_mountinfo_parses() -> None:
    t = obs.read()
    assert t and any(m.target == "/" for m in t)
    assert all(m.fstype for m in t)


def info(options: str, super_options: str = "rw", optional: str = "") -> obs.MountInfo:
    return obs.MountInfo(1, 0, 0, 9, "/", "/x", tuple(options.split(",")), tuple(optional.split()), "tmpfs", "s",
                         tuple(super_options.split(",")))


@pytest.mark.parametrize(
    "requested, options, super_options, optional, diffs",
    [
        ("defaults,auto,nofail,_netdev,x-systemd.automount,rw", "rw,relatime", "rw", "", []),
        ("size=2m", "rw", "rw,size=2048k", "", []),
        ("size=1000", "rw", "rw,size=4k", "", []),  # rounded up to a page
        ("size=2m", "rw", "rw,size=1024k", "", ["size=2m requested, size=1024k in effect"]),
        ("mode=0755,uid=root,gid=0", "rw", "rw,mode=755,uid=0,gid=0", "", []),
        ("ro", "rw", "rw", "", ["ro requested, rw in effect"]),
        ("rw", "ro", "rw", "", ["rw requested, ro in effect"]),
        ("exec,suid", "rw,nosuid", "rw", "", ["suid requested, nosuid in effect"]),
        ("noexec,nosuid", "rw,nosuid", "rw", "", ["noexec requested, not in effect"]),
        ("strictatime", "rw,relatime", "rw", "", ["strictatime requested, relatime in effect"]),
        ("nr_inodes=1k", "rw", "rw,nr_inodes=1024", "", []),
        ("huge=always", "rw", "rw", "", ["huge=always requested, no huge in effect"]),
        ("shared", "rw", "rw", "", ["shared requested, propagation is private"]),
        ("shared", "rw", "rw", "shared:3", []),
    ],
)
def test_option_rules(requested: str, options: str, super_options: str, optional: str, diffs: list[str]) -> None:
    assert obs.option_differences(requested, info(options, super_options, optional)) == diffs


def test_check_states_without_the_kernel() -> None:
    t = obs.parse("50 1 0:40 / /srv/x rw,relatime - tmpfs data rw,size=1024k\n")
    assert obs.check(Mount(source="data", target="/srv/x", fstype="tmpfs"), t).state == "running"
    assert obs.check(Mount(source="data", target="/srv/y", fstype="tmpfs"), t).state == "stopped"
    c = obs.check(Mount(source="data", target="/srv/x", fstype="ext4", options="size=2m"), t)
    assert c.state == "mismatch" and not c.options_only
    assert c.message == "/srv/x: fstype is tmpfs, not ext4; size=2m requested, size=1024k in effect"
    c = obs.check(Mount(source="data", target="/srv/x", fstype="tmpfs", options="size=2m"), t)
    assert c.state == "mismatch" and c.options_only
