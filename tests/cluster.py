"""Several nodes on one machine: each agent in its own `unshare --pid --fork --mount-proc`.

The agent is PID 1 of its namespace, so SIGKILL of it kills everything it started at once:
a faithful node crash. SIGSTOP of it pauses the agent but not its children (nor its keeper).
`unshare --mount-proc` also gives each node a private mount namespace. With
`netns={"n1": "NS"}` a node runs inside a network namespace made with `ip netns add`
(`ip netns exec NS unshare ...`): its addresses, and its keeper's, live there.

`store="etcd://..."` runs the cluster on that store instead of a fresh store directory;
`owner()`, `claims()` and `members()` then read it through `reconciler.store.open_store` with the spec's
options (from inside `store_netns` when the store is only reachable there). `metrics={"n1":
"127.0.0.1:PORT"}` gives a node a /metrics endpoint (default: off).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

import safety

HERE = Path(__file__).resolve().parent
GUARD = str(HERE / "guard.py")


def _read_store(spec_dir: str) -> dict:
    """{"claims": {group: [owner, generation]}, "members": {node: counter}} via open_store."""
    import asyncio

    from reconciler import spec as specmod
    from reconciler.store import open_store

    spec = specmod.load(spec_dir)
    c = spec.cluster

    async def read():
        if spec.store_url.startswith("dir:"):
            store = open_store(spec.store_url)
        else:
            store = open_store(spec.store_url, prefix=c.etcd_prefix, ca=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key,
                               user=c.etcd_user, password=c.etcd_password, timeout=3.0)
        try:
            snap = await store.read()
        finally:
            await store.close()
        return {"claims": {g: [cl.node, cl.generation] for g, cl in snap.claims.items()},
                "members": {n: hb.counter for n, hb in snap.members.items()}}

    return asyncio.run(read())


def wait_until(cond, timeout: float, step: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class Node:
    def __init__(self, cluster: "Cluster", name: str, *, machine: str = ""):
        self.cluster = cluster
        self.name = name
        self.proc: subprocess.Popen | None = None
        # machine: a second agent under an existing name, as if on another machine (Cluster.add_twin)
        self.machine = machine
        self.spec_dir = cluster.spec_dir if not machine else cluster.root / f"spec@{machine}"
        self.log = cluster.root / (f"agent-{name}.log" if not machine else f"agent-{name}@{machine}.log")
        self.netns: str | None = cluster.netns.get(name)

    def start(self) -> "Node":
        c = self.cluster
        metrics = c.metrics.get(self.name, "off")
        inner = [sys.executable, "-m", "reconciler.cli", "run", "--spec", str(self.spec_dir), "--node", self.name, "--metrics-address", metrics]
        if os.environ.get("RECONCILER_TEST_VERBOSE"):
            inner.append("-v")
        if c.pre_exec.get(self.name):
            inner = ["/bin/sh", "-c", c.pre_exec[self.name] + ' && exec "$@"', "sh", *inner]
        env = {**os.environ, **c.env, **({"RECONCILER_TEST_MACHINE": self.machine} if self.machine else {})}
        outer = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*outer, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *inner],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        self.agent_pid = wait_until(self._find_agent, 10, what=f"agent {self.name} to start")
        return self

    def _find_agent(self) -> int | None:
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return kids[0].pid if kids else None

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """`reconcile ARGS` inside this node's pid and mount namespaces, as an operator on it would."""
        return subprocess.run(
            ["nsenter", "-t", str(self.agent_pid), "-p", "-m", "--", sys.executable, "-m", "reconciler.cli", *args],
            capture_output=True, text=True, timeout=timeout,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crash(self) -> None:
        """kill -9 the namespace's first process: the node and everything on it die at once."""
        if self.running:
            os.kill(self.agent_pid, signal.SIGCONT)
            os.kill(self.agent_pid, signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.agent_pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.agent_pid, signal.SIGCONT)

    def terminate(self, timeout: float = 15) -> int | None:
        if not self.running:
            return self.proc.returncode if self.proc else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Repeated: a signal that reaches PID 1 before Python runs at all is lost.
            try:
                os.kill(self.agent_pid, signal.SIGCONT)
                os.kill(self.agent_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(min(1.0, max(0.01, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                continue
        self.crash()
        return None


class Cluster:
    def __init__(
        self, root: Path, *, nodes=("n1", "n2", "n3"), groups: str = "", cluster_extra: str = "", env=None, netns=None,
        store: str | None = None, store_netns: str | None = None, metrics=None,
    ):
        self.root = root
        self.spec_dir = root / "spec"
        self.spec_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(root, 0o755)
        self.store = root / "store"
        self.guard_log = str(root / "guard.log")
        self.env = env or {}
        self.pre_exec: dict[str, str] = {}
        self.netns: dict[str, str] = dict(netns or {})  # node -> network namespace (ip netns add)
        self.store_url = store or f"dir:{self.store}"
        self.store_netns = store_netns  # read the store from inside this namespace
        self.metrics: dict[str, str] = dict(metrics or {})  # node -> HOST:PORT for --metrics-address
        self.write("cluster.toml", f"""
            [cluster]
            name = "test"
            store = "{self.store_url}"
            state_dir = "{root / 'state'}"
            {textwrap.dedent(cluster_extra)}
        """)
        if groups:
            self.write("groups.toml", groups)
        self.nodes = {n: Node(self, n) for n in nodes}

    def write(self, name: str, text: str) -> None:
        path = self.spec_dir / name
        tmp = self.spec_dir / f".{name}.tmp"
        tmp.write_text(textwrap.dedent(text))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @staticmethod
    def guard_group(name: str, log: str, *, extra: str = "", entries: str = "") -> str:
        return f"""
[groups.{name}]
runlevel = "run"
{extra}
{entries}
[[groups.{name}.entries]]
tag = "{name}-svc"
mode = "respawn"
runlevels = ["run"]
command = ["{sys.executable}", "{GUARD}", "{log}"]
stop_timeout = "2s"
"""

    def start(self, *names: str) -> None:
        for n in names or self.nodes:
            self.nodes[n].start()

    def add_twin(self, name: str, machine: str = "b") -> Node:
        """A second agent under the existing node name `name`, as on another machine: a copy
        of the spec with a state directory of its own, and its guards report `name@machine`
        (so the safety checker tells the two apart). Stopped with the cluster; not started."""
        spec = self.root / f"spec@{machine}"
        spec.mkdir(mode=0o755)
        for f in self.spec_dir.glob("*.toml"):
            text = f.read_text().replace(f'state_dir = "{self.root / "state"}"', f'state_dir = "{self.root / f"state@{machine}"}"')
            (spec / f.name).write_text(text)
            os.chmod(spec / f.name, 0o644)
        node = self.nodes[f"{name}@{machine}"] = Node(self, name, machine=machine)
        return node

    def stop(self) -> None:
        for n in self.nodes.values():
            try:
                n.terminate(timeout=10)
            except Exception:
                n.crash()

    # --- observation ----------------------------------------------------------------------

    def owner(self, group: str) -> str | None:
        if self.store_url.startswith("dir:"):
            try:
                return os.readlink(self.store / "claims" / group).rpartition(":")[0]
            except OSError:
                return None
        claim = self.claims().get(group)
        return claim[0] if claim else None

    def claims(self) -> dict[str, tuple[str, int]]:
        """{group: (owner, generation)}, read through the store backend the spec names."""
        return {g: tuple(v) for g, v in self.read_store()["claims"].items()}

    def members(self) -> dict[str, int]:
        """{node: heartbeat counter} of the nodes the store lists."""
        return self.read_store()["members"]

    def read_store(self) -> dict:
        if self.store_netns:
            code = "import sys, json; sys.path.insert(0, sys.argv[1]); import cluster; print(json.dumps(cluster._read_store(sys.argv[2])))"
            out = subprocess.run(
                ["ip", "netns", "exec", self.store_netns, sys.executable, "-c", code, str(HERE), str(self.spec_dir)],
                capture_output=True, text=True, timeout=20,
            )
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)
        return _read_store(str(self.spec_dir))

    def running(self, group: str) -> set[str]:
        if not os.path.exists(self.guard_log):
            return set()
        return safety.running_now(self.guard_log, time.monotonic()).get(group, set())

    def runs_on_one(self, group: str) -> str | None:
        nodes = self.running(group)
        return next(iter(nodes)) if len(nodes) == 1 else None

    def violations(self) -> list[str]:
        return safety.violations(self.guard_log) if os.path.exists(self.guard_log) else []

    def status(self) -> dict:
        import json

        out = subprocess.run(
            [sys.executable, "-m", "reconciler.cli", "status", "--json", "--spec", str(self.spec_dir), "--node", next(iter(self.nodes))],
            capture_output=True, text=True, timeout=20,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
