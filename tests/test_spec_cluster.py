"""Issue 12, item 1, on two agents and the double-run checker (make_cluster): an unsafe
timing edit (`clock_slack = -0.9`, `dead_after = "60ms"`) used to pass validation, was
applied by both agents, and the same group ran on both nodes at once (28 overlapping samples
in 6 s). Now every agent refuses the edit, reports it, and keeps its last good spec.
"""

from __future__ import annotations

import json
import time

import pytest

from cluster import Cluster
from helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]


def test_an_unsafe_timing_edit_is_refused_and_nothing_runs_twice(make_cluster, tmp_path):
    log = str(tmp_path / "guard.log")
    names = ("g1", "g2", "g3")
    c = make_cluster(nodes=("n1", "n2"), groups="".join(Cluster.guard_group(n, log) for n in names))
    c.start()
    # Both agents must have loaded the good spec before the edit (c.start() returns once the
    # processes exist; an agent still starting up would load the bad spec and exit).
    wait_until(lambda: {p.stem for p in (c.store / "status").glob("*.json")} == {"n1", "n2"}, 10, what="both agents publishing")
    for g in names:
        wait_until(lambda: c.runs_on_one(g), 10, what=f"{g} on one node")
    owners = {g: c.runs_on_one(g) for g in names}
    c.write("cluster.toml", f"""
        [cluster]
        name = "test"
        store = "{c.store_url}"
        state_dir = "{tmp_path / 'state'}"
        [cluster.timing]
        clock_slack = -0.9
        dead_after = "60ms"
    """)
    cluster_file = c.spec_dir / "cluster.toml"
    expected = f"{cluster_file}: cluster.timing.clock_slack: -0.9 is out of range: must be at least 0 and at most 0.1"

    def published(node: str) -> str:
        try:
            return json.loads((c.store / "status" / f"{node}.json").read_text()).get("spec_error", "")
        except (OSError, ValueError):  # not written yet, or being replaced
            return ""

    for n in c.nodes:
        wait_until(lambda: published(n).startswith(expected), 10, what=f"{n} to report the refused edit")
    deadline = time.monotonic() + 6.0  # as long as the reproduction ran
    while time.monotonic() < deadline:
        for g in names:
            assert len(c.running(g)) <= 1, (g, c.running(g))
        time.sleep(0.1)  # sampling for the whole window: the time passing is the test
    assert {g: c.runs_on_one(g) for g in names} == owners  # nothing moved, nothing stopped
    # (teardown: the double-run checker over the whole guard log must find nothing)
