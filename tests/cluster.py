"""Several nodes on one machine: each agent in its own `unshare --pid --fork --mount-proc`.

The agent is PID 1 of its namespace, so SIGKILL of it kills everything it started at once:
a faithful node crash. SIGSTOP of it pauses the agent but not its children (nor its keeper).
"""

from __future__ import annotations

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
    def __init__(self, cluster: "Cluster", name: str):
        self.cluster = cluster
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.log = cluster.root / f"agent-{name}.log"

    def start(self) -> "Node":
        c = self.cluster
        inner = [sys.executable, "-m", "reconciler.cli", "run", "--spec", str(c.spec_dir), "--node", self.name, "--metrics-address", "off"]
        if c.pre_exec.get(self.name):
            inner = ["/bin/sh", "-c", c.pre_exec[self.name] + ' && exec "$@"', "sh", *inner]
        env = {**os.environ, **c.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *inner],
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
        os.kill(self.agent_pid, signal.SIGCONT)
        os.kill(self.agent_pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.crash()
            return None


class Cluster:
    def __init__(self, root: Path, *, nodes=("n1", "n2", "n3"), groups: str = "", cluster_extra: str = "", env=None):
        self.root = root
        self.spec_dir = root / "spec"
        self.spec_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(root, 0o755)
        self.store = root / "store"
        self.guard_log = str(root / "guard.log")
        self.env = env or {}
        self.pre_exec: dict[str, str] = {}
        self.write("cluster.toml", f"""
            [cluster]
            name = "test"
            store = "dir:{self.store}"
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

    def stop(self) -> None:
        for n in self.nodes.values():
            try:
                n.terminate(timeout=10)
            except Exception:
                n.crash()

    # --- observation ----------------------------------------------------------------------

    def owner(self, group: str) -> str | None:
        try:
            return os.readlink(self.store / "claims" / group).rpartition(":")[0]
        except OSError:
            return None

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
