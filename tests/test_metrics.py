"""The Prometheus exporter, logs and sd_notify of a live agent: real processes, no mocks.

Each test starts `python3 -m reconciler.cli run` with `--metrics-address` on a free
127.0.0.1 port and scrapes /metrics with urllib. `promtool` (Debian's prometheus package)
lints the exposition, a real Prometheus server scrapes an agent and is queried back, and a
three-node cluster (tests/cluster.py) is crashed to check the failover metrics on the node
that takes over.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from helpers import READ_ERRORS, free_port, load_test_module, wait_until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NODE = "n1"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
GROUPS = ("alpha", "beta")
DEAD_AFTER = 0.65  # the default cluster.timing.dead_after

pytestmark = pytest.mark.integration  # every test starts agents


# --- helpers ----------------------------------------------------------------------------------


# wait_for(fn, timeout, what): a scrape or a file read that fails counts as not yet
wait_for = functools.partial(wait_until, step=0.05, tolerate=READ_ERRORS)


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=3) as resp:
        return resp.read().decode()


class Scrape:
    """One scrape: samples by (name, labels) and the families the exporter declares."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.samples.setdefault(s.name, []).append((dict(s.labels), s.value))
        # "# TYPE name type", also for a labelled family that has no series yet
        self.types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample of `name` whose labels include `labels`, or None."""
        found = [v for lab, v in self.samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def labels(self, name: str) -> list[dict[str, str]]:
        return [lab for lab, _ in self.samples.get(name, [])]

    def families(self) -> set[str]:
        """Metric names as test_grafana_dashboard.METRICS spells them (no *_created)."""
        return {n for n in self.types if not n.endswith("_created")}

    def series_names(self) -> set[str]:
        """Every sample name a query may use: histograms as _bucket/_sum/_count (and the base)."""
        out = set()
        for name, kind in self.types.items():
            if name.endswith("_created"):
                continue
            out.add(name)
            if kind == "histogram":
                out |= {name + "_bucket", name + "_sum", name + "_count"}
        return out


def scrape(address: str) -> Scrape:
    return Scrape(scrape_text(address))


SPEC = """\
[cluster]
name = "metrics"
store = "dir:{root}/store"
state_dir = "{root}/state"
"""


def group(name: str) -> str:
    return f"""
[groups.{name}]
runlevel = "run"

[[groups.{name}.entries]]
tag = "{name}-svc"
mode = "respawn"
runlevels = ["run"]
command = ["sleep", "300"]
"""


class Single:
    """One agent on one node, its spec in tmp_path (0644 files, 0755 directory)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        self.spec_dir = root / "spec"
        self.spec_dir.mkdir(mode=0o755)
        os.chmod(self.spec_dir, 0o755)
        self.spec_file = self.spec_dir / "spec.toml"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = root / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.write(SPEC.format(root=root) + "".join(group(g) for g in GROUPS))

    def write(self, text: str) -> None:
        tmp = self.spec_dir / ".spec.toml.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.spec_file)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> "Single":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler.cli", "run", "--spec", str(self.spec_dir), "--node", NODE,
                 "--metrics-address", self.address, *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )
        return self

    def scrape(self) -> Scrape:
        return scrape(self.address)

    def converged(self) -> Scrape | None:
        """A scrape once every group is claimed and running here."""
        s = self.scrape()
        if s.value("reconciler_groups_owned", node=NODE) == len(GROUPS) and all(
            s.value("reconciler_group_running", node=NODE, group=g) == 1 for g in GROUPS
        ):
            return s
        return None

    def pid_of(self, tag: str) -> int:
        doc = json.loads((self.root / "state" / NODE / "processes.json").read_text())
        rec = next(r for r in doc["records"] if r["tag"] == tag)
        assert rec["state"] == "running", rec
        return rec["pid"]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def single(tmp_path):
    agents: list[Single] = []

    def make() -> Single:
        a = Single(tmp_path / f"a{len(agents)}")
        agents.append(a)
        return a

    yield make
    for a in agents:
        code = a.stop()
        # SIGTERM stops every group: nothing it started may outlive it
        assert code == 0, a.log_path.read_text()[-3000:]


@pytest.fixture
def agent(single):
    return single()


# --- a. the live exporter ------------------------------------------------------------------------


@pytest.mark.needs("promtool")
def test_live_exposition_is_lint_clean_and_sane(agent):
    a = agent.start("--log-format", "json")
    s = wait_for(a.converged, 15, "both groups claimed and running")

    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=s.text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr

    assert s.value("reconciler_ticks_total", node=NODE, result="ok") > 0
    assert s.value("reconciler_ticks_total", node=NODE, result="error") == 0
    assert s.value("reconciler_members_live", node=NODE) == 1
    assert s.value("reconciler_groups_owned", node=NODE) == len(GROUPS)
    assert s.value("reconciler_spec_valid", node=NODE) == 1
    assert s.value("reconciler_spec_reloads_total", node=NODE, result="ok") == 1
    assert s.value("reconciler_claims_total", node=NODE, result="won") == len(GROUPS)
    assert s.value("reconciler_claims_total", node=NODE, result="lost") == 0
    assert s.value("reconciler_actions_total", node=NODE, kind="claim", result="ok") == len(GROUPS)
    assert s.value("reconciler_actions_total", node=NODE, kind="start", result="ok") == len(GROUPS)
    assert abs(s.value("reconciler_last_successful_tick_timestamp_seconds", node=NODE) - time.time()) < 5
    assert s.value("reconciler_tick_duration_seconds_count", node=NODE) >= s.value("reconciler_ticks_total", node=NODE, result="ok")
    for g in GROUPS:
        assert s.value("reconciler_group_running", node=NODE, group=g) == 1
        assert s.value("reconciler_group_desired", node=NODE, group=g) == 1
        assert s.value("reconciler_entries", node=NODE, group=g, state="running") == 1
        assert s.value("reconciler_entries", node=NODE, group=g, state="stopped") == 0
    # the spec digest as an info metric, the same one `reconcile check` prints
    check = subprocess.run([sys.executable, "-m", "reconciler.cli", "check", "--spec", str(a.spec_dir)],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert check.returncode == 0, check.stderr
    digest = re.search(r"digest (\w+)", check.stdout).group(1)
    assert s.labels("reconciler_spec_info") == [{"node": NODE, "digest": digest}]
    assert s.value("reconciler_spec_info", node=NODE, digest=digest) == 1
    # bounded labels only: no pid, message or free text anywhere
    for name, series in s.samples.items():
        for lab, _ in series:
            assert set(lab) <= {"node", "group", "tag", "kind", "result", "state", "phase", "le", "digest", "cause"}, (name, lab)

    # kill -9 of a respawn process: it is respawned, and counted
    victim = a.pid_of("alpha-svc")
    os.kill(victim, signal.SIGKILL)
    s = wait_for(lambda: (x := a.scrape()).value("reconciler_respawns_total", node=NODE, group="alpha", tag="alpha-svc") == 1 and x,
                 10, "reconciler_respawns_total to count the respawn")
    assert s.value("reconciler_respawns_total", node=NODE, group="beta", tag="beta-svc") is None
    wait_for(lambda: a.pid_of("alpha-svc") != victim, 5, "a new alpha-svc pid")

    # a bad edit: the agent keeps the last good spec and says so
    good = a.spec_file.read_text()
    a.write(good + "\n[groups.broken\n")
    s = wait_for(lambda: (x := a.scrape()).value("reconciler_spec_valid", node=NODE) == 0 and x, 10, "spec_valid 0")
    assert s.value("reconciler_spec_reloads_total", node=NODE, result="error") >= 1
    assert s.labels("reconciler_spec_info") == [{"node": NODE, "digest": digest}], "still runs the last good spec"
    assert s.value("reconciler_groups_owned", node=NODE) == len(GROUPS)
    errors = s.value("reconciler_spec_reloads_total", node=NODE, result="error")
    a.write(good)
    s = wait_for(lambda: (x := a.scrape()).value("reconciler_spec_valid", node=NODE) == 1 and x, 10, "spec_valid 1 again")
    assert s.value("reconciler_spec_reloads_total", node=NODE, result="error") == errors
    assert s.value("reconciler_spec_reloads_total", node=NODE, result="ok") >= 2

    # e. --log-format json: every line is a JSON document; every action line names its
    # group, tag, node, reason and result
    assert a.stop() == 0
    lines = [line for line in a.log_path.read_text().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    actions = [d for d in docs if d["logger"] == "reconciler.act" and " -> " in d["message"]]
    kinds = {d["message"].split()[0] for d in actions}
    assert {"claim", "start", "stop", "release"} <= kinds, kinds
    for d in actions:
        assert {"group", "tag", "node", "reason", "result"} <= set(d), d
        assert d["node"] == NODE and d["group"] in GROUPS and d["result"] in ("ok", "error") and d["reason"], d
    # a respawn is the supervisor's line (its start action is at debug: a crash loop would repeat it)
    respawn = [d for d in docs if d["logger"] == "reconciler.process" and d.get("tag") == "alpha-svc" and "respawning" in d["message"]]
    assert respawn and respawn[0]["group"] == "alpha" and respawn[0]["level"] == "info", docs
    assert any(d["level"] == "error" and "keeping the last good spec" in d["message"] for d in docs)


def test_store_health_while_the_store_goes_away_and_comes_back(agent):
    a = agent.start()
    s = wait_for(a.converged, 15, "both groups claimed and running")
    lease = 0.4  # the default cluster.timing.lease
    assert 0 <= s.value("reconciler_store_round_trip_age_seconds", node=NODE) < 1.0
    assert 0 < s.value("reconciler_lease_remaining_seconds", node=NODE) <= lease

    store = a.root / "store"
    os.rename(store, a.root / "store-away")  # the directory store: unreachable, not empty
    gone = time.monotonic()
    s = wait_for(lambda: (x := a.scrape()).value("reconciler_store_round_trip_age_seconds", node=NODE) > 2.0 and x,
                 15, "the round-trip age to grow past 2s")
    # computed at scrape time: it keeps growing, however seldom the loop runs
    assert s.value("reconciler_store_round_trip_age_seconds", node=NODE) <= time.monotonic() - gone + 1.0
    assert s.value("reconciler_lease_remaining_seconds", node=NODE) == 0, "no renewal without the store"
    later = wait_for(lambda: (x := a.scrape()).value("reconciler_store_round_trip_age_seconds", node=NODE)
                     > s.value("reconciler_store_round_trip_age_seconds", node=NODE) + 0.5 and x, 10, "the age to grow")
    assert later.value("reconciler_lease_remaining_seconds", node=NODE) == 0

    os.rename(a.root / "store-away", store)
    s = wait_for(lambda: (x := a.scrape()).value("reconciler_store_round_trip_age_seconds", node=NODE) < 1.0 and x,
                 15, "the round-trip age to drop once the store is back")
    wait_for(lambda: 0 < a.scrape().value("reconciler_lease_remaining_seconds", node=NODE) <= lease, 10,
             "the lease renewed again")
    wait_for(a.converged, 15, "both groups running again")


# --- b. the names the dashboard and the alerts use -----------------------------------------------


def test_dashboard_and_alerts_query_only_live_metrics(agent):
    a = agent.start()
    s = wait_for(a.converged, 15, "both groups claimed and running")
    dashboard = load_test_module("test_grafana_dashboard")
    # the name list the offline dashboard and rule tests check against is the live one
    assert s.families() == set(dashboard.METRICS), (
        f"only live: {sorted(s.families() - dashboard.METRICS)}; only in METRICS: {sorted(dashboard.METRICS - s.families())}"
    )
    assert {n for n, k in s.types.items() if k == "histogram"} == set(dashboard.HISTOGRAMS)
    live = s.series_names()
    name = re.compile(r"\breconciler_[a-z_]+")
    used_in_dashboard = {m for e in dashboard.expressions(dashboard.load()) for m in name.findall(e)}
    used_in_alerts = set(name.findall((ROOT / "contrib" / "prometheus" / "alerts.yml").read_text()))
    assert used_in_dashboard and used_in_alerts
    assert used_in_dashboard - live == set(), "the dashboard queries series the agent does not serve"
    assert used_in_alerts - live == set(), "the alert rules use series the agent does not serve"
    # a counter is queried under its exposed name, with _total
    counters = {n for n, k in s.types.items() if k == "counter"}
    assert counters and all(n.endswith("_total") for n in counters)


# --- c. failover metrics on the node that takes over ------------------------------------------------


@pytest.mark.needs("root", "unshare")
def test_failover_metrics_on_the_new_owner(tmp_path):
    log = str(tmp_path / "guard.log")
    fence_log = tmp_path / "fence.log"
    # both groups prefer n1, then n2: the crash of n1 moves both to n2; beta is fenced first
    fence = f'fence = ["{ROOT}/contrib/fence/fence-test", "{{node}}"]\nfence_timeout = "5s"'
    groups = Cluster.guard_group("alpha", log, extra='nodes = ["n1", "n2", "n3"]') + Cluster.guard_group(
        "beta", log, extra='nodes = ["n1", "n2", "n3"]\n' + fence
    )
    ports = {n: f"127.0.0.1:{free_port()}" for n in ("n1", "n2", "n3")}
    c = Cluster(tmp_path, groups=groups, metrics=ports, env={"FENCE_TEST_LOG": str(fence_log)})
    try:
        # n1 first: on a loaded machine n2 may otherwise claim before n1's agent is up
        c.start("n1")
        for g in ("alpha", "beta"):
            wait_for(lambda: c.runs_on_one(g) == "n1", 15, f"{g} running on n1")
        c.start("n2", "n3")
        for n in ("n1", "n2", "n3"):  # nodes start one after another: wait until all see all
            wait_for(lambda: scrape(ports[n]).value("reconciler_members_live", node=n) == 3, 10, f"{n} to see 3 members")
        before = scrape(ports["n1"])
        assert before.value("reconciler_groups_owned", node="n1") == 2
        assert before.value("reconciler_claims_total", node="n1", result="won") == 2

        c.nodes["n1"].crash()
        for g in ("alpha", "beta"):
            wait_for(lambda: c.runs_on_one(g) == "n2", 10, f"{g} to fail over to n2")

        def settled():
            s = scrape(ports["n2"])
            return s if (s.value("reconciler_failover_phase_seconds_count", node="n2", phase="start") or 0) >= 2 else None

        s = wait_for(settled, 10, "the start phase of both failovers on n2")
        for g in ("alpha", "beta"):
            assert s.value("reconciler_failovers_total", node="n2", group=g) == 1
            assert s.value("reconciler_group_running", node="n2", group=g) == 1
        assert s.value("reconciler_groups_owned", node="n2") == 2
        assert s.value("reconciler_members_live", node="n2") == 2
        assert s.value("reconciler_actions_total", node="n2", kind="takeover", result="ok") == 2
        assert s.value("reconciler_claims_total", node="n2", result="won") == 2
        assert s.value("reconciler_claims_total", node="n2", result="lost") == 0

        def phase(name: str) -> tuple[float, float]:
            return (s.value("reconciler_failover_phase_seconds_count", node="n2", phase=name),
                    s.value("reconciler_failover_phase_seconds_sum", node="n2", phase=name))

        count, total = phase("detect")
        assert count == 2, "one detect per failover"
        # the dead owner's heartbeat stood still for dead_after, plus at most a heartbeat
        # read and a loaded machine's scheduling delay
        assert DEAD_AFTER <= total / count < 2.0, total / count
        count, total = phase("fence")
        assert count == 1, "only beta has a fence hook"
        assert 0 < total < 5.0
        assert s.value("reconciler_fence_total", node="n2", result="ok") == 1
        assert fence_log.read_text().count('"n1"') == 1
        count, total = phase("start")
        assert count == 2 and 0 < total / count < 3.0, (count, total)
        # the phases are histograms: every observation falls into some bucket
        assert s.value("reconciler_failover_phase_seconds_bucket", node="n2", phase="detect", le="+Inf") == 2
        assert s.value("reconciler_failover_phase_seconds_bucket", node="n2", phase="detect", le="0.5") == 0

        # the other survivor took nothing over and lost no race it did not enter
        other = scrape(ports["n3"])
        assert other.labels("reconciler_failovers_total") == []
        assert other.value("reconciler_groups_owned", node="n3") == 0
        assert other.value("reconciler_failover_phase_seconds_count", node="n3", phase="detect") is None
    finally:
        c.stop()
    assert c.violations() == [], "\n".join(c.violations())


# --- d. a real Prometheus server scrapes an agent ------------------------------------------------------


@pytest.mark.needs("prometheus")
def test_prometheus_scrapes_the_agent_and_answers_a_query(agent, tmp_path):
    a = agent.start()
    wait_for(a.converged, 15, "both groups claimed and running")
    port = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "reconciler", "static_configs": [{"targets": [a.address]}]}],
    }))
    with open(tmp_path / "prometheus.log", "wb") as plog:
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=plog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        def query(expr: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=3) as resp:
                doc = json.load(resp)
            assert doc["status"] == "success", doc
            return doc["data"]["result"]

        result = wait_for(lambda: query("reconciler_groups_owned"), 20, "Prometheus to have a sample", step=0.25)
        assert len(result) == 1
        assert result[0]["metric"] == {"__name__": "reconciler_groups_owned", "instance": a.address, "job": "reconciler", "node": NODE}
        assert float(result[0]["value"][1]) == len(GROUPS)
        up = query('up{job="reconciler"}')
        assert float(up[0]["value"][1]) == 1
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            code = prom.wait(20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
            raise
    assert code == 0, (tmp_path / "prometheus.log").read_text()[-3000:]


# --- f. systemd notification ------------------------------------------------------------------------------


def test_sd_notify_ready_watchdog_stopping(agent):
    with tempfile.TemporaryDirectory(prefix="notify") as d:  # sun_path holds 108 bytes
        path = os.path.join(d, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10)
        try:
            a = agent.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
            messages = [sock.recv(4096).decode()]
            assert messages[0].split("\n")[0] == "READY=1", messages
            t0 = time.monotonic()
            while sum(m == "WATCHDOG=1" for m in messages) < 3:
                messages.append(sock.recv(4096).decode())
            # pings come at least every 0.5 s (the renewer's beat to the loop): within half the
            # 2 s watchdog, as systemd asks
            assert time.monotonic() - t0 < 2.5, messages
            wait_for(a.converged, 15, "both groups claimed and running")
            # the services must not inherit the agent's notification socket
            env = Path(f"/proc/{a.pid_of('alpha-svc')}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=")) for v in env)
            a.proc.send_signal(signal.SIGTERM)
            while not messages[-1].startswith("STOPPING=1"):
                messages.append(sock.recv(4096).decode())
            assert a.proc.wait(15) == 0
            kinds = [m.split("\n")[0] for m in messages]
            assert set(kinds) == {"READY=1", "WATCHDOG=1", "STOPPING=1"}, messages
            assert kinds.count("READY=1") == 1 and kinds.count("STOPPING=1") == 1, messages
        finally:
            sock.close()
