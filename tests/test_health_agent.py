"""Issue 16 with real services on one node: an HTTP server stopped with SIGSTOP is restarted
after `failures` failed probes and not before; start_period is respected; a tcp probe against
a server that stops listening; a command probe; an address deleted behind the agent's back is
restored at once (a kernel event), not at the next tick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import Cluster
from helpers import free_port, read_pid, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "unshare")]

HERE = Path(__file__).resolve().parent
SERVER = str(HERE / "health_server.py")
INTERVAL, TIMEOUT, FAILURES = 0.3, 0.15, 3


def entry(group: str, tag: str, command: list[str], health: str, *, extra: str = "") -> str:
    return f"""
[groups.{group}]
runlevel = "run"
[[groups.{group}.entries]]
tag = "{tag}"
runlevels = ["run"]
stop_timeout = "1s"
command = {json.dumps(command)}
{extra}
[groups.{group}.entries.health]
{health}
"""


def host_pid(c: Cluster, nspid: int | None) -> int:
    """The pid, as this test sees it, of a process the node sees as `nspid` (its own pid namespace)."""
    import psutil

    for p in psutil.Process(c.nodes["n1"].agent_pid).children(recursive=True):
        try:
            line = next(ln for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines() if ln.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if int(line.split()[-1]) == nspid:
            return p.pid
    raise AssertionError(f"no process {nspid} under n1")


def entries(c: Cluster, group: str) -> dict:
    return c.status()["groups"][group]["entries"]


def test_probes_restart_sick_services_after_failures_and_not_before(make_cluster, tmp_path):
    http_port, tcp_port = free_port(), free_port()
    http_pid, tcp_pid, flag = tmp_path / "http.pid", tmp_path / "tcp.pid", tmp_path / "flag"
    groups = (
        entry("web", "srv", [sys.executable, SERVER, "http", str(http_port), str(http_pid)],
              f'http = "http://127.0.0.1:{http_port}/"\ninterval = "{INTERVAL}s"\ntimeout = "{TIMEOUT * 1000:.0f}ms"\nfailures = {FAILURES}')
        + entry("db", "tcpsrv", [sys.executable, SERVER, "tcp", str(tcp_port), str(tcp_pid)],
                f'tcp = "127.0.0.1:{tcp_port}"\ninterval = "200ms"\ntimeout = "100ms"\nfailures = 2')
        + entry("cmd", "worker", ["/bin/sh", "-c", f"touch {flag}; echo $$ > {tmp_path}/cmd.pid; exec sleep 1000"],
                f'command = ["test", "-e", "{flag}"]\ninterval = "200ms"\ntimeout = "150ms"\nfailures = 2')
        # nothing listens on this port: only start_period keeps it from being restarted at once
        + entry("slow", "late", ["/bin/sh", "-c", f"echo $$ > {tmp_path}/slow.pid; exec sleep 1000"],
                f'tcp = "127.0.0.1:{free_port()}"\ninterval = "200ms"\ntimeout = "100ms"\nfailures = 1\nstart_period = "1500ms"')
    )
    metrics = f"127.0.0.1:{free_port()}"
    c = make_cluster(nodes=("n1",), groups=groups, metrics={"n1": metrics})
    c.start()
    slow_first = wait_until(lambda: read_pid(tmp_path / "slow.pid"), 10, what="slow to start")
    slow_started = time.monotonic()
    wait_until(lambda: entries(c, "web")["srv"].get("health") == "ok", 10, what="web healthy")
    wait_until(lambda: entries(c, "db")["tcpsrv"].get("health") == "ok", 10, what="db healthy")
    wait_until(lambda: entries(c, "cmd")["worker"].get("health") == "ok", 10, what="cmd healthy")

    # start_period: the first process of "slow" lives at least that long, then is restarted
    wait_until(lambda: read_pid(tmp_path / "slow.pid") != slow_first, 10, what="slow restarted after its start_period")
    assert time.monotonic() - slow_started >= 1.4

    # SIGSTOP: alive, serving nothing. Restarted after FAILURES probes, not before.
    old = read_pid(http_pid)
    victim = host_pid(c, old)
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    seen_failing = []
    def restarted():
        e = entries(c, "web")["srv"]
        if e.get("pid") == old and e.get("health") in ("failing", "unhealthy"):
            seen_failing.append(e.get("probe_failures"))
        return e.get("pid") not in (None, old) and e.get("health") != "" and read_pid(http_pid) == e.get("pid") and e
    e = wait_until(restarted, 10, what="web restarted", step=0.05)
    took = time.monotonic() - t0
    # the third failed probe begins at least two intervals after the first, and times out
    assert took >= (FAILURES - 1) * INTERVAL + TIMEOUT - 0.05, took
    assert took <= FAILURES * INTERVAL + TIMEOUT + 2.0, took
    assert seen_failing and min(seen_failing) < FAILURES, seen_failing  # failing, below the threshold, same pid
    assert e["restart_reason"].startswith(f"unhealthy: http probe http://127.0.0.1:{http_port}/ failed {FAILURES} times in a row")
    wait_until(lambda: not os.path.exists(f"/proc/{victim}") or "Z" in Path(f"/proc/{victim}/stat").read_text().split()[2], 5,
               what="the stopped server gone")
    wait_until(lambda: entries(c, "web")["srv"].get("health") == "ok", 5, what="the new server healthy")

    # a tcp server that stops listening (the process lives on)
    old = read_pid(tcp_pid)
    os.kill(host_pid(c, old), signal.SIGUSR1)
    wait_until(lambda: read_pid(tcp_pid) != old, 5, what="tcpsrv restarted")
    assert entries(c, "db")["tcpsrv"]["restart_reason"].startswith(f"unhealthy: tcp probe 127.0.0.1:{tcp_port} failed 2 times in a row")

    # a command probe that fails (exit 1)
    old = read_pid(tmp_path / "cmd.pid")
    flag.unlink()
    wait_until(lambda: read_pid(tmp_path / "cmd.pid") != old, 5, what="worker restarted")
    assert entries(c, "cmd")["worker"]["restart_reason"] == "unhealthy: command probe test -e " + f"{flag} failed 2 times in a row: exit 1"

    # what the node publishes: failures per group; no ban (max_failures unset: restart in place for ever)
    status = json.loads((c.store / "status" / "n1.json").read_text())
    assert status["groups"]["web"]["failures"] == 1 and "banned" not in status["groups"]["web"]

    # metrics: probes by result, their durations, restarts and failures by cause, no ban
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=3) as resp:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(resp.read().decode()) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))

    assert value("reconciler_probes_total", group="web", kind="http", result="fail") >= FAILURES
    assert value("reconciler_probes_total", group="web", kind="http", result="ok") >= 1
    assert value("reconciler_probe_duration_seconds_count", kind="tcp") >= 1
    assert value("reconciler_restarts_total", group="web", cause="unhealthy") == 1
    assert value("reconciler_restarts_total", group="slow", cause="unhealthy") >= 1
    assert value("reconciler_group_failures_total", group="cmd", cause="unhealthy") == 1
    assert value("reconciler_group_banned", group="web") == 0 and value("reconciler_bans_total") == 0


@pytest.mark.needs("root", "unshare", "ip")
def test_an_address_or_mount_removed_behind_the_agents_back_is_restored_without_waiting_for_the_tick(tmp_path):
    from test_resources_agent import Lab  # its namespaces: one with a veth pair ha0 <-> ha1

    os.chmod(tmp_path, 0o755)
    lab = Lab(tmp_path)
    try:
        ns = lab.single()
        groups = """
[groups.vip]
runlevel = "run"
[[groups.vip.entries]]
tag = "vip-addr"
runlevels = ["run"]
address = { ip = "192.0.2.77/24", interface = "ha0", announce = false }
[[groups.vip.entries]]
tag = "vip-data"
runlevels = ["run"]
mount = { source = "rtest", target = "%s", fstype = "tmpfs", options = "size=1m" }
""" % (tmp_path / "data")
        # a tick of 30 s: only a kernel event can bring them back within a second
        c = lab.cluster(nodes=("n1",), groups=groups, netns={"n1": ns}, cluster_extra='[cluster.timing]\ntick = "30s"')
        c.start()

        def present() -> bool:
            out = subprocess.run(["ip", "-n", ns, "-j", "addr", "show", "dev", "ha0"], capture_output=True, text=True).stdout
            return any(a.get("local") == "192.0.2.77" for link in json.loads(out or "[]") for a in link.get("addr_info", []))

        wait_until(present, 10, what="the address added")
        for _ in range(3):
            subprocess.run(["ip", "-n", ns, "addr", "del", "192.0.2.77/24", "dev", "ha0"], check=True)
            t0 = time.monotonic()
            wait_until(present, 2, what="the address restored", step=0.005)
            assert time.monotonic() - t0 < 1.0
        # a mount: /proc/self/mountinfo's POLLPRI (in the agent's own mount namespace)
        pid = c.nodes["n1"].agent_pid

        def mounted() -> bool:
            with open(f"/proc/{pid}/mountinfo") as fh:
                return any(line.split()[4] == str(tmp_path / "data") for line in fh)

        wait_until(mounted, 10, what="the mount")
        took = []
        for _ in range(3):
            subprocess.run(["nsenter", "-t", str(pid), "-m", "umount", str(tmp_path / "data")], check=True, timeout=10)
            t0 = time.monotonic()
            wait_until(mounted, 6, what="the mount restored", step=0.005)
            took.append(time.monotonic() - t0)
        # Now and then (a loaded machine) the restore, started within milliseconds of the
        # umount, finds nothing mounted right after its own mount(8) and backs off (act/mounts.py:
        # "mount did not take effect", 4 s): the median still shows the event at work.
        assert sorted(took)[1] < 1.0 and max(took) < 5.5, took
    finally:
        lab.close()
    assert c.violations() == []
