"""contrib/grafana/reconciler.json: well formed, and it queries only metrics the agent exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "reconciler.json"

# The exporter's metric names, as scraped (counters with _total, the Info with _info). The one
# list the dashboard and the alert rules (test_prometheus_rules.py) are checked against; a test
# against the live exporter is to compare this list with what it really serves.
METRICS = frozenset(
    {
        "reconciler_tick_duration_seconds",
        "reconciler_ticks_total",
        "reconciler_last_successful_tick_timestamp_seconds",
        "reconciler_actions_total",
        "reconciler_action_retries_total",
        "reconciler_entries",
        "reconciler_members_live",
        "reconciler_groups_owned",
        "reconciler_spec_revision",
        "reconciler_group_running",
        "reconciler_group_desired",
        "reconciler_claims_total",
        "reconciler_failovers_total",
        "reconciler_failover_phase_seconds",
        "reconciler_fence_total",
        "reconciler_spec_valid",
        "reconciler_spec_reloads_total",
        "reconciler_spec_info",
        "reconciler_respawns_total",
        "reconciler_node_twin",
        "reconciler_store_entries_skipped_total",
        "reconciler_store_round_trip_age_seconds",
        "reconciler_lease_remaining_seconds",
        # issue 16: health
        "reconciler_probes_total",
        "reconciler_probe_duration_seconds",
        "reconciler_restarts_total",
        "reconciler_group_failures_total",
        "reconciler_entry_unhealthy",
        "reconciler_group_banned",
        "reconciler_bans_total",
        # issue 15: the cluster's history
        "reconciler_events_total",
        # issue 15: operator intents
        "reconciler_groups_in_maintenance",
        "reconciler_nodes_in_standby",
        "reconciler_maintenance_started_timestamp_seconds",
        "reconciler_moves_total",
        "reconciler_switchover_seconds",
        # issue 17: the failsafe
        "reconciler_failsafe_active",
        "reconciler_failsafe_promises_asked_total",
        "reconciler_failsafe_promises_given_total",
        "reconciler_failsafe_promises_refused_total",
    }
)
HISTOGRAMS = frozenset({"reconciler_tick_duration_seconds", "reconciler_failover_phase_seconds", "reconciler_probe_duration_seconds",
                        "reconciler_switchover_seconds"})
_NAME = re.compile(r"\breconciler_[a-z_]+")
_SERIES = re.compile(r"_(bucket|sum|count)$")


def base_name(name: str) -> str:
    """reconciler_x_seconds_bucket -> reconciler_x_seconds, for histograms only."""
    stripped = _SERIES.sub("", name)
    return stripped if stripped in HISTOGRAMS else name


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def expressions(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_dashboard_shape():
    dash = load()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    names = [v["name"] for v in dash["templating"]["list"]]
    assert "DS_PROMETHEUS" in names
    ds = next(v for v in dash["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_panels_do_not_overlap():
    taken: set[tuple[int, int]] = set()
    for p in all_panels(load()):
        g = p["gridPos"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, p["title"]
        taken |= cells


def test_the_panels_the_issue_asks_for():
    panels = {p["title"]: p for p in all_panels(load())}
    types = {p["type"] for p in panels.values()}
    assert {"stat", "state-timeline", "table", "timeseries"} <= types
    text = json.dumps(load())
    assert "histogram_quantile(0.99" in text and "reconciler_failover_phase_seconds_bucket" in text
    assert "reconciler_tick_duration_seconds_bucket" in text
    assert panels["Group placement"]["type"] == "state-timeline"
    assert "reconciler_group_running" in panels["Group placement"]["targets"][0]["expr"]
    for title in ("Members live", "Failovers", "Tick latency p50 / p99", "Spec valid, revision", "Entries by state", "Action errors and retries"):
        assert title in panels, title


def test_only_exported_metrics_are_queried():
    used = {base_name(m) for e in expressions(load()) for m in _NAME.findall(e)}
    unknown = used - METRICS
    assert not unknown, f"not exported by the agent: {sorted(unknown)}"


def test_every_exported_metric_is_shown():
    used = {base_name(m) for e in expressions(load()) for m in _NAME.findall(e)}
    assert METRICS - used == set()


@pytest.mark.integration
@pytest.mark.needs("promtool")
def test_expressions_are_valid_promql(tmp_path):
    # promtool has no offline query parser, but it parses rule expressions: make each one a
    # recording rule, with Grafana's variables replaced by values Prometheus accepts.
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$node": ".*"}
    rules = []
    for i, e in enumerate(expressions(load())):
        if e.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        for k, v in subst.items():
            e = e.replace(k, v)
        assert "$" not in e, e
        rules.append({"record": f"dashboard:expr_{i}", "expr": e})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
