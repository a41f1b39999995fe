"""Network namespaces for partition tests: one namespace per node, all joined into a bridge.

    topo = Topology("rcx1234")                    # a unique prefix: other tests may run too
    ns = topo.add("m1", "198.51.100.11")         # namespace rcx1234-m1, eth0 = 198.51.100.11/24
    topo.cut("m1"); topo.restore("m1")           # link down / up on the bridge side
    topo.cleanup()                               # deletes every namespace it made

The layout of environment.md (the keepalived one): the bridge `br0` lives in its own
namespace (`PREFIX-br`); every node namespace has `eth0`, one end of a veth pair whose other
end (`p-NAME`) is a port of the bridge. Addresses come from 198.51.100.0/24 (TEST-NET-2) and
exist only inside these namespaces; the machine's own namespace is never touched.

`call_in(ns, fn)` runs `fn` in a thread that has joined the namespace (setns(2) changes the
calling thread only): good for plain sockets such as urllib; not for gRPC, whose sockets are
made by its own threads (run a subprocess under `ip netns exec` for those).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Topology:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.bridge = f"{prefix}-br"
        self.spaces: dict[str, str] = {}  # node -> namespace
        self.addresses: dict[str, str] = {}
        ip("netns", "add", self.bridge)
        self._made = [self.bridge]
        ip("-n", self.bridge, "link", "set", "lo", "up")
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")

    def ns(self, name: str) -> str:
        return self.spaces[name]

    def add(self, name: str, address: str) -> str:
        ns = f"{self.prefix}-{name}"
        ip("netns", "add", ns)
        self._made.append(ns)
        peer = f"p-{name}"
        ip("-n", self.bridge, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.bridge, "link", "set", peer, "master", "br0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.spaces[name], self.addresses[name] = ns, address
        return ns

    def attach(self, name: str, ns: str, address: str, *, dev: str = "eth1") -> None:
        """Join namespace `ns` (another Topology's node) to this bridge as `dev` with `address`:
        a second link, cut and restored apart from the first (the failsafe's store link)."""
        peer = f"p-{name}"
        ip("-n", self.bridge, "link", "add", peer, "type", "veth", "peer", "name", dev, "netns", ns)
        ip("-n", self.bridge, "link", "set", peer, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")
        self.spaces[name], self.addresses[name] = ns, address

    def cut(self, name: str) -> None:
        """Take the node's bridge port down: it can reach nobody and nobody reaches it."""
        ip("-n", self.bridge, "link", "set", f"p-{name}", "down")

    def restore(self, name: str) -> None:
        ip("-n", self.bridge, "link", "set", f"p-{name}", "up")

    def cleanup(self) -> None:
        for ns in reversed(self._made):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()


def call_in(ns: str, fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in a thread inside network namespace `ns`; return its result."""
    out: dict = {}

    def body():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller
            out["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _etcd_cluster_class():
    from etcd_cluster import ETCD, EtcdCluster

    class NetnsEtcdCluster(EtcdCluster):
        """EtcdCluster whose member i runs in namespace `spaces[i]` on `hosts[i]`:2379/2380."""

        def __init__(self, spaces: list[str], hosts: list[str], base_dir):
            super().__init__(len(spaces), base_dir)
            self.spaces, self.hosts = list(spaces), list(hosts)
            self.client_ports = [2379] * self.size
            self.peer_ports = [2380] * self.size
            self._initial = ",".join(f"{n}=http://{h}:2380" for n, h in zip(self.names, self.hosts))

        def endpoint(self, i: int) -> str:
            return f"{self.hosts[i]}:2379"

        def _spawn(self, i: int) -> None:
            name, host = self.names[i], self.hosts[i]
            env = dict(os.environ, ETCD_ELECTION_TIMEOUT="250", ETCD_HEARTBEAT_INTERVAL="50")
            with open(self.dir / f"{name}.log", "ab") as log:
                self.procs[i] = subprocess.Popen(
                    [
                        "ip", "netns", "exec", self.spaces[i],  # ip execs etcd: the pid is etcd's
                        ETCD, "--name", name, "--data-dir", str(self.dir / name),
                        "--listen-client-urls", f"http://{host}:2379",
                        "--advertise-client-urls", f"http://{host}:2379",
                        "--listen-peer-urls", f"http://{host}:2380",
                        "--initial-advertise-peer-urls", f"http://{host}:2380",
                        "--initial-cluster", self._initial,
                        "--initial-cluster-token", f"t-{self.spaces[0]}",
                        "--logger=zap", "--log-level=error",
                    ],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                )

        def healthy(self, i: int) -> bool:
            return call_in(self.spaces[i], super().healthy, i)

        def status(self, i: int) -> dict:
            return call_in(self.spaces[i], super().status, i)

    return NetnsEtcdCluster


def NetnsEtcdCluster(spaces: list[str], hosts: list[str], base_dir):
    return _etcd_cluster_class()(spaces, hosts, base_dir)
