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

`Cluster.fault_mode()` starts the nodes for local-state faults (tests/test_faults.py): the
agent is then the child of tests/nodeinit.py, PID 1 of the namespace, and can die alone; the
node's state directory is a small tmpfs of its own. The fault methods (kill_agent,
truncate_table, delete_lease, fill_state, twin, stray_store_file, ...) make this module longer
than 400 lines: they drive Node and Cluster and belong with them.
"""

from __future__ import annotations

import errno
import itertools
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
from helpers import wait_until  # noqa: F401 (also imported from here)

HERE = Path(__file__).resolve().parent
GUARD = str(HERE / "guard.py")
_CLUSTERS = itertools.count(1)


def cgroup_base() -> str | None:
    """A fresh cgroup for one cluster's nodes, MOUNT/rtest-PID-N (None without cgroup2): each
    node runs in MOUNT/rtest-PID-N/NODE, so parallel test runs, clusters and nodes never
    share an agent's subtree (reconciler-NODE under the agent's own cgroup)."""
    from reconciler.host import cgroups

    found = cgroups.mount()
    if found is None:
        return None
    path = os.path.join(found[0], f"rtest-{os.getpid()}-{next(_CLUSTERS)}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    return path


def remove_cgroup_tree(path: str) -> None:
    """Kill whatever is left under `path` (the cluster is stopped), then remove it."""
    from reconciler.host import cgroups

    if not os.path.isdir(path):
        return
    cgroups.kill(path)
    deadline = time.monotonic() + 5
    while cgroups.populated(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    cgroups.remove(path)


def _read_store(spec_dir: str) -> dict:
    """{"claims": {group: [owner, generation]}, "members": {node: counter}} via open_store."""
    import asyncio

    from reconciler import spec as specmod
    from reconciler.store.factory import open_store

    spec = specmod.load(spec_dir)
    c = spec.cluster
    if spec.store_url.startswith("dir:"):
        from reconciler.store import directory

        if directory.never_set_up(spec.store_url[4:]):
            return {"claims": {}, "members": {}}  # no agent has started yet (as `reconcile status` shows it)

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


class Node:
    def __init__(self, cluster: "Cluster", name: str, *, machine: str = ""):
        self.cluster = cluster
        self.name = name
        self.proc: subprocess.Popen | None = None
        # machine: a second agent under an existing name, as if on another machine (Cluster.add_twin)
        self.machine = machine
        self.spec_dir = (cluster.root / f"spec@{machine}" if machine
                         else cluster.root / f"spec-{name}" if cluster.own_specs else cluster.spec_dir)
        self.log = cluster.root / (f"agent-{name}.log" if not machine else f"agent-{name}@{machine}.log")
        self.netns: str | None = cluster.netns.get(name)
        # its cgroup: one per machine (a twin on another machine must not share its namesake's)
        self.cgroup_key = f"{name}@{machine}" if machine else name

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
        argv = [*outer, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *inner]
        if c.cgroup is not None:
            # The node's own cgroup (the same on a restart): the agent's subtree goes under it.
            cg = os.path.join(c.cgroup, self.cgroup_key)
            os.makedirs(cg, exist_ok=True)
            argv = ["/bin/sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *argv]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
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

    # --- local-state faults (tests/test_faults.py) ------------------------------------------
    # They need a node started in fault mode (Cluster.fault_mode()): PID 1 of its namespace is
    # tests/nodeinit.py, which runs the agent as its child (so the agent can die alone, as
    # under systemd with KillMode=process), and STATE/NODE is a small tmpfs of its own,
    # mounted inside the node's mount namespace (so it can be filled, and a twin started with
    # the same name has a state directory of its own, like a cloned VM). The harness reaches
    # that directory through /proc/PID/root.

    @property
    def hold_file(self) -> Path:
        """While it exists, a SIGKILLed agent is restarted only once it is removed (nodeinit.py)."""
        return getattr(self, "_hold_file", None) or self.cluster.root / f"hold-{self.name}"

    def follow_init(self) -> "Node":
        """After start() in fault mode: init_pid := PID 1 (nodeinit.py), agent_pid := the agent."""
        if getattr(self, "init_pid", None) is None or not self._is_init_of_proc(self.init_pid):
            self.init_pid = self.agent_pid
        self.agent_pid = self._wait_agent(f"agent {self.name} under its init")
        return self

    def _wait_agent(self, what: str) -> int:
        """The agent under nodeinit; the stale agent_pid if the node died meanwhile (an agent
        that fails at start ends its node, see nodeinit.py)."""
        found = wait_until(lambda: self._agent_under_init() or (not self.running and -1), 10, what=what)
        return self.agent_pid if found == -1 else found

    def _is_init_of_proc(self, pid: int) -> bool:
        try:
            return self.proc is not None and pid in [k.pid for k in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return False

    def _agent_under_init(self, exclude: int | None = None) -> int | None:
        try:
            kids = psutil.Process(self.init_pid).children()
        except psutil.NoSuchProcess:
            return None
        for k in kids:
            try:
                cmd = k.cmdline()
            except psutil.NoSuchProcess:
                continue
            # The agent itself: not a fork of the init's shell, whose argv holds the agent's too.
            if k.pid != exclude and cmd[1:4] == ["-m", "reconciler.cli", "run"]:
                return k.pid
        return None

    def refresh_agent(self) -> int | None:
        """The agent now running under nodeinit (which restarts one that failed), or None
        while none runs; agent_pid follows it."""
        found = self._agent_under_init()
        if found is not None:
            self.agent_pid = found
        return found

    def stop_namespace(self) -> None:
        """SIGTERM to the node's PID 1 (fault mode): passed on to the agent, or, while no agent
        runs, the node ends at once. Waits for the node to end; kill -9 after 15 s."""
        if self.running:
            os.kill(self.init_pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_namespace()

    def kill_namespace(self) -> None:
        """SIGKILL PID 1 of the node's namespace (fault mode: nodeinit): the node, whatever
        state its agent is in, and everything in it end at once. For cleanup."""
        if self.running:
            try:
                os.kill(self.init_pid, signal.SIGKILL)
            except (ProcessLookupError, AttributeError, TypeError):
                os.kill(self.proc.pid, signal.SIGKILL)  # unshare --kill-child: its child goes too
            self.proc.wait(10)

    @property
    def state_path(self) -> Path:
        """STATE/NODE as this node's own processes see it (its mount namespace, in fault mode)."""
        state = self.cluster.state_dir / self.name
        pid = getattr(self, "init_pid", None)
        return Path(f"/proc/{pid}/root{state}") if pid else state

    def kill_agent(self) -> int:
        """SIGKILL the agent alone (fault mode): its children and its keeper run on, and no
        agent runs on the node until respawn_agent(). Returns the killed agent's pid."""
        old = self.agent_pid
        self.hold_file.touch()
        os.kill(old, signal.SIGCONT)
        os.kill(old, signal.SIGKILL)
        # Until nodeinit has reaped it (not merely until it is a zombie): nodeinit must see
        # its death while the hold file exists.
        wait_until(lambda: not psutil.pid_exists(old), 10, what=f"agent {self.name} reaped")
        return old

    def respawn_agent(self) -> "Node":
        """Let nodeinit start the agent again (after kill_agent): a restart that adopts."""
        self.hold_file.unlink(missing_ok=True)
        self.agent_pid = self._wait_agent(f"agent {self.name} restarted")
        return self

    def restart_agent(self, *, down: float = 0.0, damage=None) -> "Node":
        """kill_agent(), then `damage()` (e.g. self.truncate_table) while no agent runs, then
        after `down` seconds respawn_agent(): the dangerous combination when `damage` loses
        the process table (fault mode)."""
        self.kill_agent()
        if damage is not None:
            damage()
        time.sleep(down)
        return self.respawn_agent()

    def truncate_table(self, keep: int = 0) -> bool:
        """Cut STATE/NODE/processes.json to its first `keep` bytes (0: empty). False if absent."""
        try:
            with open(self.state_path / "processes.json", "r+b") as fh:
                fh.truncate(min(keep, os.fstat(fh.fileno()).st_size))
            return True
        except FileNotFoundError:
            return False

    def delete_table(self) -> bool:
        return self._unlink("processes.json")

    def delete_lease(self) -> bool:
        return self._unlink("lease")

    def _unlink(self, name: str) -> bool:
        try:
            (self.state_path / name).unlink()
            return True
        except FileNotFoundError:
            return False

    FILL = ".fill"

    def fill_state(self, limit: int = 256 << 20) -> int:
        """Fill the node's state directory (its own tmpfs, fault mode) until ENOSPC; returns
        the bytes written. Refuses a state directory that is not a filesystem of its own."""
        path = self.state_path
        if os.stat(path).st_dev == os.stat(path.parent).st_dev:
            raise AssertionError(f"{path} is not a filesystem of its own: start the cluster in fault_mode()")
        fd = os.open(path / self.FILL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        written, chunk = 0, b"\0" * 65536
        try:
            while written < limit:
                try:
                    n = os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        break
                    raise
                written += n
        finally:
            os.close(fd)
        return written

    def unfill_state(self) -> bool:
        return self._unlink(self.FILL)

    def twin(self) -> "Node":
        """Start a second agent named like this node, in namespaces of its own (a cloned VM;
        in fault mode also with a state directory of its own). Not in cluster.nodes: stop it
        with terminate() or crash()."""
        c = self.cluster
        t = Node(c, self.name)
        t.cgroup_key = f"{self.name}@twin"  # another machine: a cgroup of its own, not this node's
        t.log = c.root / f"agent-{self.name}-twin.log"
        t._hold_file = c.root / f"hold-{self.name}-twin"
        fault = getattr(c, "fault_state_size", None)
        saved = c.pre_exec.get(self.name)
        if fault:
            c.pre_exec[self.name] = c._fault_pre_exec(self.name, t.hold_file)
        try:
            t.start()
        finally:
            if saved is None:
                c.pre_exec.pop(self.name, None)
            else:
                c.pre_exec[self.name] = saved
        return t.follow_init() if fault else t


class Cluster:
    def __init__(
        self, root: Path, *, nodes=("n1", "n2", "n3"), groups: str = "", cluster_extra: str = "", env=None, netns=None,
        store: str | None = None, store_netns: str | None = None, metrics=None, own_specs: bool = False,
    ):
        self.root = root
        self.spec_dir = root / "spec"
        self.spec_dir.mkdir(mode=0o755, exist_ok=True)
        # own_specs: every node reads a spec directory of its own (spec-NODE), as on machines
        # of their own; `write` then writes every node's copy unless told which node's.
        self.own_specs = own_specs
        for n in nodes if own_specs else ():
            (root / f"spec-{n}").mkdir(mode=0o755, exist_ok=True)
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
        self.cgroup = cgroup_base()  # MOUNT/rtest-PID-N: a cgroup per node below it

    def write(self, name: str, text: str, *, node: str | None = None) -> None:
        """Write spec file `name` (atomically, as an editor saves): into the shared spec
        directory, or with own_specs into `node`'s copy (None: every node's and the shared one)."""
        dirs = [self.spec_dir] if not self.own_specs else [self.root / f"spec-{node}"] if node else [
            self.spec_dir, *(p for p in sorted(self.root.glob("spec-*")) if p.is_dir())]
        for d in dirs:
            path = d / name
            tmp = d / f".{name}.tmp"
            tmp.write_text(textwrap.dedent(text))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)

    def read(self, name: str, *, node: str) -> str:
        """Spec file `name` as `node`'s copy holds it now."""
        return (self.nodes[node].spec_dir / name).read_text()

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
        if self.cgroup is not None:
            remove_cgroup_tree(self.cgroup)

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

    def each_runs_once(self, groups, timeout: float) -> None:
        """Wait until every group of `groups` runs on exactly one node, and check that it still
        does a second later (the end of a fault run)."""
        for g in groups:
            wait_until(lambda: self.runs_on_one(g), timeout, what=f"{g} running exactly once after the faults")
        time.sleep(1.0)  # and stays so: the time passing is the test
        for g in groups:
            assert len(self.running(g)) == 1, (g, self.running(g))

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

    # --- local-state faults (tests/test_faults.py) ------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def fault_mode(self, *, state_size: str = "4m") -> "Cluster":
        """Start every node (from now on) for the local-state faults of Node: nodeinit.py as
        PID 1 and a tmpfs of `state_size` at STATE/NODE in the node's mount namespace. Call
        Node.follow_init() after each Node.start()."""
        self.fault_state_size = state_size
        for n in self.nodes:
            self.pre_exec[n] = self._fault_pre_exec(n, self.nodes[n].hold_file)
        return self

    def _fault_pre_exec(self, node: str, hold: Path) -> str:
        state = self.state_dir / node
        return (f"mkdir -p {state} && mount -t tmpfs -o size={self.fault_state_size},mode=0755 reconciler-state {state}"
                f' && exec {sys.executable} {HERE / "nodeinit.py"} {hold} {state} "$@"')

    STRAY_KINDS = ("claim-file", "claim-dir", "node-symlink", "node-json")

    def stray_store_file(self, kind: str) -> Path:
        """Plant a stray entry in the directory store; remove it with remove_stray(). Kinds:
        claim-file (a regular file in claims/), claim-dir (a directory in claims/),
        node-symlink (nodes/ record whose target is garbage), node-json (nodes/NAME.json
        whose counter is not a number)."""
        assert self.store_url.startswith("dir:"), "stray store entries need the directory store"
        tag = f"stray{time.monotonic_ns() % 1_000_000}"
        if kind == "claim-file":
            path = self.store / "claims" / tag
            path.write_text("not a claim\n")
        elif kind == "claim-dir":
            path = self.store / "claims" / tag
            path.mkdir()
            (path / "junk").write_text("junk\n")
        elif kind == "node-symlink":
            path = self.store / "nodes" / tag
            os.symlink("not-a-counter:garbage", path)
        elif kind == "node-json":
            path = self.store / "nodes" / f"{tag}.json"
            path.write_text(json.dumps({"node": tag, "counter": "twelve", "digest": 7}))
        else:
            raise ValueError(kind)
        return path

    @staticmethod
    def remove_stray(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            for p in path.iterdir():
                p.unlink()
            path.rmdir()
        else:
            path.unlink(missing_ok=True)

    def guard_processes(self) -> list[dict]:
        """Every live guard process writing to this cluster's guard log, from /proc:
        [{pid, node, group, pidns}] (pid as the host sees it; pidns tells twins apart)."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if GUARD not in cmd or self.guard_log not in cmd:
                continue
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = p.environ()
                pidns = os.readlink(f"/proc/{p.pid}/ns/pid")
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                continue
            out.append({"pid": p.pid, "node": env.get("RECONCILER_NODE"), "group": env.get("RECONCILER_GROUP"), "pidns": pidns})
        return out
