"""Write-ahead records fail closed (issue 12, item 4): a mount or address whose record in
STATE/NODE/resources.json cannot be written is not applied.

The agent runs as in tests/test_resources_agent.py (its `lab` fixture: a network namespace
with a veth, the agent in a private mount namespace), with its node's state directory on a
small tmpfs mounted inside that mount namespace, which the test fills up.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from cluster import Cluster
from helpers import wait_until
from test_resources_agent import addresses, data_and_address, lab, mounted  # noqa: F401 (lab: the fixture)

VIP = "198.51.100.20/24"

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "ip", "unshare", "nsenter", "mount")]


def test_a_full_state_directory_applies_no_address_and_no_mount(lab, tmp_path):  # noqa: F811
    ns = lab.single()
    log = str(tmp_path / "guard.log")
    target = tmp_path / "data"
    c = lab.cluster(nodes=("n1",), groups=Cluster.guard_group("web", log), netns={"n1": ns})
    state = tmp_path / "state" / "n1"
    state.mkdir(parents=True)
    c.pre_exec["n1"] = f"mount -t tmpfs -o size=1m tmpfs {state}"
    node = c.nodes["n1"].start()
    wait_until(lambda: c.runs_on_one("web") == "n1", 10, what="web running")
    fill = subprocess.run(["nsenter", "-t", str(node.agent_pid), "-m", "dd", "if=/dev/zero", f"of={state}/fill", "bs=4k"],
                          capture_output=True, timeout=20)
    assert b"No space left" in fill.stderr, fill.stderr

    entries = data_and_address("web", target, VIP)
    c.write("groups.toml", Cluster.guard_group("web", log, entries=entries))
    listed = Path(f"/proc/{node.agent_pid}/root{state}/resources.json")
    want = f"cannot record mount {target} in {state}/resources.json: No space left on device: not applied"
    wait_until(lambda: want in node.log.read_text(), 5, what="the mount refused")
    entry = wait_until(lambda: c.status()["groups"]["web"]["entries"].get("web-data", {}).get("message"), 5,
                       what="the error in status")
    assert entry == want, entry
    time.sleep(1.0)  # retries: still refused
    assert mounted(node.agent_pid, target) == []
    assert VIP not in addresses(ns)
    assert "web-data" not in (listed.read_text() if listed.exists() else "")

    # The mount entry removed: the address is next, and refused the same way.
    only_vip = entries[entries.index('[[groups.web.entries]]\ntag = "web-vip"'):]
    c.write("groups.toml", Cluster.guard_group("web", log, entries=only_vip))
    want = f"cannot record {VIP} in {state}/resources.json: No space left on device: not applied"
    wait_until(lambda: want in node.log.read_text(), 5, what="the address refused")
    time.sleep(1.0)  # retries: still refused (the time passing is the test)
    assert VIP not in addresses(ns)

    # The agent paused: its lease lapses, the keeper fires; nothing of it remains.
    node.pause()
    wait_until(lambda: c.running("web") == set(), 5, what="the keeper to stop the guard")
    time.sleep(0.5)  # the keeper's removals follow its kills: a moment for the last of them
    assert VIP not in addresses(ns) and mounted(node.agent_pid, target) == []
    node.resume()

    # Room again: the record is written, then the address applied.
    subprocess.run(["nsenter", "-t", str(node.agent_pid), "-m", "rm", f"{state}/fill"], check=True, timeout=10)
    wait_until(lambda: VIP in addresses(ns), 10, what="the address once it can be recorded")
    assert any(r.get("ip") == VIP for r in json.loads(listed.read_text())["resources"])
    assert c.violations() == []
