"""Mount and address entries driven by real agents, against real kernel objects.

Every agent runs under tests/cluster.py's `unshare --pid --fork --mount-proc` (a private
mount namespace: its mounts never reach the host's table) inside a network namespace made
here with `ip netns add` (`ip netns exec NS unshare ...`), so its addresses never reach the
host's either. Only 198.51.100.0/24 is used, and only inside those namespaces. The `lab`
fixture stops every agent, then deletes every namespace it made (which deletes the veths
and bridges in them); the mounts die with the agents' mount namespaces.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster import Cluster
from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
IP = shutil.which("ip") or "/usr/sbin/ip"
FAILOVER = 3.0  # the failover goal: address and guard up on the new node within this
VIP = "198.51.100.100"
VIP_CIDR = f"{VIP}/24"

pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "ip", "unshare", "nsenter", "mount")]
_ids = itertools.count()
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def ip(*argv: str, check: bool = True) -> str:
    r = subprocess.run([IP, *argv], capture_output=True, text=True, timeout=10)
    if check and r.returncode != 0:
        raise AssertionError(f"ip {' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def cli(*argv: str, prefix: tuple[str, ...] = (), timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "reconciler.cli", *argv], capture_output=True, text=True, timeout=timeout,
        env=ENV, cwd=ROOT,
    )


def addresses(ns: str, dev: str = "ha0") -> set[str]:
    """IPv4 addresses (with prefix) on `dev` in namespace `ns`; empty when dev is gone."""
    out = ip("-n", ns, "-j", "addr", "show", "dev", dev, check=False) or "[]"
    return {f"{a['local']}/{a['prefixlen']}" for link in json.loads(out) for a in link.get("addr_info", [])
            if a.get("family") == "inet"}


def mounted(pid: int, target: Path) -> list[str]:
    """Filesystem types mounted at `target` in the mount namespace of `pid`, bottom first."""
    found = []
    with open(f"/proc/{pid}/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(target):
                found.append(right.split()[0])
    return found


def sleepers(pid: int) -> list[int]:
    """The `sleep 600` processes (the test's service) under the agent `pid`."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if k.cmdline()[:2] == ["sleep", "600"]:
                out.append(k.pid)
        except psutil.Error:
            pass
    return out


def first_ok(path: Path, kind: str, after: int = 0) -> list[str]:
    text = path.read_bytes()[after:].decode(errors="replace")
    seen: list[str] = []
    for what in re.findall(rf"reconciler\.act: {kind} (\S+?): .* -> ok", text):
        if what not in seen:
            seen.append(what)
    return seen


class Lab:
    """Network namespaces and clusters of one test; `close` removes all of them."""

    def __init__(self, root: Path):
        self.root = root
        self.namespaces: list[str] = []
        self.clusters: list[Cluster] = []
        self.pollers: list[Poller] = []

    def netns(self, role: str) -> str:
        name = f"rra{role}{os.getpid()}-{next(_ids)}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def single(self) -> str:
        """One namespace with a veth pair ha0 <-> ha1, both up."""
        ns = self.netns("s")
        ip("-n", ns, "link", "add", "ha0", "type", "veth", "peer", "name", "ha1")
        ip("-n", ns, "link", "set", "ha0", "up")
        ip("-n", ns, "link", "set", "ha1", "up")
        return ns

    def lan(self, *nodes: str) -> dict[str, str]:
        """keepalived's layout: a bridge in its own namespace, a veth ha0 from each node's
        namespace into it, and a fixed address per node on 198.51.100.0/24."""
        br = self.netns("b")
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        ip("-n", br, "link", "set", "br0", "up")
        out = {}
        for i, node in enumerate(nodes, 1):
            ns = self.netns(node)
            ip("-n", ns, "link", "add", "ha0", "type", "veth", "peer", "name", f"p{i}", "netns", br)
            ip("-n", br, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", ns, "link", "set", "ha0", "up")
            ip("-n", ns, "addr", "add", f"198.51.100.{i}/24", "dev", "ha0")
            out[node] = ns
        return out

    def cluster(self, **kw) -> Cluster:
        c = Cluster(self.root, **kw)
        (self.root / "store").mkdir(exist_ok=True)
        self.clusters.append(c)
        return c

    def close(self) -> None:
        # Every step runs even if an earlier one fails: a leaked agent or namespace
        # outlives the test run.
        try:
            for p in self.pollers:
                p.stop()
        finally:
            try:
                for c in self.clusters:
                    try:
                        c.stop()
                    except Exception:
                        for n in c.nodes.values():
                            n.crash()
            finally:
                for ns in reversed(self.namespaces):
                    subprocess.run([IP, "netns", "del", ns], capture_output=True)


@pytest.fixture
def lab(tmp_path):
    os.chmod(tmp_path, 0o755)
    the_lab = Lab(tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.close()
    for c in the_lab.clusters:
        assert c.violations() == [], "\n".join(c.violations())


class Poller(threading.Thread):
    """Every 10 ms, which of `namespaces` hold `address` (one netlink socket per namespace)."""

    def __init__(self, namespaces: list[str], address: str):
        super().__init__(daemon=True)
        self.namespaces, self.address = namespaces, address
        self.samples: list[tuple[float, frozenset[str]]] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        from pyroute2 import IPRoute

        socks = {}
        try:
            socks = {ns: IPRoute(netns=ns, flags=0) for ns in self.namespaces}
            self._ready.set()
            while not self._halt.is_set():
                t = time.monotonic()
                holders = frozenset(
                    ns for ns, s in socks.items()
                    if any(a.get_attr("IFA_LOCAL") == self.address for a in s.get_addr(family=socket.AF_INET))
                )
                self.samples.append((t, holders))
                self._halt.wait(0.01)
        except BaseException as exc:  # reported by the test
            self.error = exc
            self._ready.set()
        finally:
            for s in socks.values():
                s.close()

    def begin(self) -> "Poller":
        self.start()
        self._ready.wait(10)
        assert self.error is None, self.error
        return self

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)

    def both(self) -> list[float]:
        return [t for t, h in self.samples if len(h) > 1]

    def first(self, ns: str, after: float = float("-inf")) -> float | None:
        return next((t for t, h in self.samples if t >= after and ns in h), None)

    def last(self, ns: str) -> float | None:
        return next((t for t, h in reversed(self.samples) if ns in h), None)


# --- one agent: mount -> address -> process ----------------------------------------------


def data_and_address(group: str, target: Path, cidr: str) -> str:
    """Two entries of `group`: GROUP-data, a 1 MiB tmpfs on `target`, and GROUP-vip, `cidr` on ha0."""
    return f"""
[[groups.{group}.entries]]
tag = "{group}-data"
runlevels = ["run"]
mount = {{ source = "rtest", target = "{target}", fstype = "tmpfs", options = "size=1m" }}

[[groups.{group}.entries]]
tag = "{group}-vip"
runlevels = ["run"]
address = {{ ip = "{cidr}", interface = "ha0" }}
"""


def web_group(target: Path, probe_ip: str = "198.51.100.10") -> str:
    # The process records whether the mount and the address were there when it started.
    script = (
        f'm=no; grep -q " {target} " /proc/self/mountinfo && m=yes; '
        f'a=no; {IP} -o addr show dev ha0 | grep -q " {probe_ip}/24 " && a=yes; '
        f'echo "mount=$m address=$a" > {target}/proof; exec sleep 600'
    )
    return '\n[groups.web]\nrunlevel = "run"\n' + data_and_address("web", target, f"{probe_ip}/24") + f"""
[[groups.web.entries]]
tag = "web-app"
runlevels = ["run"]
stop_timeout = "2s"
command = {json.dumps(script)}
"""


def test_group_starts_in_order_is_restored_and_stops_in_reverse(lab, tmp_path):
    ns = lab.single()
    target = tmp_path / "data"
    c = lab.cluster(nodes=("n1",), groups=web_group(target), netns={"n1": ns})
    spec = str(c.spec_dir)

    # Before the agent runs: the dry run (in the agent's network namespace) shows the claim
    # and then the mount, address and process starts, in file order, with reasons.
    r = cli("--dry-run", "--spec", spec, "--node", "n1", prefix=(IP, "netns", "exec", ns))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("claim web: unclaimed"), r.stdout
    starts = [ln for ln in lines if ln.startswith("start web/")]
    assert [ln.split(":")[0] for ln in starts] == ["start web/web-data", "start web/web-vip", "start web/web-app"], r.stdout
    assert "not present" in starts[0] and "not present" in starts[1], r.stdout

    node = c.nodes["n1"].start()
    pid = node.agent_pid
    proof = Path(f"/proc/{pid}/root{target}/proof")  # the tmpfs, seen from the agent's mount namespace
    wait_until(proof.exists, 10, what="the process to write into the mount")
    assert wait_until(lambda: proof.read_text().strip(), 2, what="proof") == "mount=yes address=yes"
    assert mounted(pid, target) == ["tmpfs"]
    assert not os.path.ismount(target), "the mount must stay inside the agent's mount namespace"
    assert addresses(ns) == {"198.51.100.10/24"}
    assert first_ok(node.log, "start") == ["web/web-data", "web/web-vip", "web/web-app"]
    st = wait_until(lambda: (d := c.status()["groups"]["web"]["entries"]) and d["web-app"]["state"] == "running" and d, 5,
                    what="status")
    assert {t: e["state"] for t, e in st.items()} == {"web-data": "running", "web-vip": "running", "web-app": "running"}

    # Converged: the same dry run from inside the agent's namespaces has nothing to do.
    r = cli("--dry-run", "--spec", spec, "--node", "n1", prefix=("nsenter", "-t", str(pid), "-m", "-n", "-p"))
    assert r.returncode == 0 and "n1: converged, nothing to do" in r.stdout, r.stdout + r.stderr

    # Removed behind the agent's back: put back (like respawn), the process left alone.
    subprocess.run(["nsenter", "-t", str(pid), "-m", "umount", str(target)], check=True, timeout=10)
    assert mounted(pid, target) == []
    wait_until(lambda: mounted(pid, target) == ["tmpfs"], 3, what="the mount to be restored")
    ip("-n", ns, "addr", "del", "198.51.100.10/24", "dev", "ha0")
    wait_until(lambda: addresses(ns) == {"198.51.100.10/24"}, 3, what="the address to be restored")
    assert len(sleepers(pid)) == 1
    assert len(re.findall(r"start web/web-app: .* -> ok", node.log.read_text())) == 1, "the process kept running"
    assert "web/web-app exited" not in node.log.read_text(), "the process kept running"  # (respawns: process.py logs them)

    # Runlevel stop: process, then address, then mount (the reverse of file order, even
    # though the mount and the address were restored after the process started).
    mark = node.log.stat().st_size
    r = cli("tell", "web", "stop", "--spec", spec)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not mounted(pid, target) and not addresses(ns), 5, what="mount and address to go")
    wait_until(lambda: not sleepers(pid), 5, what="the process to stop")
    wait_until(lambda: len(first_ok(node.log, "stop", after=mark)) == 3, 5, what="three stops logged")
    assert first_ok(node.log, "stop", after=mark) == ["web/web-app", "web/web-vip", "web/web-data"]


# --- bad input ------------------------------------------------------------------------------


def test_bad_entries_report_the_kernels_message_and_spare_other_groups(lab, tmp_path):
    ns = lab.single()
    app = 'command = "exec sleep 600"\nstop_timeout = "2s"'

    def group(name: str, resource: str) -> str:
        return f"""
[groups.{name}]
runlevel = "run"

[[groups.{name}.entries]]
tag = "{name}-res"
runlevels = ["run"]
{resource}

[[groups.{name}.entries]]
tag = "{name}-app"
runlevels = ["run"]
{app}
"""

    groups = (
        group("badfs", f'mount = {{ source = "rtest", target = "{tmp_path / "fs"}", fstype = "bogusfs" }}')
        + group("baddev", f'mount = {{ source = "/dev/rt-no-such-disk", target = "{tmp_path / "dev"}", fstype = "ext4" }}')
        + group("badif", 'address = { ip = "198.51.100.20/24", interface = "nosuch0" }')
        + web_group(tmp_path / "good", probe_ip="198.51.100.21")
    )
    c = lab.cluster(nodes=("n1",), groups=groups, netns={"n1": ns})
    node = c.nodes["n1"].start()

    def settled():
        g = c.status()["groups"]
        states = {t: e["state"] for name in ("badfs", "baddev", "badif", "web") for t, e in g[name]["entries"].items()}
        bad = all(states.get(f"{n}-res") == "error" for n in ("badfs", "baddev", "badif"))
        return g if bad and states.get("web-app") == "running" else None

    g = wait_until(settled, 10, step=0.2, what="three errors and the good group running")
    expected = {
        "badfs": f"mount: {tmp_path / 'fs'}: unknown filesystem type 'bogusfs'",
        "baddev": f"mount: {tmp_path / 'dev'}: special device /dev/rt-no-such-disk does not exist",
        "badif": "interface nosuch0 does not exist",
    }
    log = node.log.read_text()
    for name, message in expected.items():
        res, app_ = g[name]["entries"][f"{name}-res"], g[name]["entries"][f"{name}-app"]
        assert message in res["message"], (name, res)
        assert app_["state"] == "stopped", f"{name}: the entry after a failed one must not start: {app_}"
        assert f"start {name}/{name}-app:" not in log
        # The agent's log names the entry (group/tag) next to the kernel's message.
        assert re.search(rf"start {name}/{name}-res: .* -> error \(.*{re.escape(message)}", log), (name, log)
    # The other group in the same spec is unaffected.
    assert {t: e["state"] for t, e in g["web"]["entries"].items()} == {
        "web-data": "running", "web-vip": "running", "web-app": "running"}
    assert mounted(node.agent_pid, tmp_path / "good") == ["tmpfs"]
    assert addresses(ns) == {"198.51.100.21/24"}


def test_bad_cidr_is_refused_by_check(tmp_path):
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "cluster.toml").write_text(f'[cluster]\nstore = "dir:{tmp_path / "store"}"\nstate_dir = "{tmp_path / "state"}"\n')
    groups = spec / "groups.toml"
    groups.write_text(
        '[groups.db]\nrunlevel = "run"\n\n'
        '[[groups.db.entries]]\ntag = "db-data"\nrunlevels = ["run"]\n'
        f'mount = {{ source = "rtest", target = "{tmp_path / "db"}", fstype = "tmpfs" }}\n\n'
        '[[groups.db.entries]]\ntag = "db-vip"\nrunlevels = ["run"]\n'
        'address = { ip = "198.51.100.300/24", interface = "ha0" }\n'
    )
    r = cli("check", "--spec", str(spec))
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip()
    assert "\n" not in err, err
    assert err.startswith(f"reconcile: {groups}: groups.db.entries[1].address.ip: "), err
    assert "198.51.100.300/24" in err, err


# --- two agents: failover of mount + address + guard -----------------------------------------


def vip_cluster(lab: Lab, tmp_path: Path) -> tuple[Cluster, dict[str, str], Path]:
    nets = lab.lan("n1", "n2")
    target = tmp_path / "shared"
    entries = data_and_address("vipg", target, VIP_CIDR)
    c = lab.cluster(nodes=("n1", "n2"), groups=Cluster.guard_group("vipg", str(tmp_path / "guard.log"), entries=entries),
                    netns=nets)
    c.start()
    owner = wait_until(lambda: c.runs_on_one("vipg"), 10, what="the guard on one node")
    wait_until(lambda: VIP_CIDR in addresses(nets[owner]), 3, what="the address on the owner")
    assert mounted(c.nodes[owner].agent_pid, target) == ["tmpfs"]
    other = next(n for n in nets if n != owner)
    assert VIP_CIDR not in addresses(nets[other])
    assert mounted(c.nodes[other].agent_pid, target) == []
    return c, nets, target


def polled_vip(lab: Lab, nets: dict[str, str]) -> Poller:
    """A Poller of both nodes' namespaces for VIP, sampling already (stopped with the lab)."""
    poller = Poller([nets["n1"], nets["n2"]], VIP)
    lab.pollers.append(poller)
    poller.begin()
    wait_until(lambda: len(poller.samples) >= 5, 5, what="the poller's first samples")
    return poller


def test_crashed_owner_address_and_guard_move_never_on_both(lab, tmp_path):
    c, nets, target = vip_cluster(lab, tmp_path)
    owner = c.runs_on_one("vipg")
    other = next(n for n in nets if n != owner)
    poller = polled_vip(lab, nets)

    t0 = time.monotonic()
    c.nodes[owner].crash()
    # A crashed machine takes its addresses off the network with it. Killing the agent's
    # namespaces does not (the namespace made with `ip netns add` outlives them, address
    # and all: a dead node that still holds the VIP is what fencing is for), so model the
    # machine's death by unplugging its link: deleting the veth deletes its addresses.
    ip("-n", nets[owner], "link", "del", "ha0")
    wait_until(lambda: VIP_CIDR in addresses(nets[other]) and c.runs_on_one("vipg") == other, FAILOVER,
               step=0.01, what="address and guard on the other node")
    took = time.monotonic() - t0
    time.sleep(0.2)  # the old owner adds nothing back: the time passing is the test
    poller.stop()
    assert poller.error is None, poller.error
    assert took < FAILOVER
    assert poller.both() == [], "the address was in both namespaces"
    assert poller.last(nets[owner]) is not None and poller.first(nets[other]) is not None
    assert poller.last(nets[owner]) < poller.first(nets[other])
    assert mounted(c.nodes[other].agent_pid, target) == ["tmpfs"]
    assert c.violations() == []


def test_paused_owner_keeper_removes_the_address_before_the_peer_adds_it(lab, tmp_path):
    c, nets, target = vip_cluster(lab, tmp_path)
    owner = c.runs_on_one("vipg")
    other = next(n for n in nets if n != owner)
    node = c.nodes[owner]
    listed = tmp_path / "state" / owner / "resources.json"
    items = {(r["kind"], r.get("ip") or r.get("target")) for r in json.loads(listed.read_text())["resources"]}
    assert items == {("mount", str(target)), ("address", VIP_CIDR)}
    poller = polled_vip(lab, nets)

    t0 = time.monotonic()
    node.pause()  # the agent stops, its keeper does not: at the lease deadline it cleans up
    wait_until(lambda: VIP_CIDR in addresses(nets[other]) and c.runs_on_one("vipg") == other, FAILOVER,
               step=0.01, what="address and guard on the other node")
    took = time.monotonic() - t0
    gone_here = poller.last(nets[owner])
    there = poller.first(nets[other])
    assert took < FAILOVER
    assert poller.both() == [], "the address was in both namespaces"
    assert gone_here is not None and there is not None and gone_here < there, (gone_here, there)
    assert mounted(node.agent_pid, target) == [], "the keeper unmounts (lazily) what the agent mounted"
    keeper_log = (tmp_path / "state" / owner / "keeper.log").read_text()
    assert f"addr del {VIP_CIDR} dev ha0" in keeper_log and f"umount -l {target}" in keeper_log, keeper_log

    # The paused agent wakes up: it must notice it lost the group and add nothing back.
    node.resume()
    time.sleep(1.5)  # the time passing is the test
    poller.stop()
    assert poller.error is None, poller.error
    assert poller.both() == []
    assert VIP_CIDR not in addresses(nets[owner]) and VIP_CIDR in addresses(nets[other])
    assert c.runs_on_one("vipg") == other
    assert mounted(node.agent_pid, target) == []
    wait_until(lambda: json.loads(listed.read_text())["resources"] == [], 3, what="the old owner to list nothing")
    assert c.violations() == []
