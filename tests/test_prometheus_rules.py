"""contrib/prometheus/alerts.yml: valid rules, passing promtool unit tests, real metric names."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import load_test_module

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "contrib" / "prometheus"
PROMTOOL = shutil.which("promtool")

def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.needs("promtool")
def test_rules_are_valid():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@pytest.mark.integration
@pytest.mark.needs("promtool")
def test_rule_unit_tests_pass():
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_the_issue_asks_for_exists():
    text = (RULES / "alerts.yml").read_text()
    for name in (
        "ReconcilerGroupNotRunning",
        "ReconcilerGroupFlapping",
        "ReconcilerNodeDown",
        "ReconcilerSpecInvalid",
        "ReconcilerFencingFailed",
        "ReconcilerLoopStuck",
    ):
        assert f"alert: {name}\n" in text, name


def test_every_alert_has_a_unit_test():
    alerts = set(re.findall(r"^\s*- alert: (\w+)", (RULES / "alerts.yml").read_text(), re.M))
    tested = set(re.findall(r"^\s*alertname: (\w+)", (RULES / "alerts_test.yml").read_text(), re.M))
    assert alerts == tested


def test_rules_use_only_exported_metrics():
    # every reconciler_* word in the file: expressions, and metrics the annotations point to
    used = set(re.findall(r"\breconciler_[a-z_]+", (RULES / "alerts.yml").read_text()))
    assert len(used) >= 8
    metrics = load_test_module("test_grafana_dashboard")
    assert {metrics.base_name(m) for m in used} <= metrics.METRICS


def test_alert_names_are_unique_and_every_alert_has_a_runbook_that_exists():
    text = (RULES / "alerts.yml").read_text()
    names = re.findall(r"^\s*- alert: (\w+)", text, re.M)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    runbooks = re.findall(r'^\s*runbook_url: "docs/operations\.md#([\w-]+)"', text, re.M)
    assert runbooks == [f"alert-{n.lower()}" for n in names]
    operations = (HERE.parent / "docs" / "operations.md").read_text()
    for anchor in runbooks:
        assert f'<a id="{anchor}"></a>' in operations, anchor
