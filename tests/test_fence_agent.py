"""contrib/fence/fence-agent: a ClusterLabs fence agent driven through its stdin protocol.

The integration tests run the real fence_ipmilan (Debian's fence-agents) against a BMC played
by a fake ipmitool (test_fence_hooks.FAKE_IPMITOOL, given to the agent as ipmitool_path);
the others use a small fence agent double, to see exactly what the hook writes to the
agent's stdin and how it treats an agent without a status action.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import load_test_module

hooks = load_test_module("test_fence_hooks")
run, conf = hooks.run, hooks.conf


def env_for(tmp_path: Path, **extra: str) -> dict:
    return {"RECONCILER_FENCE_DIR": str(tmp_path), **extra}


# --- a fence agent double -------------------------------------------------------------------

# Speaks the stdin protocol: appends each call's settings as a JSON line to $FAKE_AGENT_LOG;
# off answers as $FAKE_AGENT_OFF says (ok or fail); a status action only with
# $FAKE_AGENT_STATUS (on or off: what it answers, as fencing.py does).
FAKE_AGENT = """#!/usr/bin/env python3
import json, os, sys
opts = dict(line.rstrip("\\n").split("=", 1) for line in sys.stdin if "=" in line)
with open(os.environ["FAKE_AGENT_LOG"], "a") as fh:
    fh.write(json.dumps(opts) + "\\n")
status = os.environ.get("FAKE_AGENT_STATUS")
if opts["action"] == "metadata":
    print('<?xml version="1.0" ?>\\n<resource-agent name="fence_fake">\\n<actions>\\n<action name="off" />\\n'
          + ('<action name="status" />\\n' if status else '') + '<action name="metadata" />\\n</actions>\\n</resource-agent>')
elif opts["action"] == "status" and status:
    print("Status: " + status.upper())
    sys.exit(2 if status == "off" else 0)
elif opts["action"] == "off" and os.environ.get("FAKE_AGENT_OFF") == "fail":
    print("2026-01-01 00:00:00,000 ERROR: Failed: Unable to connect to fencing device", file=sys.stderr)
    sys.exit(1)
elif opts["action"] == "off":
    print("Success: Powered OFF")
else:
    sys.exit(1)
"""


@pytest.fixture
def fake_agent(tmp_path):
    path = tmp_path / "fence_fake"
    path.write_text(FAKE_AGENT)
    path.chmod(0o755)
    return path


def calls(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]


def test_settings_reach_the_agent_on_stdin_and_an_agent_without_status_is_trusted(tmp_path, fake_agent):
    conf(tmp_path, "agent-node3.conf",
         f"# from: pcs stonith create pdu fence_fake ip=pdu1 plug=node3 ...\nagent = {fake_agent}\n"
         "ip = 127.0.0.1\nusername = fence\npassword = s3#cret x\nplug = {node}\n")
    done = run("fence-agent", "node3", "port=623", env=env_for(tmp_path, FAKE_AGENT_LOG=str(tmp_path / "agent.log")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "fence-agent: node3 is off (fence_fake has no status action; its off succeeded)"
    metadata, off = calls(tmp_path)
    assert metadata == {"action": "metadata"}  # no settings, no password for a metadata call
    # the password whole ('#' is no comment inside a value), {node} filled in, argv added
    assert off == {"action": "off", "ip": "127.0.0.1", "username": "fence", "password": "s3#cret x", "plug": "node3",
                   "port": "623"}


def test_a_failing_off_fails_with_the_agents_reason(tmp_path, fake_agent):
    conf(tmp_path, "agent-node3.conf", f"agent = {fake_agent}\nip = 127.0.0.1\n")
    done = run("fence-agent", "node3",
               env=env_for(tmp_path, FAKE_AGENT_LOG=str(tmp_path / "agent.log"), FAKE_AGENT_OFF="fail"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "fence-agent: node3: fence_fake action=off failed (exit 1): "
        "2026-01-01 00:00:00,000 ERROR: Failed: Unable to connect to fencing device"
    )


def test_the_status_is_read_back_until_off_or_the_timeout(tmp_path, fake_agent):
    conf(tmp_path, "agent-node3.conf", f"agent = {fake_agent}\nplug = 7\nhook_timeout = 2\n")
    log = str(tmp_path / "agent.log")
    done = run("fence-agent", "node3", env=env_for(tmp_path, FAKE_AGENT_LOG=log, FAKE_AGENT_STATUS="off"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "fence-agent: node3 is off (fence_fake, status read back)"
    assert [c["action"] for c in calls(tmp_path)] == ["metadata", "off", "status"]
    assert calls(tmp_path)[2] == {"action": "status", "plug": "7"}

    started = time.monotonic()
    done = run("fence-agent", "node3", env=env_for(tmp_path, FAKE_AGENT_LOG=log, FAKE_AGENT_STATUS="on"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "fence-agent: node3: fence_fake: not confirmed off in time (status exit 0: Status: ON)")
    assert time.monotonic() - started < 4
    assert [c["action"] for c in calls(tmp_path)].count("status") >= 3  # it asked again, then gave up


@pytest.mark.parametrize("text, args, message", [
    ("agent = fence_ipmilan\npcmk_host_list = node3\n", (), "pcmk_host_list is Pacemaker's own attribute"),
    ("agent = fence_ipmilan\naction = reboot\n", (), "action is the hook's to choose"),
    ("agent = fence_ipmilan\nip = a\nip = b\n", (), "agent-node3.conf:3: ip is set twice"),
    ("agent = fence_ipmilan\nip 10.0.0.1\n", (), "agent-node3.conf:2: expected key = value"),
    ("ip = 10.0.0.1\n", (), "no agent = line"),
    ("agent = ../../bin/sh\n", (), "a fence agent's name (fence_...) or an absolute path"),
    ("agent = fence_nonesuch\n", (), "fence agent fence_nonesuch not found or not executable"),
    ("agent = fence_ipmilan\nhook_timeout = soon\n", (), "timeout must be a number of seconds"),
    ("agent = fence_ipmilan\n", ("password=s3cret",), "password on a command line is visible to every user"),
    ("agent = fence_ipmilan\n", ("ip=1", "ip=2"), "argv: ip is set twice"),
])
def test_bad_settings_fail_naming_the_place(tmp_path, text, args, message):
    conf(tmp_path, "agent-node3.conf", text)
    done = run("fence-agent", "node3", *args, env=env_for(tmp_path))
    assert done.returncode == 1
    assert message in done.stderr, done.stderr


def test_a_config_others_can_read_or_a_missing_one_is_refused(tmp_path):
    done = run("fence-agent", "node3", env=env_for(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path}/agent-node3.conf is missing or empty" in done.stderr
    conf(tmp_path, "agent-node3.conf", "agent = fence_ipmilan\n").chmod(0o640)
    done = run("fence-agent", "node3", env=env_for(tmp_path))
    assert done.returncode == 1
    assert "must be owned by uid" in done.stderr and "mode 640" in done.stderr


def test_bad_node_names_are_usage_errors(tmp_path):
    for bad in ("../etc/passwd", "", "-x"):
        assert run("fence-agent", bad, env=env_for(tmp_path)).returncode == 2
    assert run("fence-agent", env=env_for(tmp_path)).returncode == 2


# --- the real fence_ipmilan against a fake BMC -------------------------------------------------


def bmc(tmp_path: Path, mode: str) -> dict:
    """A fake ipmitool playing node3's BMC (test_fence_hooks.FAKE_IPMITOOL); the hook's env."""
    fake = tmp_path / "ipmitool"
    fake.write_text(hooks.FAKE_IPMITOOL)
    fake.chmod(0o755)
    return env_for(tmp_path, FAKE_BMC=str(tmp_path), FAKE_BMC_MODE=mode)


@pytest.mark.integration
@pytest.mark.needs("fence-agents")
def test_fence_ipmilan_powers_the_node_off_and_reads_it_back(tmp_path):
    env = bmc(tmp_path, "ok")
    # what `pcs stonith create ipmi-node3 fence_ipmilan ip=... username=... password=...
    # lanplus=1 pcmk_host_list=node3` had, without the pcmk_ attribute
    conf(tmp_path, "agent-node3.conf",
         f"agent = fence_ipmilan\nip = 127.0.0.1\nusername = fence\npassword = s3cret\nlanplus = 1\n"
         f"ipmitool_path = {tmp_path / 'ipmitool'}\nhook_timeout = 15\n")
    done = run("fence-agent", "node3", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "fence-agent: node3 is off (fence_ipmilan, status read back)"
    assert (tmp_path / "state").read_text().strip() == "off"
    ipmi = [c.split(" pw=")[0] for c in (tmp_path / "calls").read_text().splitlines()]
    assert all(c.startswith("-I lanplus -H 127.0.0.1 -p 623 -U fence -P s3cret ") for c in ipmi), ipmi
    actions = [c.split(" -N ")[1].split(" ", 1)[1] for c in ipmi]
    off = actions.index("chassis power off")
    assert actions[-1] == "chassis power status" and off < len(actions) - 1, actions  # read back after the off

    # again, for a node already off (another group's takeover): it must succeed again
    done = run("fence-agent", "node3", env=env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.needs("fence-agents")
def test_fence_ipmilan_with_settings_on_argv_and_the_password_in_the_file(tmp_path):
    env = bmc(tmp_path, "ok")
    conf(tmp_path, "agent-node3.conf", "password = s3cret\n")
    done = run("fence-agent", "node3", "agent=fence_ipmilan", "ip=127.0.0.1", "username=fence", "lanplus=1",
               f"ipmitool_path={tmp_path / 'ipmitool'}", "hook_timeout=15", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "state").read_text().strip() == "off"


@pytest.mark.integration
@pytest.mark.needs("fence-agents")
def test_fence_ipmilan_against_a_bmc_that_stays_on_fails_within_the_timeout(tmp_path):
    env = bmc(tmp_path, "stuck")  # the off is accepted, the power stays on
    conf(tmp_path, "agent-node3.conf",
         f"agent = fence_ipmilan\nip = 127.0.0.1\nusername = fence\npassword = s3cret\nlanplus = 1\n"
         f"ipmitool_path = {tmp_path / 'ipmitool'}\nhook_timeout = 4\n")
    started = time.monotonic()
    done = run("fence-agent", "node3", env=env)
    took = time.monotonic() - started
    assert done.returncode == 1
    # fence_ipmilan's own off waits for the power to go (power_timeout, 20s): the hook's budget ends it
    assert done.stderr.strip().splitlines()[-1] == (
        "fence-agent: node3: fence_ipmilan action=off still running at the hook's timeout: killed"), done.stderr
    assert 4 <= took < 8, took
    assert not (tmp_path / "state").exists()
    assert "chassis power off" in (tmp_path / "calls").read_text()


@pytest.mark.integration
@pytest.mark.needs("fence-agents")
def test_fence_ipmilan_with_an_unreachable_bmc_fails_with_its_reason(tmp_path):
    conf(tmp_path, "agent-node3.conf",
         "agent = fence_ipmilan\nip = 127.0.0.1\nusername = fence\npassword = s3cret\nipmitool_path = /bin/false\n"
         "hook_timeout = 15\n")
    done = run("fence-agent", "node3", env=env_for(tmp_path))
    assert done.returncode == 1
    assert "fence_ipmilan action=off failed (exit 1): " in done.stderr, done.stderr
    assert "Failed" in done.stderr.splitlines()[-1]
