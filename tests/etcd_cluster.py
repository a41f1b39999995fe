"""Real etcd members for tests: a single member or a 3-member cluster on free 127.0.0.1 ports.

    with EtcdCluster(3, tmp_dir) as cluster:
        cluster.url               # "etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3"
        cluster.kill(i); cluster.restart(i)
        cluster.leader()          # index of the current leader

Members run with ETCD_ELECTION_TIMEOUT=250 ETCD_HEARTBEAT_INTERVAL=50 (re-election in about
0.35 s, minimum lease TTL 1 s). `stop()` waits for every process to exit before it deletes the
data directories.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from helpers import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdCluster:
    def __init__(self, size: int = 1, base_dir: str | os.PathLike | None = None):
        self.size = size
        self._own_dir = base_dir is None
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="etcd-test-"))
        self.names = [f"m{i + 1}" for i in range(size)]
        ports = set()
        while len(ports) < 2 * size:
            ports.add(free_port())
        ports = sorted(ports)
        self.client_ports = ports[:size]
        self.peer_ports = ports[size:]
        self.procs: list[subprocess.Popen | None] = [None] * size
        self._initial = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports)
        )

    # --- addresses ------------------------------------------------------------------------

    def endpoint(self, i: int) -> str:
        return f"127.0.0.1:{self.client_ports[i]}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in range(self.size)]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    # --- processes ------------------------------------------------------------------------

    def _spawn(self, i: int) -> None:
        name, cport, pport = self.names[i], self.client_ports[i], self.peer_ports[i]
        env = dict(os.environ, ETCD_ELECTION_TIMEOUT="250", ETCD_HEARTBEAT_INTERVAL="50")
        log = open(self.dir / f"{name}.log", "ab")
        self.procs[i] = subprocess.Popen(
            [
                ETCD, "--name", name, "--data-dir", str(self.dir / name),
                "--listen-client-urls", f"http://127.0.0.1:{cport}",
                "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                "--initial-cluster", self._initial,
                "--initial-cluster-token", f"t{self.peer_ports[0]}",
                "--logger=zap", "--log-level=error",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()

    def start(self, timeout: float = 15.0) -> "EtcdCluster":
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self._spawn(i)
        try:
            self.wait_healthy(range(self.size), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint(i)}/health", timeout=0.5) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            pending = [i for i in pending if not self.healthy(i)]
            for i in pending:
                p = self.procs[i]
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"etcd {self.names[i]} exited: {self.log(i)[-2000:]}")
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"etcd members {pending} not healthy after {timeout}s")
            if pending:
                time.sleep(0.05)

    def log(self, i: int) -> str:
        try:
            return (self.dir / f"{self.names[i]}.log").read_text(errors="replace")
        except OSError:
            return ""

    def status(self, i: int) -> dict:
        """The member's maintenance status through the v3 JSON gateway (ids as strings)."""
        req = urllib.request.Request(f"http://{self.endpoint(i)}/v3/maintenance/status", data=b"{}")
        with urllib.request.urlopen(req, timeout=1) as r:
            return json.load(r)

    def leader(self, timeout: float = 5.0) -> int:
        """Index of the member that is the leader (waits for an election to finish)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self.size):
                if self.procs[i] is None or self.procs[i].poll() is not None:
                    continue
                try:
                    st = self.status(i)
                except (OSError, ValueError):
                    continue
                if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                    return i
            if time.monotonic() > deadline:
                raise RuntimeError("no etcd leader")
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL one member and wait for it to exit."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        self.procs[i] = None

    def restart(self, i: int, timeout: float = 15.0) -> None:
        self.kill(i)
        self._spawn(i)
        self.wait_healthy([i], timeout)

    def stop(self) -> None:
        # SIGKILL: the data is thrown away, and a SIGTERMed member of a shrinking cluster
        # spends seconds trying to hand over leadership.
        for i in range(self.size):
            self.kill(i)
        for name in self.names:
            shutil.rmtree(self.dir / name, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
