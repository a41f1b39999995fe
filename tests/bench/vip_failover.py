#!/usr/bin/env python3
"""Virtual IP failover, side by side with keepalived: kill the node holding the address,
time until the other node holds it.

    python3 tests/bench/vip_failover.py [--trials 20] [--profiles default,tight] [--quick]

Topology (built here, removed on exit, also on Ctrl-C): for each tool its own set of network
namespaces in the layout environment.md verified for keepalived (built by tests/netns.py's
Topology): a bridge `br0` in one
namespace, two node namespaces each with `eth0`, a veth into the bridge, with a fixed address
on 198.51.100.0/24. The machine's own namespace is never touched.

keepalived 2.2.7: one instance per node namespace (`ip netns exec NS keepalived -n -l -f CONF
-p PID -r VRRPPID -c CHKPID`, own pid files), both `state BACKUP` + `nopreempt` at keepalived's
default priority 100 (so every trial is the usual "backup takes over" case: master-down
interval = 3 x advert_int + skew, skew = (256 - 100) / 256 x advert_int), one
virtual_ipaddress. A trial SIGKILLs every keepalived process of the master's namespace
(`ip netns pids NS`).

reconciler: two agents from the multi-node harness (tests/cluster.py: `ip netns exec NS
unshare --pid --fork --mount-proc ... reconcile run`), sharing a directory store; one group
with an address entry (interface eth0) followed by a `sleep` process. A trial SIGKILLs the
owner's agent, PID 1 of its pid namespace: the agent, its keeper and its processes die at once.

The crash model, identical for both tools. Killing processes does not take an address off a
network namespace made with `ip netns add`: the namespace lives on, like a machine whose
daemons died while it stays powered and keeps answering ARP for the address. (reconciler's
keeper removes owned addresses when the lease ends, but it dies with the node here; keepalived
leaves its VIPs in place on SIGKILL.) A crashed *machine* takes its addresses off the network
with it, so at the kill moment the benchmark also sets the dead node's eth0 link down, for
both tools. Before the dead node comes back (the next trial's standby) the stale address is
deleted (a rebooted machine starts without it), the link is set up again and the tool is
restarted; the next trial starts once it is stable.

Measurement: a thread polls both namespaces every 10 ms through netlink (pyroute2), for the
whole run. A namespace *holds* the address when it is on an interface that is up. Latency =
the kill -> the first poll that sees the other namespace hold it. Every sample where both
namespaces hold it is counted (during trials and restarts alike), and so is every sample
between failovers in which neither holds it (an outage nobody asked for: a spurious
self-demotion, a VRRP flap).

Profiles:
  default  keepalived: VRRPv2, advert_int 1 (its default; VRRPv2's advertisement interval
           field counts whole seconds, RFC 3768). reconciler: the default [cluster.timing] (heartbeat 100ms, lease 400ms,
           dead_after 650ms).
  tight    keepalived: VRRPv3 (`vrrp_version 3`), whose advert interval is in centiseconds
           (keepalived accepts 0.01-255 s); --ka-tight-advert, default 0.1 s (master-down
           ~0.36 s, the same order as reconciler's tight dead_after). reconciler: heartbeat
           50ms, lease 200ms, demote_margin 50ms, kill_slack 50ms (the keeper's poll is 10 ms)
           and the smallest dead_after, in whole 10 ms, that `reconcile check` accepts
           (> Timing.minimum_dead_after(), 306 ms: 310 ms).
Trials alternate between the tools within a profile, so both see the same machine load.
Prints p50/p99 (nearest rank) for both, the ratio reconciler p50 / keepalived p50, and the
both-hold counts. Goal (default profile): ratio <= 0.5 and zero both-hold samples.
Needs root, ip(8), unshare(1), keepalived and pyroute2.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

from cluster import Cluster, wait_until  # noqa: E402
from netns import Topology  # noqa: E402

from reconciler.spec import Timing  # noqa: E402

VIP = "198.51.100.200"
VIP_CIDR = f"{VIP}/24"
DEV = "eth0"
POLL = 0.01
GROUP = "vip"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def tight_timing() -> dict[str, float]:
    t = Timing(heartbeat=0.05, lease=0.2, demote_margin=0.05, kill_slack=0.05)
    dead_after = math.floor(t.minimum_dead_after() * 100 + 1) / 100  # whole 10 ms, strictly above
    return {"heartbeat": 0.05, "lease": 0.2, "demote_margin": 0.05, "kill_slack": 0.05, "dead_after": dead_after}


# --- observation ---------------------------------------------------------------------------


class Poller(threading.Thread):
    """Every POLL seconds: which namespaces hold VIP on an up link, per topology.

    One thread and one netlink socket per namespace for the whole run, all made before any
    other thread runs (pyroute2 forks a helper to open a socket in a namespace).
    """

    def __init__(self, groups: dict[str, list[str]]):
        super().__init__(daemon=True)
        self.groups = groups
        self.samples: dict[str, list[tuple[float, frozenset[str]]]] = {k: [] for k in groups}
        self.both: dict[str, list[float]] = {k: [] for k in groups}
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.quiet = threading.Lock()  # held by the benchmark while it changes links/addresses
        self._halt = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        from pyroute2 import IPRoute

        socks = {}
        try:
            socks = {ns: IPRoute(netns=ns, flags=0) for nss in self.groups.values() for ns in nss}
            self._ready.set()
            while not self._halt.is_set():
                t0 = time.monotonic()
                for key, nss in self.groups.items():
                    holders = set()
                    stamp = {}
                    with self.quiet:  # never half-way through the benchmark's own changes
                        for ns in nss:
                            s = socks[ns]
                            stamp[ns] = time.monotonic()
                            idx = [a["index"] for a in s.get_addr(family=socket.AF_INET) if a.get_attr("IFA_LOCAL") == VIP]
                            if idx and any(link["flags"] & 1 for link in s.get_links(*idx)):  # IFF_UP
                                holders.add(ns)
                    with self.cond:
                        # a sample's time: when the namespace that holds the address was asked
                        self.samples[key].append((min((stamp[n] for n in holders), default=stamp[nss[0]]), frozenset(holders)))
                        if len(holders) > 1:
                            self.both[key].append(stamp[nss[0]])
                        self.cond.notify_all()
                self._halt.wait(max(0.0, POLL - (time.monotonic() - t0)))
        except BaseException as exc:
            self.error = exc
            self._ready.set()
        finally:
            for s in socks.values():
                s.close()

    def begin(self) -> "Poller":
        self.start()
        self._ready.wait(20)
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)

    def holders(self, key: str) -> frozenset[str]:
        if self.error:
            raise RuntimeError(f"poller failed: {self.error!r}")
        with self.cond:
            return self.samples[key][-1][1] if self.samples[key] else frozenset()

    def empty_between(self, key: str, t_from: float, t_to: float) -> int:
        """Samples in (t_from, t_to) in which no namespace held the address."""
        with self.cond:
            return sum(1 for t, h in self.samples[key] if t_from < t < t_to and not h)

    def wait_for(self, key: str, ns: str, after: float, timeout: float) -> float | None:
        """The time of the first sample after `after` in which `ns` holds the address."""
        deadline = time.monotonic() + timeout
        with self.cond:
            samples = self.samples[key]
            i = len(samples)
            while i > 0 and samples[i - 1][0] >= after:
                i -= 1
            while True:
                while i < len(samples):
                    t, h = samples[i]
                    i += 1
                    if t >= after and ns in h:
                        return t
                if self.error or time.monotonic() > deadline:
                    return None
                self.cond.wait(0.05)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


class Links:
    """Link down/up and address removal in the node namespaces, over netlink (sub-ms)."""

    def __init__(self, namespaces: list[str]):
        from pyroute2 import IPRoute

        self.ipr = {ns: IPRoute(netns=ns, flags=0) for ns in namespaces}
        self.index = {ns: s.link_lookup(ifname=DEV)[0] for ns, s in self.ipr.items()}

    def down(self, ns: str) -> None:
        self.ipr[ns].link("set", index=self.index[ns], state="down")

    def up(self, ns: str) -> None:
        self.ipr[ns].link("set", index=self.index[ns], state="up")

    def forget(self, ns: str) -> None:
        """The rebooted machine starts without the virtual address."""
        try:
            self.ipr[ns].addr("del", index=self.index[ns], address=VIP, prefixlen=24)
        except Exception:
            pass

    def close(self) -> None:
        for s in self.ipr.values():
            s.close()


# --- the two tools ------------------------------------------------------------------------------

KEEPALIVED_CONF = """\
global_defs {{
    router_id {name}
    vrrp_version {version}
}}
vrrp_instance VB {{
    state BACKUP
    nopreempt
    interface {dev}
    virtual_router_id 77
    priority 100
    advert_int {advert}
    virtual_ipaddress {{
        {vip} dev {dev}
    }}
}}
"""


class Keepalived:
    name = "keepalived"

    def __init__(self, topo: Topology, nodes: list[str], work: Path):
        self.topo, self.nodes, self.work = topo, nodes, work
        self.ns = {n: topo.ns(n) for n in nodes}
        self.procs: dict[str, subprocess.Popen] = {}
        self.advert = 1.0
        self.version = 2

    def describe(self) -> str:
        return f"VRRPv{self.version}, advert_int {self.advert:g}s, priority 100 both, nopreempt"

    def configure(self, advert: float, version: int) -> None:
        self.advert, self.version = advert, version

    def _files(self, n: str) -> dict[str, Path]:
        d = self.work / "keepalived" / n
        d.mkdir(parents=True, exist_ok=True)
        return {k: d / k for k in ("conf", "pid", "vrrp.pid", "check.pid", "log")}

    def start_node(self, n: str) -> int:
        f = self._files(n)
        f["conf"].write_text(KEEPALIVED_CONF.format(name=n, version=self.version, advert=f"{self.advert:g}", vip=VIP_CIDR, dev=DEV))
        for k in ("pid", "vrrp.pid", "check.pid"):  # a killed instance's pids may have been reused since
            f[k].unlink(missing_ok=True)
        offset = f["log"].stat().st_size if f["log"].exists() else 0
        with open(f["log"], "ab") as log:
            self.procs[n] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[n], "keepalived", "-n", "-l", "-f", str(f["conf"]), "-p", str(f["pid"]),
                 "-r", str(f["vrrp.pid"]), "-c", str(f["check.pid"])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return offset

    def _state_after(self, n: str, offset: int, state: str) -> bool:
        try:
            with open(self._files(n)["log"], "rb") as fh:
                fh.seek(offset)
                return f"entering {state} state".lower().encode() in fh.read().lower()
        except OSError:
            return False

    def start(self, holders) -> None:
        offsets = {n: self.start_node(n) for n in self.nodes}
        for n in self.nodes:
            wait_until(lambda: self._state_after(n, offsets[n], "BACKUP"), 15, what=f"keepalived {n} to start")
        wait_until(lambda: len(holders()) == 1, 10 + 5 * self.advert, what="a keepalived master")

    def pids(self, n: str) -> list[int]:
        out = ip("netns", "pids", self.ns[n], check=False).stdout.split()
        found = []
        for p in out:
            try:
                with open(f"/proc/{p}/comm") as fh:
                    if fh.read().strip() == "keepalived":
                        found.append(int(p))
            except OSError:
                pass
        return found

    def victims(self, n: str) -> list[int]:
        """The pids a kill of node `n` SIGKILLs (looked up before the kill moment)."""
        return self.pids(n)

    def reap(self, n: str) -> None:
        p = self.procs.get(n)
        if p is not None:
            p.wait(10)
        wait_until(lambda: not self.pids(n), 10, what=f"keepalived {n} to exit")

    def restart(self, n: str) -> None:
        offset = self.start_node(n)
        try:
            wait_until(lambda: self._state_after(n, offset, "BACKUP"), 15, what=f"keepalived {n} back as BACKUP")
        except AssertionError:
            print(self._files(n)["log"].read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        # Stable: the restarted backup has heard the master for more than one master-down
        # interval (it would have taken over otherwise).
        time.sleep(max(1.0, 4 * self.advert))

    def stop(self) -> None:
        for n, p in self.procs.items():
            if p.poll() is None:
                for pid in self.pids(n):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        for n, p in self.procs.items():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                for pid in self.pids(n):
                    os.kill(pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()


GROUP_TOML = """
[groups.{g}]
runlevel = "run"

[[groups.{g}.entries]]
tag = "{g}-address"
runlevels = ["run"]
address = {{ ip = "{vip}", interface = "{dev}" }}

[[groups.{g}.entries]]
tag = "{g}-service"
runlevels = ["run"]
command = ["sleep", "86400"]
stop_timeout = "2s"
"""


class Reconciler:
    name = "reconciler"

    def __init__(self, topo: Topology, nodes: list[str], work: Path):
        self.topo, self.nodes, self.work = topo, nodes, work
        self.ns = {n: topo.ns(n) for n in nodes}
        self.timing: dict[str, float] = {}
        self.cluster: Cluster | None = None
        self.round = 0

    def describe(self) -> str:
        if not self.timing:
            return "default timing (heartbeat 100ms, lease 400ms, dead_after 650ms), dir store"
        return ", ".join(f"{k} {v * 1000:g}ms" for k, v in self.timing.items()) + ", dir store"

    def configure(self, timing: dict[str, float]) -> None:
        self.timing = timing

    def start(self, holders) -> None:
        self.round += 1
        root = self.work / f"reconciler-{self.round}"
        root.mkdir(mode=0o755)
        extra = ""
        if self.timing:
            extra = "[cluster.timing]\n" + "\n".join(f'{k} = "{v * 1000:g}ms"' for k, v in self.timing.items()) + "\n"
        self.cluster = Cluster(root, nodes=tuple(self.nodes), netns=self.ns, cluster_extra=extra,
                               groups=GROUP_TOML.format(g=GROUP, vip=VIP_CIDR, dev=DEV))
        chk = subprocess.run([sys.executable, "-m", "reconciler.cli", "check", "--spec", str(self.cluster.spec_dir)],
                             capture_output=True, text=True, timeout=30)
        if chk.returncode != 0:
            raise SystemExit(f"reconcile check refused the spec: {chk.stderr.strip()}")
        self.check_line = next((ln for ln in chk.stdout.splitlines() if ln.startswith("timing:")), "")
        self.cluster.start()
        wait_until(lambda: len(holders()) == 1, 20, what="the address on one node")

    def counter(self, n: str) -> int:
        try:
            return int(os.readlink(self.cluster.store / "nodes" / n).split(":")[0])
        except (OSError, ValueError):
            return -1

    def victims(self, n: str) -> list[int]:
        return [self.cluster.nodes[n].agent_pid]  # PID 1 of the node's pid namespace

    def reap(self, n: str) -> None:
        self.cluster.nodes[n].proc.wait(10)

    def restart(self, n: str) -> None:
        last = self.counter(n)
        self.cluster.nodes[n].start()
        wait_until(lambda: self.counter(n) > last, 20, step=0.02, what=f"agent {n} to heartbeat again")
        time.sleep(1.0)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


# --- the run ------------------------------------------------------------------------------------


class Bench:
    """One tool's trials within one profile, on its own topology (`key` in the poller)."""

    def __init__(self, tool, key: str, poller: Poller, links: Links, verbose: bool):
        self.tool, self.key, self.poller, self.links, self.verbose = tool, key, poller, links, verbose
        self.nodes = tool.nodes
        self.ns = tool.ns
        self.results: list[float] = []
        self.failed = 0
        self.both_in_trials = 0
        self.both_start = len(poller.both[key])
        self.outage = 0  # samples with no holder outside the failovers (a spurious demotion or flap)
        self.holding_since: float | None = None

    def holders(self) -> frozenset[str]:
        return self.poller.holders(self.key)

    def both_all(self) -> int:
        return len(self.poller.both[self.key]) - self.both_start

    def owner(self) -> str | None:
        h = self.holders()
        return next((n for n in self.nodes if h == {self.ns[n]}), None)

    def trial(self, i: int) -> None:
        owner = wait_until(self.owner, 15, what=f"{self.tool.name}: the address on exactly one node")
        other = next(n for n in self.nodes if n != owner)
        pids = self.tool.victims(owner)
        both_before = len(self.poller.both[self.key])
        t_kill = time.monotonic()
        if self.holding_since is not None:
            self.outage += self.poller.empty_between(self.key, self.holding_since, t_kill)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.links.down(self.ns[owner])  # the machine is gone from the network
        t_down = time.monotonic() - t_kill
        got = self.poller.wait_for(self.key, self.ns[other], t_kill, timeout=20)
        self.tool.reap(owner)
        if got is None:
            self.failed += 1
            print(f"  {self.tool.name} trial {i}: {other} never held the address within 20 s", flush=True)
        else:
            self.results.append(got - t_kill)
        self.holding_since = got
        time.sleep(0.1)
        self.both_in_trials += len(self.poller.both[self.key]) - both_before
        if self.verbose and got is not None:
            print(f"  {self.tool.name:<10} trial {i:3d}: {owner} -> {other} {(got - t_kill) * 1000:7.0f} ms "
                  f"(link down {t_down * 1000:.1f} ms after the kill)", flush=True)
        # The dead node reboots: without the stale address, link up, the tool restarted.
        with self.poller.quiet:
            self.links.forget(self.ns[owner])
            self.links.up(self.ns[owner])
        self.tool.restart(owner)
        if self.holders() != {self.ns[other]}:
            print(f"  {self.tool.name} trial {i}: after the restart the holders are {sorted(self.holders())}", flush=True)

    def finish(self) -> None:
        if self.holding_since is not None:
            self.outage += self.poller.empty_between(self.key, self.holding_since, time.monotonic())
            self.holding_since = None


def summarize(label: str, b: Bench) -> dict:
    r = b.results
    b.finish()
    row = {"label": label, "n": len(r), "failed": b.failed, "both_trials": b.both_in_trials, "both_all": b.both_all(),
           "outage": b.outage}
    if r:
        row.update(p50=pct(r, 0.5), p99=pct(r, 0.99), mean=statistics.fmean(r), min=min(r), max=max(r))
    return row


def fmt(row: dict) -> str:
    if not row["n"]:
        return f"  {row['label']:<11} no successful trial ({row['failed']} failed)"
    return (f"  {row['label']:<11} n={row['n']:<3} p50 {row['p50'] * 1000:6.0f} ms  p99 {row['p99'] * 1000:6.0f} ms  "
            f"mean {row['mean'] * 1000:6.0f}  min {row['min'] * 1000:6.0f}  max {row['max'] * 1000:6.0f}  "
            f"failed {row['failed']}  both-hold samples: {row['both_trials']} in trials, {row['both_all']} in the whole run; "
            f"no-holder samples between failovers: {row['outage']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials per tool and profile (default 20)")
    ap.add_argument("--profiles", default="default,tight", help="comma-separated: default, tight")
    ap.add_argument("--ka-tight-advert", type=float, default=0.1, help="keepalived VRRPv3 advert_int of the tight profile (s)")
    ap.add_argument("--quick", action="store_true", help="5 trials, default profile only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (keepalived and agent logs)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every trial")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.profiles = 5, "default"
    if os.geteuid() != 0:
        print("vip_failover.py: needs root", file=sys.stderr)
        return 2
    for tool in ("ip", "unshare", "keepalived"):
        if shutil.which(tool) is None:
            print(f"vip_failover.py: needs {tool}", file=sys.stderr)
            return 2

    main_pid = os.getpid()

    def on_term(*_):
        if os.getpid() != main_pid:  # a helper pyroute2 forked: never run our cleanup there
            os._exit(1)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="vip-bench-"))
    os.chmod(work, 0o755)
    tag = f"vb{os.getpid() % 100000}"
    topos: list[Topology] = []
    tools: list = []
    links: list[Links] = []
    poller: Poller | None = None
    rows: dict[str, dict[str, dict]] = {}
    extra_info: dict[str, str] = {}
    nodes = ["n1", "n2"]
    try:
        made = {}
        for key in ("k", "r"):
            topo = Topology(f"{tag}{key}")
            topos.append(topo)
            topo.add("n1", "198.51.100.11")
            topo.add("n2", "198.51.100.12")
            made[key] = topo
        ka = Keepalived(made["k"], nodes, work)
        rc = Reconciler(made["r"], nodes, work)
        tools = [ka, rc]
        # Every netlink socket is opened now, before any thread runs.
        links = [Links([t.ns[n] for n in nodes]) for t in tools]
        poller = Poller({t.name: [t.ns[n] for n in nodes] for t in tools}).begin()
        ka_version = subprocess.run(["keepalived", "--version"], capture_output=True, text=True)
        ka_version = (ka_version.stdout + ka_version.stderr).splitlines()[0]
        print(f"VIP failover: kill the holder, time until the other node holds {VIP_CIDR}; {args.trials} trials per tool "
              f"and profile, polled every {POLL * 1000:g} ms; {ka_version}; python {sys.version.split()[0]}")
        print(f"machine: {os.cpu_count()} CPUs; date {datetime.datetime.now().isoformat(timespec='seconds')}; load {load()}")
        for profile in [p.strip() for p in args.profiles.split(",") if p.strip()]:
            if profile == "default":
                ka.configure(1.0, 2)
                rc.configure({})
            elif profile == "tight":
                ka.configure(args.ka_tight_advert, 3)
                rc.configure(tight_timing())
            else:
                raise SystemExit(f"unknown profile {profile!r}")
            benches = [Bench(t, t.name, poller, lk, args.verbose) for t, lk in zip(tools, links)]
            for t, b in zip(tools, benches):
                t.start(b.holders)
            time.sleep(1.0)
            print(f"\nprofile {profile}: keepalived {ka.describe()}; reconciler {rc.describe()}", flush=True)
            print(f"  reconcile check: {rc.check_line}", flush=True)
            load_before = load()
            for i in range(1, args.trials + 1):
                for b in benches:
                    b.trial(i)
            load_after = load()
            rows[profile] = {b.tool.name: summarize(b.tool.name, b) for b in benches}
            extra_info[profile] = f"load average before {load_before}, after {load_after}"
            for t in tools:
                t.stop()
            print(f"  {extra_info[profile]}")
            for name in ("keepalived", "reconciler"):
                print(fmt(rows[profile][name]))
            k, r = rows[profile]["keepalived"], rows[profile]["reconciler"]
            if k["n"] and r["n"]:
                ratio = r["p50"] / k["p50"]
                print(f"  ratio reconciler p50 / keepalived p50: {ratio:.2f}", flush=True)
        print("\nsummary")
        ok = True
        for profile, pr in rows.items():
            k, r = pr["keepalived"], pr["reconciler"]
            if not (k["n"] and r["n"]):
                ok = False
                continue
            ratio = r["p50"] / k["p50"]
            line = (f"  {profile:<8} keepalived p50 {k['p50'] * 1000:.0f} ms p99 {k['p99'] * 1000:.0f} ms | reconciler p50 "
                    f"{r['p50'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms | ratio {ratio:.2f} | both-hold samples: "
                    f"keepalived {k['both_all']}, reconciler {r['both_all']}")
            if profile == "default":
                met = ratio <= 0.5 and r["both_all"] == 0 and r["failed"] == 0
                ok = ok and met
                line += f" | goal ratio <= 0.5, no both-hold: {'met' if met else 'MISSED'}"
            print(line)
        return 0 if ok else 1
    finally:
        if poller is not None:
            poller.stop()
        for lk in links:
            lk.close()
        for t in tools:
            try:
                t.stop()
            except Exception as exc:  # keep cleaning up
                print(f"stopping {t.name}: {exc}", file=sys.stderr)
        for topo in topos:
            topo.cleanup()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
