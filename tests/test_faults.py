"""A randomized fault run: node crashes, pauses and restarts, mixed with local-state faults.

At no moment may a group run on two machines (the safety checker reads every guard's start,
alive and stop records; two agents with one node name in different pid namespaces are two
machines), and once the faults stop every group runs again exactly once, on the node that
holds its claim, with no copy left behind anywhere.

The faults (each node in fault mode, see tests/cluster.py: PID 1 of its namespace is
tests/nodeinit.py with the agent as its child, and STATE/NODE is a tmpfs of its own):

    crash           kill -9 of the whole node (its namespace), started again 0.2-1.2 s later
    pause           SIGSTOP of the agent for 0.05-0.3 s (shorter than the lease)
    pause-long      SIGSTOP of the agent for 0.5-1.5 s (past dead_after)
    restart         SIGTERM of the agent (a clean stop), started again 0-0.5 s later
    agent-kill      kill -9 of the agent alone (children and keeper run on), restarted
                    0-0.3 s later (systemd, KillMode=process): it adopts
    agent-kill+table-truncate / agent-kill+table-delete
                    the same, with processes.json truncated / deleted while no agent runs
    table-truncate / table-delete
                    processes.json truncated / deleted under a running agent
    lease-delete    STATE/NODE/lease deleted
    fill            the state directory full (ENOSPC) for 0.3-2 s
    twin            a second agent with the same node name (a cloned VM: own namespaces,
                    own state directory) for 0.5-2 s, stopped with SIGTERM or kill -9
    stray           a stray entry in the directory store for 0.3-1.5 s: a regular file or
                    a directory in claims/, a garbage node record in nodes/ (symlink or JSON)

The whole schedule (times, kinds, victims, durations) is a pure function of the seed
(`plan_faults`); the run executes it in order, late when an action takes longer than
planned. RECONCILER_FAULTS sets the number of faults (default 240: at least 100 crash /
pause / restart faults and 100+ local-state ones), RECONCILER_FAULT_SEED the seed (printed,
and written with what was done and when to faults.log next to the guard log).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import pytest

import safety
from cluster import Cluster, Node, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for unshare, mount and nsenter")

GROUPS = ("a", "b", "c", "d")
NODES = ("n1", "n2", "n3")
CLASSIC = ("crash", "pause", "pause-long", "restart")
# Local-state faults and their share of them (out of 13).
LOCAL = {
    "agent-kill": 1, "agent-kill+table-truncate": 2, "agent-kill+table-delete": 1, "table-truncate": 1,
    "table-delete": 1, "lease-delete": 2, "fill": 2, "twin": 2, "stray": 1,
}
IMPAIRING = {"crash", "pause", "pause-long", "restart", "agent-kill", "agent-kill+table-truncate", "agent-kill+table-delete"}
DURATION = {  # seconds the fault lasts (until the node is back, the agent resumes, the file goes)
    "crash": (0.2, 1.2), "pause": (0.05, 0.3), "pause-long": (0.5, 1.5), "restart": (0.0, 0.5),
    "agent-kill": (0.0, 0.3), "agent-kill+table-truncate": (0.0, 0.3), "agent-kill+table-delete": (0.0, 0.3),
    "fill": (0.3, 2.0), "twin": (0.5, 2.0), "stray": (0.3, 1.5),
}
GAP = (0.05, 0.4)  # seconds between two faults
CONVERGE = 20.0  # seconds the cluster gets, once the last fault ended, to run every group once


@dataclass(frozen=True)
class Step:
    at: float  # seconds after the start of the run
    action: str  # "do" or "undo"
    kind: str
    node: str
    index: int  # the fault's number: its "do" and "undo" share it
    detail: str = ""  # stray kind, twin stop, bytes kept of a truncated table


def plan_faults(seed: int, count: int, kinds: set[str] | None = None) -> list[Step]:
    """The run's schedule, from the seed alone: `count` faults, about 45 % crash / pause /
    restart, the rest local-state faults, in shuffled order. A fault that disables a node
    (IMPAIRING) hits a node that is not disabled, and at most two nodes are at once; at most
    one twin, one full state directory per node and two stray store entries at a time; file
    faults hit a node that is up. A fault that does not fit yet waits for the next gap."""
    rng = random.Random(seed)
    classic = [k for k in CLASSIC if kinds is None or k in kinds]
    local = [k for k, w in LOCAL.items() for _ in range(w) if kinds is None or k in kinds]
    n_classic = 0 if not classic else count if not local else max(1, round(count * 0.45))
    order = [classic[i % len(classic)] for i in range(n_classic)]
    order += [local[i % len(local)] for i in range(count - n_classic)]
    rng.shuffle(order)
    steps: list[Step] = []
    impaired: dict[str, float] = {}  # node -> until
    down: dict[str, float] = {}  # node -> until (crash, restart: no namespace at all)
    full: dict[str, float] = {}
    twin_until, strays = 0.0, []
    t = 1.0
    for index, kind in enumerate(order):
        while True:
            t += rng.uniform(*GAP)
            node = rng.choice(NODES)
            live = {n for n, u in impaired.items() if u > t}
            if kind in IMPAIRING:
                ok = node not in live and len(live) < 2
            elif kind == "twin":
                ok = twin_until <= t and down.get(node, 0) <= t
            elif kind == "stray":
                ok = sum(u > t for u in strays) < 2
            elif kind == "fill":
                ok = full.get(node, 0) <= t and down.get(node, 0) <= t
            else:
                ok = down.get(node, 0) <= t
            if ok:
                break
        lo, hi = DURATION.get(kind, (0.0, 0.0))
        until = t + rng.uniform(lo, hi)
        detail = ""
        if kind == "stray":
            detail = rng.choice(Cluster.STRAY_KINDS)
            strays.append(until)
        elif kind == "twin":
            detail = rng.choice(("terminate", "crash"))
            twin_until = until
        elif "table-truncate" in kind:
            detail = str(rng.choice((0, rng.randrange(1, 200))))
        elif kind == "fill":
            full[node] = until
        if kind in IMPAIRING:
            impaired[node] = until
        if kind in ("crash", "restart"):
            down[node] = until
        steps.append(Step(t, "do", kind, node, index, detail))
        if kind in DURATION:
            steps.append(Step(until, "undo", kind, node, index, detail))
    steps.sort(key=lambda s: (s.at, s.index, s.action == "do"))
    return steps


class Run:
    """Executes a plan on a cluster and remembers what it did, when (time.monotonic(), the
    guard log's clock), for the history log and to name the faults behind a violation."""

    def __init__(self, c: Cluster):
        self.c = c
        self.history: list[tuple[float, str]] = []
        self.twin: Node | None = None
        self.filled: dict[str, int] = {}  # node -> the init pid of the namespace that was filled
        self.strays: dict[int, object] = {}  # fault index -> path
        self.expected_down: set[str] = set()  # crashed or stopped by the plan

    def note(self, text: str) -> None:
        self.history.append((time.monotonic(), text))

    def boot(self, n: str) -> None:
        self.c.nodes[n].start().follow_init()

    def check_nodes(self) -> None:
        """A node that died without a fault doing it (its agent exited): note it, start it."""
        for n, node in self.c.nodes.items():
            if n not in self.expected_down and not node.running:
                self.note(f"DIED {n} on its own (exit {node.proc.returncode}; see agent-{n}.log): started again")
                self.filled.pop(n, None)
                node.hold_file.unlink(missing_ok=True)
                self.boot(n)

    def apply(self, s: Step) -> None:
        node = self.c.nodes[s.node]
        k = s.kind
        if s.action == "do":
            if k == "crash":
                node.crash()
                self.expected_down.add(s.node)
                self.filled.pop(s.node, None)
            elif k == "pause" or k == "pause-long":
                node.pause()
            elif k == "restart":
                node.terminate(timeout=15)
                self.expected_down.add(s.node)
                self.filled.pop(s.node, None)
            elif k.startswith("agent-kill"):
                node.kill_agent()
                if k.endswith("table-truncate"):
                    k += f" (kept {s.detail} bytes: {node.truncate_table(int(s.detail))})"
                elif k.endswith("table-delete"):
                    k += f" ({node.delete_table()})"
            elif k == "table-truncate":
                k += f" (kept {s.detail} bytes: {node.truncate_table(int(s.detail))})"
            elif k == "table-delete":
                k += f" ({node.delete_table()})"
            elif k == "lease-delete":
                k += f" ({node.delete_lease()})"
            elif k == "fill":
                k += f" ({node.fill_state()} bytes)"
                self.filled[s.node] = node.init_pid
            elif k == "twin":
                self.twin = node.twin()
                k += f" (pid {self.twin.agent_pid})"
            elif k == "stray":
                path = self.c.stray_store_file(s.detail)
                self.strays[s.index] = path
                k += f" {s.detail} {path.relative_to(self.c.store)}"
        else:
            if k == "crash" or k == "restart":
                self.boot(s.node)
                self.expected_down.discard(s.node)
                k = "start"
            elif k == "pause" or k == "pause-long":
                node.resume()
                k = "resume"
            elif k.startswith("agent-kill"):
                node.respawn_agent()
                k = "respawn agent"
            elif k == "fill":
                if self.filled.pop(s.node, None) == node.init_pid:
                    node.unfill_state()
                    k = "unfill"
                else:
                    k = "unfill: gone with the node's namespace"
            elif k == "twin":
                self.stop_twin(s.detail)
                k = f"stop twin ({s.detail})"
            elif k == "stray":
                self.c.remove_stray(self.strays.pop(s.index))
                k = "remove stray"
        self.note(f"{s.action} #{s.index} {k} {s.node}")

    def stop_twin(self, how: str = "terminate") -> None:
        if self.twin is not None:
            if how == "crash":
                self.twin.crash()
            else:
                self.twin.terminate(timeout=10)
            self.twin = None

    def cleanup(self) -> None:
        """After an error mid-run: end every fault still in force, so the cluster can stop."""
        for node in self.c.nodes.values():
            if node.hold_file.exists():
                node.respawn_agent()
            if node.running:
                node.resume()
        for n in list(self.filled):
            self.c.nodes[n].unfill_state()
        for path in self.strays.values():
            self.c.remove_stray(path)
        self.stop_twin("crash")

    def blame(self, violation_start: float, window: float = 3.0) -> str:
        """The faults done in the `window` seconds before a violation began."""
        recent = [f"{t:.3f} {what}" for t, what in self.history if violation_start - window <= t <= violation_start]
        return "; ".join(recent[-6:])


def converged(c: Cluster) -> list[str]:
    """What is wrong now: per group exactly one live guard (by its log and by /proc), on
    the node that holds the group's claim, in that node's own pid namespace."""
    problems = []
    live = safety.live_runs(c.guard_log, time.monotonic())
    procs = c.guard_processes()
    claims = c.claims()
    ns_of = {}
    for n, node in c.nodes.items():
        try:
            ns_of[n] = os.readlink(f"/proc/{node.init_pid}/ns/pid")
        except OSError:
            ns_of[n] = None
    for g in GROUPS:
        runs = live.get(g, [])
        mine = [p for p in procs if p["group"] == g]
        owner = claims.get(g, (None, 0))[0]
        if len(runs) != 1:
            problems.append(f"{g}: {len(runs)} live runs in the guard log {runs}, owner {owner}")
        if len(mine) != 1:
            problems.append(f"{g}: {len(mine)} guard processes {mine}, owner {owner}")
        for p in mine:
            if p["node"] != owner or p["pidns"] != ns_of.get(p["node"]):
                problems.append(f"{g}: guard pid {p['pid']} on {p['node']} ({p['pidns']}) but the claim is {owner}'s"
                                f" ({ns_of.get(owner)}): left behind")
    return problems


def test_randomized_faults_never_run_a_group_twice(tmp_path):
    faults = int(os.environ.get("RECONCILER_FAULTS", "240"))
    seed = int(os.environ.get("RECONCILER_FAULT_SEED", str(int(time.time()))))
    print(f"RECONCILER_FAULT_SEED={seed} RECONCILER_FAULTS={faults}")
    kinds = {k.strip() for k in os.environ.get("RECONCILER_FAULT_KINDS", "").split(",") if k.strip()} or None
    assert kinds is None or kinds <= set(CLASSIC) | set(LOCAL), f"RECONCILER_FAULT_KINDS: unknown {kinds - set(CLASSIC) - set(LOCAL)}"
    steps = plan_faults(seed, faults, kinds)
    assert sum(s.action == "do" for s in steps) == faults
    log = str(tmp_path / "guard.log")
    c = Cluster(tmp_path, nodes=NODES, groups="".join(Cluster.guard_group(g, log) for g in GROUPS)).fault_mode()
    run = Run(c)
    problems: list[str] = []
    try:
        for n in NODES:
            run.boot(n)
        for g in GROUPS:
            wait_until(lambda: c.runs_on_one(g), 15, what=f"{g} running")
        start = time.monotonic()
        run.note(f"run starts: {len(steps)} steps")
        ok = False
        try:
            for s in steps:
                run.check_nodes()
                delay = start + s.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                try:
                    run.apply(s)
                except (ProcessLookupError, FileNotFoundError) as exc:  # its node died on its own meanwhile
                    run.note(f"{s.action} #{s.index} {s.kind} {s.node}: skipped ({exc!r})")
            ok = True
        finally:
            if not ok:
                run.cleanup()
        run.note(f"last fault ended ({time.monotonic() - start - steps[-1].at:+.1f} s late)")
        run.check_nodes()
        try:
            wait_until(lambda: not converged(c), CONVERGE, step=0.2, what="every group running exactly once")
            time.sleep(1.0)
        except AssertionError:
            pass
        problems = converged(c)
        run.note("converged" if not problems else "NOT converged: " + " | ".join(problems))
    finally:
        c.stop()
        bad = c.violations()
        lines = [f"{v}  <- after: {run.blame(float(v.rsplit('[', 1)[1].split(',')[0]))}" for v in bad]
        (tmp_path / "faults.log").write_text(
            f"seed {seed} faults {faults} kinds {','.join(sorted(kinds or ())) or 'all'}\n"
            + "".join(f"{t:.3f} {what}\n" for t, what in run.history)
            + "".join(f"VIOLATION {line}\n" for line in lines))
    report = [f"RECONCILER_FAULT_SEED={seed} ({tmp_path / 'faults.log'}):"]
    if bad:
        report += [f"{len(bad)} double runs (the first 20, each with the faults of the 3 s before it):", *lines[:20]]
    if problems:
        report += ["not converged at the end:", *problems]
    assert not bad and not problems, "\n".join(report)
