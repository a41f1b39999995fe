"""The local-state fault run's machinery (tests/test_faults.py): its schedule, a pure
function of the seed (`plan_faults`), the executor (`Run`) that applies it to a cluster in
fault mode and keeps the history, and the end-state check (`converged`)."""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass

import safety
from cluster import Cluster, Node

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
GAP = (0.03, 0.3)  # seconds between two faults
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


def crash(node: Node) -> None:
    """kill -9 of the node: its agent (nodeinit then ends the namespace), or, while no agent
    runs (nodeinit restarts one that failed), the namespace's PID 1 itself."""
    if node.refresh_agent() is None:
        node.kill_namespace()
        return
    try:
        node.crash()
    except ProcessLookupError:
        node.kill_namespace()


def stop(node: Node) -> None:
    """A clean stop of the node: SIGTERM to its PID 1, which passes it on to its agent."""
    # SIGTERM to PID 1 (nodeinit passes it on to the agent it runs now): signalling the agent
    # by pid could hit one that nodeinit has just replaced, and leave the node up.
    if node.refresh_agent() is not None:
        try:
            node.resume()  # a paused agent would not see the SIGTERM until the kill -9 after 15 s
        except ProcessLookupError:
            pass
    node.stop_namespace()


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
        self.twins: list[Node] = []
        self.agentless: set[str] = set()  # nodes whose agent failed, not yet started again

    def note(self, text: str) -> None:
        self.history.append((time.monotonic(), text))

    def boot(self, n: str) -> None:
        node = self.c.nodes[n]
        if node.running:
            # The fault that was to take it down was skipped (its agent died meanwhile): a
            # second namespace under the same name would be a second machine, not a restart.
            self.note(f"{n} still up: not starting it again")
            return
        node.start().follow_init()

    def check_nodes(self) -> None:
        """A node that ended without a fault doing it: note it, start it. An agent that
        nodeinit started again after it failed: note it, follow it."""
        for n, node in self.c.nodes.items():
            if n not in self.expected_down and not node.running:
                self.note(f"DIED {n} on its own (exit {node.proc.returncode}; see agent-{n}.log): started again")
                self.filled.pop(n, None)
                node.hold_file.unlink(missing_ok=True)
                self.boot(n)
            elif node.running and not node.hold_file.exists():
                before = node.agent_pid
                now = node.refresh_agent()
                if now is None and n not in self.agentless:
                    self.agentless.add(n)
                    self.note(f"FAILED agent of {n} (pid {before}) exited: nodeinit starts it again; see agent-{n}.log")
                elif now is not None and (now != before or n in self.agentless):
                    self.agentless.discard(n)
                    self.note(f"agent of {n} started again by nodeinit after it failed (pid {now})")

    def apply(self, s: Step) -> None:
        node = self.c.nodes[s.node]
        k = s.kind
        if s.action == "do":
            if k == "crash":
                crash(node)
                self.expected_down.add(s.node)
                self.filled.pop(s.node, None)
            elif k == "pause" or k == "pause-long":
                if node.refresh_agent() is None:
                    raise ProcessLookupError("no agent runs now: nodeinit restarts a failed one")
                node.pause()
            elif k == "restart":
                stop(node)
                self.expected_down.add(s.node)
                self.filled.pop(s.node, None)
            elif k.startswith("agent-kill"):
                if node.refresh_agent() is None:
                    raise ProcessLookupError("no agent runs now: nodeinit restarts a failed one")
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
                self.twins.append(self.twin)
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
                crash(self.twin)
            else:
                stop(self.twin)
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

    def stop_all(self) -> None:
        """Cluster.stop(), after ending the nodes where no agent runs (it signals agents)."""
        for node in self.c.nodes.values():
            if node.running and node.refresh_agent() is None:
                node.stop_namespace()
        self.c.stop()

    def kill_leftovers(self) -> list[str]:
        """After Cluster.stop(): end every namespace still there (a node that would not stop,
        a twin), so that nothing of this run outlives it. Returns what it had to end."""
        left = []
        for node in [*self.c.nodes.values(), *self.twins]:
            if node.running:
                left.append(f"{node.name} (unshare pid {node.proc.pid}) still ran after the cluster stopped")
                node.kill_namespace()
        for g in self.c.guard_processes():
            left.append(f"guard {g} still ran after the cluster stopped")
            try:
                os.kill(g["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

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
    try:
        claims = c.claims()
    except Exception as exc:  # noqa: BLE001 - a store that cannot be read is a finding, not a crash of the check
        problems.append(f"the store cannot be read: {exc!r}")
        claims = {}
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
