#!/usr/bin/env python3
"""Cost as the work grows: agents under more members and more groups, an idle agent, `plan`,
and spec edit -> converged.

    python3 tests/bench/scale.py [--quick] [--only matrix,idle,plan,edit,cold] [--stores dir,etcd]
                                 [--profile] [--json FILE]

matrix  3 real agents (tests/cluster.py: each in its own `unshare --pid --fork --mount-proc`,
        default timing, /metrics on 127.0.0.1) plus a synthetic member generator (a
        subprocess of this script) that keeps M node heartbeats alive in the store, every
        heartbeat interval; for the directory store and for etcd (tests/etcd_cluster.py, one
        member by default). `--generator publish`: one `open_store(url).publish(Heartbeat(...))`
        call per member and heartbeat, in asyncio (the API as an agent uses it; one Python
        process manages ~1,000 of those a second). `--generator batch` (default): the same
        records written in rounds (directory: DirectoryStore's own write of each heartbeat;
        etcd: one transaction per 50 members bound to one kept-alive lease), which reaches
        10,000 heartbeats a second. G groups of one `sleep 3600` each; every group lists the
        three real nodes, rotated, so each agent runs a third of them and no group waits for
        a synthetic member (which never claims anything). Synthetic members publish a small
        status document (no per-group section); a real node's grows with the groups and the
        members (printed: "status KiB").
        For each (store, G, M), over a --window second window, per agent:
          tick      reconciler_tick_duration_seconds (one reconcile pass: observe, plan,
                    dispatch, status document, metrics) from the agent's /metrics, p50/p99
                    interpolated within the histogram's buckets (the worst agent), and the
                    pass rate (ticks/s, the mean of the three)
          cpu       psutil cpu_times delta / window (100 % = one core) of the agent process:
                    the mean of the three (and the worst)
          rss       at the end of the window (the largest)
          live      the fewest members any agent counts alive (reconciler_members_live), of
                    3 + M: below that, the generator fell behind or an agent lost its lease
        and for the store: writes/s. Directory: renames into nodes/ and status/ and claim
        symlinks, counted with inotify ("agent wr/s": the agents' own, n = heartbeats,
        s = status documents, c = claims; "store wr/s": everyone's). etcd: the agents' puts
        from the per-key versions of their heartbeat and status keys plus two per claim
        ("agent wr/s" p = puts), and etcd_mvcc_put_total from etcd's /metrics for everyone.
        The generator's achieved heartbeat rate is printed too ("gen hb/s"; the target is
        M x 10/s).
        Groups >= --relaxed-from (1,000) run at a relaxed timing (heartbeat 250ms, lease 2s,
        demote_margin 250ms, dead_after 2.8s; rows marked *): at the default timing a cold
        start of 1,000 groups on three agents sharing 2 cores never converges (the agents'
        event loops stay busy longer than the ~200 ms a 400 ms lease leaves, they demote,
        release, reclaim, and so on). A configuration that does not converge within
        --converge-max seconds is reported as such.
idle    one agent owning 100 groups, nothing changing, --idle-window seconds: CPU share and
        RSS of the agent (goal <= 1 % of a core, <= 60 MiB), and of its keeper. Default timing
        unless --idle-timing overrides [cluster.timing] (as failover.py's --timing).
plan    `reconciler.plan.plan` in-process for G groups x 10 entries with 100 live members
        (goal <= 20 ms at 1,000 groups), three views: this node owns every group (all
        entries running: the most entry work), claims spread over the 100 nodes by rank
        (steady state), nothing claimed yet (every group ranks all 100 nodes). Median of
        --plan-runs calls at 250/500/1,000/2,000 groups; the fitted exponent of time ~ G^k
        (least squares on log-log; 1 = linear).
edit    3 agents, directory store, 100 background groups and one group whose runlevel is
        flipped between two levels that run different commands (`sleep 3601` / `sleep
        3602`), --edits times, through the function behind `reconcile tell` (edit.tell).
        Converged = the owner's process tree has the new command and not the old one (polled
        every 2 ms from /proc). p50/p90/max from the start of the tell() call (goal p50 <=
        300 ms).
cold    one agent, directory store, default timing, --cold-groups groups of one `sleep` each
        (not in the default --only): seconds from the agent's start until every process
        runs, and the agent's CPU time by then; --cold-runs runs, each printed, and the
        median. The cost of a node that takes on many groups at once.
--profile records the worst matrix configuration's agent n1 with py-spy (`pip install -e
'.[bench]'`) for the window and prints the functions with the most samples (inclusive and
own).
Every section prints the load average before and after; on a busy machine the numbers are
noisy (tick times are wall-clock). Needs root (unshare), etcd for the etcd store.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS / "bench"))  # its siblings, also when not run as a script

from failover import timing_toml  # noqa: E402  (tests/bench/, beside this script)
from respawn import children, cmdline  # noqa: E402

MiB = 1024 * 1024
# --relaxed-from: the matrix runs configurations with this many groups or more at this timing
RELAXED = {"heartbeat": "250ms", "lease": "2s", "demote_margin": "250ms", "dead_after": "2800ms"}
HEARTBEAT = 0.1  # the default [cluster.timing] heartbeat, which the agents here run with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


# --- the synthetic member generator (a subprocess: `scale.py _generate ...`) ---------------------


async def generate(url: str, prefix: str, members: int, interval: float, digest: str, stats: str, lease: float) -> None:
    from reconciler.published import NodeStatus
    from reconciler.store import Heartbeat, StoreError
    from reconciler.store.factory import open_store

    if url.startswith("dir:"):
        stores = [open_store(url)]
        stores[0].create()  # as an agent's start-up does (nothing else creates the store)
    else:  # a store instance (one etcd lease, one connection) per 50 members
        stores = [open_store(url, prefix=prefix, lease=lease, timeout=2.0) for _ in range(max(1, math.ceil(members / 50)))]
    status = NodeStatus()  # small: no per-group section
    counts = {"published": 0, "errors": 0}
    loop = asyncio.get_running_loop()

    async def member(i: int) -> None:
        name, store = f"s{i:04d}", stores[i % len(stores)]
        counter = time.time_ns() // 1_000_000  # grows across generator restarts too
        await asyncio.sleep(random.random() * interval)
        while True:
            started = loop.time()
            counter += 1
            try:
                await store.publish(Heartbeat(node=name, counter=counter, digest=digest, status=status))
                counts["published"] += 1
            except StoreError:
                counts["errors"] += 1
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    async def report() -> None:
        while True:
            t = os.times()
            doc = dict(counts, cpu=t.user + t.system, time=time.monotonic())
            tmp = stats + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(doc, fh)
            os.replace(tmp, stats)
            await asyncio.sleep(0.25)

    await asyncio.gather(report(), *(member(i) for i in range(members)))


async def generate_batch(url: str, prefix: str, members: int, interval: float, digest: str, stats: str, lease: float) -> None:
    """The same records as M nodes' `publish`, written in rounds: one Python process cannot
    make 10,000 separate publish calls a second. Directory: DirectoryStore's own write of
    each heartbeat (status once), all in one worker thread per round. etcd: one lease kept
    alive per round and one transaction per 50 nodes (the keys and values publish writes)."""
    from reconciler.published import NodeStatus
    from reconciler.store import Heartbeat, records
    from reconciler.store.factory import open_store

    names = [f"s{i:04d}" for i in range(members)]
    status = NodeStatus()  # small: no per-group section
    counts = {"published": 0, "errors": 0, "rounds": 0}
    loop = asyncio.get_running_loop()
    counter = time.time_ns() // 1_000_000
    store = open_store(url) if url.startswith("dir:") else open_store(url, prefix=prefix, lease=lease, timeout=2.0)

    if url.startswith("dir:"):
        store.create()  # as an agent's start-up does (nothing else creates the store)

        async def one_round(c: int) -> None:
            def work() -> None:
                for n in names:
                    store.publish_blocking(Heartbeat(node=n, counter=c, digest=digest, status=status))
            await asyncio.to_thread(work)
    else:
        from reconciler.store.etcd import values as etcdvalues
        from reconciler.store.etcd.conn import put_op

        written: set[str] = set()  # nodes whose status is written under the current lease
        status_json = records.status_text(status)
        status_hash = etcdvalues.status_hash(status_json.encode())  # as EtcdStore.publish names it

        async def one_round(c: int) -> None:
            deadline = store.conn.deadline()
            lease_id = store.lease.id
            if lease_id and not await store.lease.keepalive(lease_id, deadline):
                store.lease.drop(lease_id)
                written.clear()
            lease_id = await store.lease.ensure(deadline)
            for k in range(0, len(names), 50):  # <= 100 operations per transaction (etcd allows 128)
                ops = []
                for n in names[k:k + 50]:
                    ops.append(put_op(store.conn.key("nodes", n), json.dumps({"node": n, "counter": c, "digest": digest, "status_hash": status_hash}), lease_id))
                    if n not in written:
                        ops.append(put_op(store.conn.key("status", n), status_json, lease_id))
                        written.add(n)
                await store.conn.txn("publish", [], ops, [], deadline)

    async def report() -> None:
        while True:
            t = os.times()
            doc = dict(counts, cpu=t.user + t.system, time=time.monotonic())
            with open(stats + ".tmp", "w") as fh:
                json.dump(doc, fh)
            os.replace(stats + ".tmp", stats)
            await asyncio.sleep(0.25)

    async def rounds() -> None:
        nonlocal counter
        while True:
            started = loop.time()
            counter += 1
            try:
                await one_round(counter)
                counts["published"] += len(names)
                counts["rounds"] += 1
            except Exception as exc:  # StoreError, OSError: count and go on
                counts["errors"] += 1
                counts["last_error"] = str(exc)[:200]
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    await asyncio.gather(report(), rounds())


class Generator:
    def __init__(self, work: Path, url: str, prefix: str, digest: str, mode: str = "batch"):
        self.work, self.url, self.prefix, self.digest, self.mode = work, url, prefix, digest, mode
        self.proc: subprocess.Popen | None = None
        self.stats = work / "generator.json"
        self.members = 0

    def start(self, members: int) -> None:
        self.stop()
        self.members = members
        self.stats.unlink(missing_ok=True)
        if members == 0:
            return
        with open(self.work / "generator.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "_generate", "--url", self.url, "--prefix", self.prefix, "--members", str(members),
                 "--interval", str(HEARTBEAT), "--digest", self.digest, "--stats", str(self.stats), "--mode", self.mode],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def read(self) -> dict:
        try:
            return json.loads(self.stats.read_text())
        except (OSError, ValueError):
            return {"published": 0, "errors": 0, "cpu": 0.0, "time": time.monotonic()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


# --- observation helpers ---------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')


def scrape(address: str, names: tuple[str, ...]) -> dict[str, list[tuple[dict, float]]]:
    """{metric name: [(labels, value)]} for the metric names asked for (text exposition)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict, float]]] = {n: [] for n in names}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in out:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[m.group(1)].append((labels, float(m.group(3))))
    return out


TICK = "reconciler_tick_duration_seconds"
TICK_NAMES = (f"{TICK}_bucket", f"{TICK}_sum", f"{TICK}_count", "reconciler_members_live", "reconciler_groups_owned")


def tick_state(address: str) -> dict:
    s = scrape(address, TICK_NAMES)
    buckets = sorted(((float(lb["le"]), v) for lb, v in s[f"{TICK}_bucket"]), key=lambda x: x[0])
    one = lambda name: s[name][0][1] if s[name] else 0.0  # noqa: E731
    return {"buckets": buckets, "sum": one(f"{TICK}_sum"), "count": one(f"{TICK}_count"),
            "live": one("reconciler_members_live"), "owned": one("reconciler_groups_owned")}


def hist_quantile(before: list, after: list, q: float) -> float:
    """histogram_quantile over the bucket deltas, linear within a bucket (seconds)."""
    deltas = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    total = deltas[-1][1] if deltas else 0
    if total <= 0:
        return float("nan")
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le, c in deltas:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def rss(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return float("nan")


def keeper_of(agent_pid: int) -> int | None:
    for p in children(agent_pid):
        if "reconciler.keeper" in cmdline(p):
            return p
    return None


def count_children(agent_pid: int, argv: list[str]) -> int:
    return sum(1 for p in children(agent_pid) if cmdline(p) == argv)


class Inotify(threading.Thread):
    """Counts writes into a directory store: renames into nodes/ and status/, claim symlinks."""

    IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x100, 0x80, 0x4000

    def __init__(self, store: Path, agents: set[str]):
        super().__init__(daemon=True)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.agents = agents
        self.wds = {}
        for sub, mask in (("nodes", self.IN_MOVED_TO), ("status", self.IN_MOVED_TO), ("claims", self.IN_CREATE)):
            (store / sub).mkdir(parents=True, exist_ok=True)
            wd = self.libc.inotify_add_watch(self.fd, str(store / sub).encode(), mask)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {store / sub}")
            self.wds[wd] = sub
        self.counts: dict[str, int] = {}
        self.overflow = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import select

        while not self._halt.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if not r:
                continue
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            i = 0
            while i + 16 <= len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, i)
                name = data[i + 16 : i + 16 + length].rstrip(b"\0").decode(errors="replace")
                i += 16 + length
                if mask & self.IN_Q_OVERFLOW:
                    self.overflow += 1
                    continue
                sub = self.wds.get(wd)
                if sub is None or name.startswith("."):
                    continue
                node = name[:-5] if name.endswith(".json") else name
                who = "agents" if node in self.agents or sub == "claims" else "synthetic"
                key = f"{who}/{sub}"
                self.counts[key] = self.counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)
        os.close(self.fd)


def etcd_agent_puts(address: str, prefix: str, agents) -> float:
    """Puts the agents made so far, from etcd's per-key versions (JSON gateway, keys only):
    their heartbeat and status keys, plus two per claim (the claim and generations/GROUP)."""
    import base64

    def b64(x: bytes) -> str:
        return base64.b64encode(x).decode()

    base = f"{prefix}/".encode()
    end = base[:-1] + bytes([base[-1] + 1])
    body = json.dumps({"key": b64(base), "range_end": b64(end), "keys_only": True}).encode()
    req = urllib.request.Request(f"http://{address}/v3/kv/range", data=body)
    with urllib.request.urlopen(req, timeout=10) as r:
        kvs = json.load(r).get("kvs", [])
    mine = {f"{prefix}/{kind}/{n}" for kind in ("nodes", "status") for n in agents}
    total = 0
    for kv in kvs:
        key = base64.b64decode(kv["key"]).decode()
        version = int(kv.get("version", 0))
        if key in mine:
            total += version
        elif key.startswith(f"{prefix}/generations/"):
            total += 2 * version
    return float(total)


def etcd_puts(address: str) -> float:
    s = scrape(address, ("etcd_mvcc_put_total",))
    return s["etcd_mvcc_put_total"][0][1] if s["etcd_mvcc_put_total"] else float("nan")


# --- specs -------------------------------------------------------------------------------------------

NODES = ("n1", "n2", "n3")
SLEEP = ["sleep", "3600"]


def groups_toml(count: int, prefix: str = "g", nodes: tuple[str, ...] = NODES) -> str:
    """`count` groups of one `sleep`, each listing `nodes` rotated by its index."""
    out = []
    for i in range(count):
        order = [nodes[(i + k) % len(nodes)] for k in range(len(nodes))]
        name = f"{prefix}{i:04d}"
        out.append(f"""
[groups.{name}]
runlevel = "run"
nodes = {json.dumps(order)}

[[groups.{name}.entries]]
tag = "{name}-p"
runlevels = ["run"]
command = {json.dumps(SLEEP)}
stop_timeout = "1s"
""")
    return "".join(out)


def cluster(root: Path, groups: str, *, store: str | None = None, extra: str = "", nodes=NODES, metrics=True):
    from cluster import Cluster

    root.mkdir(parents=True, mode=0o755)
    m = {n: f"127.0.0.1:{free_port()}" for n in nodes} if metrics else None
    return Cluster(root, nodes=tuple(nodes), groups=groups, store=store, cluster_extra=extra, metrics=m)


def crash_all(c) -> None:
    for n in c.nodes.values():
        try:
            n.crash()
        except Exception:
            pass


def wait_running(c, expected: int, timeout: float) -> float:
    """Seconds until `expected` sleeps run under the agents altogether."""
    t0 = time.monotonic()
    while True:
        running = sum(count_children(n.agent_pid, SLEEP) for n in c.nodes.values())
        if running >= expected:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {running} of {expected} processes running after {timeout:.0f}s")
        time.sleep(0.25)


# --- matrix -----------------------------------------------------------------------------------------


def py_spy_top(pid: int, seconds: float, out: Path, top: int = 24) -> list[str]:
    exe = shutil.which("py-spy")
    if exe is None:
        return ["py-spy not installed (pip install -e '.[bench]')"]
    raw = out.with_suffix(".txt")
    r = subprocess.run([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200", "--gil", "--format", "raw",
                        "--output", str(raw), "--nonblocking"], capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0 or not raw.exists():
        return [f"py-spy failed: {r.stderr.strip()[-500:]}"]
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n_ = int(n)
        total += n_
        frames = [re.sub(r"\s*\(([^)]*/)?([^/)]+)\)$", r" (\2)", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n_
        own[frames[-1]] = own.get(frames[-1], 0) + n_
    lines = [f"py-spy: {total} samples at 200 Hz over {seconds:.0f}s (--gil: only samples holding the GIL, i.e. Python running); raw stacks: {raw}"]
    lines.append("  inclusive:")
    shown = [(f, n) for f, n in sorted(inclusive.items(), key=lambda x: -x[1]) if n < 0.9 * total]  # not the loop's frames
    for f, n in shown[:top]:
        lines.append(f"    {100 * n / max(total, 1):5.1f}%  {f}")
    lines.append("  own:")
    for f, n in sorted(own.items(), key=lambda x: -x[1])[:top // 2]:
        lines.append(f"    {100 * n / max(total, 1):5.1f}%  {f}")
    return lines


_ETCD = {}


def shared_etcd(args, work: Path):
    """One etcd (tests/etcd_cluster.py, --etcd-members members) for the whole run; prefixes keep runs apart."""
    if "cluster" not in _ETCD:
        from etcd_cluster import EtcdCluster

        _ETCD["cluster"] = EtcdCluster(args.etcd_members, work / "etcd").start()
    return _ETCD["cluster"]


def matrix(args, work: Path, results: dict) -> None:
    from reconciler import spec as specmod

    rows = []
    print(f"\n== matrix: 3 agents + M synthetic members, G groups; window {args.window:g}s; load {load()}", flush=True)
    print(f"{'store':<5} {'G':>5} {'M':>5} {'live':>9} {'tick p50':>9} {'tick p99':>9} {'ticks/s':>7} {'cpu %':>13} "
          f"{'rss MiB':>7} {'status KiB':>10} {'agent wr/s':>16} {'gen hb/s':>9} {'store wr/s':>10}  load", flush=True)
    for store in args.stores:
        etcd = shared_etcd(args, work) if store == "etcd" else None
        for gi, groups in enumerate(args.groups):
            root = work / f"m-{store}-{groups}"
            prefix = f"/scale-{groups}"
            extra = f'etcd_prefix = "{prefix}"\n' if store == "etcd" else ""
            relaxed = groups >= args.relaxed_from
            if relaxed:
                extra += "[cluster.timing]\n" + "".join(f'{k} = "{v}"\n' for k, v in RELAXED.items())
            c = cluster(root, groups_toml(groups), store=etcd.url if store == "etcd" else None, extra=extra)
            gen = None
            ino = None
            try:
                spec = specmod.load(str(c.spec_dir))
                gen = Generator(root, spec.store_url, prefix, spec.digest(), args.generator)
                c.start()
                try:
                    took = wait_running(c, groups, timeout=args.converge_max)
                except RuntimeError as exc:
                    log = (root / "agent-n1.log").read_text(errors="replace")
                    print(f"{store:<5} {groups:>5}     -  did not converge at {'relaxed' if relaxed else 'default'} timing: "
                          f"{exc} (n1: {log.count('lease lapsed')} lease lapses, {log.count('demoted')} demotions)", flush=True)
                    rows.append({"store": store, "groups": groups, "converged": False, "error": str(exc),
                                 "timing": "relaxed" if relaxed else "default"})
                    continue
                if args.verbose:
                    print(f"  ({store}, {groups} groups: all running {took:.1f}s after the agents started)", flush=True)
                if store == "dir":
                    ino = Inotify(c.store, set(NODES))
                    ino.start()
                for members in args.members:
                    worst = store == args.stores[0] and groups == max(args.groups) and members == max(args.members)
                    row = measure(args, c, gen, ino, etcd, store, groups, members, root, profile=args.profile and worst,
                                  mark="*" if relaxed else "")
                    row["timing"] = "relaxed" if relaxed else "default"
                    rows.append(row)
            finally:
                if gen is not None:
                    gen.stop()
                if ino is not None:
                    ino.stop()
                crash_all(c)
    results["matrix"] = rows


def measure(args, c, gen: Generator, ino, etcd, store: str, groups: int, members: int, root: Path, profile: bool,
            mark: str = "") -> dict:
    gen.start(members)
    want = 3 + members
    deadline = time.monotonic() + args.settle_max
    live = 0.0
    while time.monotonic() < deadline:  # settle: the agents see (most of) the members alive
        live = min(tick_state(c.metrics[n])["live"] for n in NODES)
        if live >= 3 + 0.95 * members:
            break
        time.sleep(0.5)
    time.sleep(args.settle)
    agents = {n: c.nodes[n].agent_pid for n in NODES}
    before = {n: tick_state(c.metrics[n]) for n in NODES}
    cpu0 = {n: cpu_seconds(p) for n, p in agents.items()}
    g0 = gen.read()
    w0 = ino.snapshot() if ino else {}
    p0 = etcd_puts(etcd.endpoint(0)) if etcd else 0.0
    a0 = etcd_agent_puts(etcd.endpoint(0), gen.prefix, NODES) if etcd else 0.0
    t0 = time.monotonic()
    load0 = load()
    prof = []
    if profile:
        prof = py_spy_top(agents["n1"], args.window, root / "py-spy-n1")
    else:
        time.sleep(args.window)
    elapsed = time.monotonic() - t0
    cpu1 = {n: cpu_seconds(p) for n, p in agents.items()}
    g1 = gen.read()
    w1 = ino.snapshot() if ino else {}
    p1 = etcd_puts(etcd.endpoint(0)) if etcd else 0.0
    a1 = etcd_agent_puts(etcd.endpoint(0), gen.prefix, NODES) if etcd else 0.0
    after = {n: tick_state(c.metrics[n]) for n in NODES}
    per = {}
    for n in NODES:
        b, a = before[n], after[n]
        dc = a["count"] - b["count"]
        per[n] = {
            "tick_p50": hist_quantile(b["buckets"], a["buckets"], 0.5),
            "tick_p99": hist_quantile(b["buckets"], a["buckets"], 0.99),
            "tick_mean": (a["sum"] - b["sum"]) / dc if dc else float("nan"),
            "ticks_per_s": dc / elapsed,
            "cpu": (cpu1[n] - cpu0[n]) / elapsed,
            "rss": rss(agents[n]),
            "live": a["live"],
            "owned": a["owned"],
        }
    gen_rate = (g1["published"] - g0["published"]) / elapsed
    if ino:
        delta = {k: w1.get(k, 0) - w0.get(k, 0) for k in set(w0) | set(w1)}
        agent_w = {k.split("/")[1]: v / elapsed for k, v in delta.items() if k.startswith("agents/")}
        total_w = sum(delta.values()) / elapsed
    else:
        agent_w = {"puts": (a1 - a0) / elapsed}
        total_w = (p1 - p0) / elapsed
    try:
        status_kib = max((c.store / "status" / f"{n}.json").stat().st_size for n in NODES) / 1024 if store == "dir" else float("nan")
    except OSError:
        status_kib = float("nan")
    row = {
        "store": store, "groups": groups, "members": members, "window": elapsed, "agents": per,
        "generator_heartbeats_per_s": gen_rate, "generator_cpu": (g1["cpu"] - g0["cpu"]) / elapsed if g1.get("cpu") else 0.0,
        "agent_writes_per_s": agent_w, "store_writes_per_s": total_w, "status_kib": status_kib,
        "load_before": load0, "load_after": load(), "overflow": getattr(ino, "overflow", 0),
    }
    cpus = [p["cpu"] * 100 for p in per.values()]
    wr = "/".join(f"{k[0]}{v:.0f}" for k, v in sorted(agent_w.items()))
    lv = f"{min(p['live'] for p in per.values()):.0f}/{3 + members}"
    print(f"{store:<5} {str(groups) + mark:>5} {members:>5} {lv:>9} {max(p['tick_p50'] for p in per.values()) * 1000:7.1f}ms "
          f"{max(p['tick_p99'] for p in per.values()) * 1000:7.1f}ms {statistics.fmean(p['ticks_per_s'] for p in per.values()):7.1f} "
          f"{statistics.fmean(cpus):5.1f} (max {max(cpus):4.1f}) {max(p['rss'] for p in per.values()) / MiB:7.1f} "
          f"{status_kib:10.1f} {wr:>16} {gen_rate:9.0f} {total_w:10.0f}  {row['load_before']} -> {row['load_after']}", flush=True)
    for line in prof:
        print("  " + line, flush=True)
    row["profile"] = prof
    return row


# --- idle -------------------------------------------------------------------------------------------


def idle(args, work: Path, results: dict) -> None:
    results["idle"] = {}
    for store in args.idle_stores:
        results["idle"][store] = idle_one(args, work, store)


def idle_one(args, work: Path, store: str) -> dict:
    timing = args.idle_timing or "default timing"
    print(f"\n== idle: one agent owning 100 groups, {timing}, {store} store; window {args.idle_window:g}s; "
          f"load {load()}", flush=True)
    etcd = shared_etcd(args, work) if store == "etcd" else None
    prefix = "/scale-idle"
    # Metrics on, as a node runs by default (/metrics is not scraped during the window).
    c = cluster(work / f"idle-{store}", groups_toml(100, nodes=("n1",)), nodes=("n1",), metrics=True,
                store=etcd.url if etcd else None,
                extra=(f'etcd_prefix = "{prefix}"\n' if etcd else "") + timing_toml(args.idle_timing))
    ino = None
    try:
        c.start()
        wait_running(c, 100, 90)
        time.sleep(args.settle + 3)
        agent = c.nodes["n1"].agent_pid
        keeper = keeper_of(agent)
        if etcd is None:
            ino = Inotify(c.store, {"n1"})
            ino.start()
        w0 = etcd_agent_puts(etcd.endpoint(0), prefix, ("n1",)) if etcd else 0.0
        a0, k0, t0, l0 = cpu_seconds(agent), cpu_seconds(keeper) if keeper else 0.0, time.monotonic(), load()
        time.sleep(args.idle_window)
        el = time.monotonic() - t0
        a1, k1 = cpu_seconds(agent), cpu_seconds(keeper) if keeper else 0.0
        if ino is not None:
            writes = {k: v / el for k, v in ino.snapshot().items()}
        else:
            writes = {"agents/puts": (etcd_agent_puts(etcd.endpoint(0), prefix, ("n1",)) - w0) / el}
        row = {
            "store": store, "timing": timing, "agent_cpu": (a1 - a0) / el, "keeper_cpu": (k1 - k0) / el, "agent_rss": rss(agent),
            "keeper_rss": rss(keeper) if keeper else 0, "writes_per_s": writes, "load_before": l0, "load_after": load(), "window": el,
        }
    finally:
        if ino is not None:
            ino.stop()
        crash_all(c)
    cpu_ok, rss_ok = row["agent_cpu"] <= 0.01, row["agent_rss"] <= 60 * MiB
    print(f"  agent : cpu {row['agent_cpu'] * 100:5.2f} % of a core (goal <= 1 %: {'met' if cpu_ok else 'MISSED'}), "
          f"rss {row['agent_rss'] / MiB:5.1f} MiB (goal <= 60 MiB: {'met' if rss_ok else 'MISSED'})")
    print(f"  keeper: cpu {row['keeper_cpu'] * 100:5.2f} % of a core, rss {row['keeper_rss'] / MiB:5.1f} MiB")
    print("  store writes/s: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(row["writes_per_s"].items())))
    print(f"  load {row['load_before']} -> {row['load_after']}", flush=True)
    return row


# --- plan -------------------------------------------------------------------------------------------


def plan_inputs(n_groups: int, n_entries: int, n_nodes: int, view_kind: str):
    import plan_scale  # tests/bench/, beside this script

    from reconciler.decide import placement
    from reconciler.observe import EntryState, Observed
    from reconciler.published import GroupStatus, NodeStatus
    from reconciler.spec import Cluster, Spec
    from reconciler.store import Claim, ClusterView, Heartbeat, Member

    now = 10_000.0
    me = "node000"
    nodes = [f"node{i:03d}" for i in range(n_nodes)]
    groups = plan_scale.make_groups(n_groups, n_entries)  # the same spec as tests/bench/plan_scale.py
    spec = Spec(cluster=Cluster(), groups=groups)
    status = NodeStatus(eligible_groups=tuple(sorted(groups)), groups={g: GroupStatus(eligible=True) for g in groups})
    members = {n: Member(name=n, last_change=now - 0.05, heartbeat=Heartbeat(node=n, counter=1, status=status))
               for n in nodes if n != me}
    if view_kind == "owner":
        owners = {g: me for g in groups}
    elif view_kind == "spread":
        owners = {g: min(nodes, key=lambda n: placement.rank_key(grp, n)) for g, grp in groups.items()}
    else:
        owners = {}
    claims = {g: Claim(group=g, node=o, generation=1, token="1") for g, o in owners.items()}
    done = {"test": "passed", "wait": "done", "once": "done", "respawn": "running"}
    entries = {}
    for g in groups.values():
        for i, e in enumerate(g.entries):
            if owners.get(g.name) == me:
                state, since = done[e.mode], now - 100 + i
            elif e.mode == "test":
                state, since = "passed", now - 1  # standby: the leading test ran a second ago
            else:
                continue
            entries[(g.name, e.tag)] = EntryState(group=g.name, tag=e.tag, state=state, since=since,
                                                  pid=1000 + i if state == "running" else None)
    view = ClusterView(node=me, members=members, claims=claims, lease_until=now + 0.3,
                       unclaimed_since={g: now - 0.01 for g in groups if g not in claims})
    return spec, Observed(node=me, entries=entries), view, now


def plan_bench(args, work: Path, results: dict) -> None:
    from reconciler.decide.plan import plan

    print(f"\n== plan: G groups x 10 entries, 100 live members, median of {args.plan_runs} calls; load {load()}", flush=True)
    sizes = args.plan_sizes
    rows = {}
    for kind, label in (("owner", "this node owns every group"), ("spread", "claims spread over 100 nodes"),
                        ("cold", "nothing claimed yet")):
        times = []
        actions = []
        for g in sizes:
            spec, obs, view, now = plan_inputs(g, 10, 100, kind)
            p = plan(spec, obs, view, now)  # warm up
            actions.append(len(p.actions))
            runs = []
            for _ in range(args.plan_runs):
                t = time.perf_counter()
                plan(spec, obs, view, now)
                runs.append(time.perf_counter() - t)
            times.append(statistics.median(runs))
        xs, ys = [math.log(g) for g in sizes], [math.log(t) for t in times]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        at = dict(zip(sizes, times))
        rows[kind] = {"sizes": sizes, "median_s": times, "actions": actions, "exponent": k}
        cells = "  ".join(f"{g}: {t * 1000:6.2f} ms" for g, t in zip(sizes, times))
        goal = ""
        if 1000 in at:
            goal = f"  goal <= 20 ms at 1000: {'met' if at[1000] <= 0.020 else 'MISSED'}"
        print(f"  {label:<30} {cells}  exponent {k:4.2f}{goal}  (actions: {actions})", flush=True)
    print(f"  load after: {load()}")
    results["plan"] = rows


# --- spec edit -> converged ----------------------------------------------------------------------------

EDIT_GROUP = """
[groups.edit]
runlevel = "a"
nodes = ["n1", "n2", "n3"]

[[groups.edit.entries]]
tag = "edit-a"
runlevels = ["a"]
command = ["sleep", "3601"]
stop_timeout = "2s"

[[groups.edit.entries]]
tag = "edit-b"
runlevels = ["b"]
command = ["sleep", "3602"]
stop_timeout = "2s"
"""


def cold_bench(args, work: Path, results: dict) -> None:
    n = args.cold_groups
    print(f"\n== cold start: one agent, {n} groups, dir store, default timing, {args.cold_runs} runs; load {load()}", flush=True)
    runs = []
    for i in range(args.cold_runs):
        c = cluster(work / f"cold-{i}", groups_toml(n, nodes=("n1",)), nodes=("n1",), metrics=False)
        try:
            c.start()
            took = wait_running(c, n, args.converge_max)
            runs.append({"seconds": took, "agent_cpu_s": cpu_seconds(c.nodes["n1"].agent_pid)})
        finally:
            crash_all(c)
        print(f"  run {i + 1}: every process running after {took:.1f} s, agent CPU {runs[-1]['agent_cpu_s']:.1f} s", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "agent_cpu_s")}
    print(f"  median: {med['seconds']:.1f} s, agent CPU {med['agent_cpu_s']:.1f} s; load {load()}", flush=True)
    results["cold"] = {"groups": n, "runs": runs, "median": med}


def edit_bench(args, work: Path, results: dict) -> None:
    from reconciler.spec import edit

    print(f"\n== spec edit -> converged: 3 agents, dir store, {args.edit_background} background groups, "
          f"{args.edits} edits; load {load()}", flush=True)
    c = cluster(work / "edit", "", metrics=False)
    c.write("background.toml", groups_toml(args.edit_background, prefix="bg"))
    c.write("edit.toml", EDIT_GROUP)
    cmds = {"a": ["sleep", "3601"], "b": ["sleep", "3602"]}
    samples, tells = [], []
    try:
        c.start()
        wait_running(c, args.edit_background, 90)

        def tree(pid: int) -> list[list[str]]:
            return [cmdline(p) for p in children(pid)]

        owner_pid = c.nodes["n1"].agent_pid
        deadline = time.monotonic() + 30
        while cmds["a"] not in tree(owner_pid):
            if time.monotonic() > deadline:
                raise RuntimeError("the edit group never started on n1")
            time.sleep(0.05)
        time.sleep(args.settle)
        level = "a"
        l0 = load()
        for i in range(args.edits):
            new = "b" if level == "a" else "a"
            t0 = time.monotonic()
            edit.tell(str(c.spec_dir), "edit", new)
            t_told = time.monotonic()
            while True:
                cl = tree(owner_pid)
                if cmds[new] in cl and cmds[level] not in cl:
                    break
                if time.monotonic() - t0 > 15:
                    raise RuntimeError(f"edit {i}: not converged after 15 s")
                time.sleep(0.002)
            samples.append(time.monotonic() - t0)
            tells.append(t_told - t0)
            level = new
            time.sleep(args.edit_pause)
    finally:
        crash_all(c)
    p50 = statistics.median(samples)
    row = {"p50": p50, "p90": pct(samples, 0.9), "max": max(samples), "min": min(samples), "n": len(samples),
           "tell_p50": statistics.median(tells), "load_before": l0, "load_after": load()}
    print(f"  n={row['n']}  p50 {p50 * 1000:.0f} ms  p90 {row['p90'] * 1000:.0f} ms  min {row['min'] * 1000:.0f} ms  "
          f"max {row['max'] * 1000:.0f} ms  (of which tell() itself: p50 {row['tell_p50'] * 1000:.0f} ms)  "
          f"goal p50 <= 300 ms: {'met' if p50 <= 0.3 else 'MISSED'}")
    print(f"  load {row['load_before']} -> {row['load_after']}", flush=True)
    results["edit"] = row


# --- main -------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        ap = argparse.ArgumentParser()
        for a in ("--url", "--prefix", "--digest", "--stats"):
            ap.add_argument(a, required=True)
        ap.add_argument("--members", type=int, required=True)
        ap.add_argument("--interval", type=float, required=True)
        ap.add_argument("--lease", type=float, default=0.4)
        ap.add_argument("--mode", choices=("batch", "publish"), default="batch")
        a = ap.parse_args(sys.argv[2:])
        fn = generate_batch if a.mode == "batch" else generate
        asyncio.run(fn(a.url, a.prefix, a.members, a.interval, a.digest, a.stats, a.lease))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small matrix and short windows (about 2-3 minutes)")
    ap.add_argument("--only", default="matrix,idle,plan,edit", help="sections to run")
    ap.add_argument("--stores", default="dir,etcd")
    ap.add_argument("--groups", default="10,100,1000", help="matrix: group counts")
    ap.add_argument("--members", default="10,100,1000", help="matrix: synthetic member counts")
    ap.add_argument("--window", type=float, default=10.0, help="matrix: measurement window (s)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each window")
    ap.add_argument("--settle-max", type=float, default=15.0, help="at most this long for the members to look alive")
    ap.add_argument("--etcd-members", type=int, default=1)
    ap.add_argument("--relaxed-from", type=int, default=1000,
                    help="matrix: G >= this runs at heartbeat 250ms, lease 2s, dead_after 2.8s (marked *)")
    ap.add_argument("--converge-max", type=float, default=120.0, help="matrix: seconds for all groups to run")
    ap.add_argument("--generator", choices=("batch", "publish"), default="batch",
                    help="synthetic members: rounds of writes (default) or one publish() call per member and heartbeat")
    ap.add_argument("--idle-window", type=float, default=30.0)
    ap.add_argument("--idle-stores", default="dir,etcd")
    ap.add_argument("--idle-timing", default="", help='idle: override [cluster.timing], e.g. "heartbeat=250ms"')
    ap.add_argument("--plan-sizes", default="250,500,1000,2000")
    ap.add_argument("--plan-runs", type=int, default=15)
    ap.add_argument("--cold-groups", type=int, default=1000)
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument("--edits", type=int, default=50)
    ap.add_argument("--edit-background", type=int, default=100)
    ap.add_argument("--edit-pause", type=float, default=0.2, help="seconds between edits")
    ap.add_argument("--profile", action="store_true", help="py-spy the worst matrix configuration's agent n1")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.groups, args.members, args.window, args.idle_window = "10,100", "10,100", 5.0, 10.0
        args.plan_sizes, args.plan_runs, args.edits = "250,500,1000", 7, 20
    args.stores = [s for s in args.stores.split(",") if s]
    args.idle_stores = [s for s in args.idle_stores.split(",") if s]
    args.groups = [int(x) for x in args.groups.split(",")]
    args.members = [int(x) for x in args.members.split(",")]
    args.plan_sizes = [int(x) for x in args.plan_sizes.split(",")]
    sections = [s for s in args.only.split(",") if s]
    needs_root = any(s in sections for s in ("matrix", "idle", "edit", "cold"))
    if needs_root and os.geteuid() != 0:
        print("scale.py: needs root (unshare)", file=sys.stderr)
        return 2
    if shutil.which("etcd") is None and ("etcd" in args.stores or "etcd" in args.idle_stores):
        print("scale.py: no etcd on PATH: running the matrix on the directory store only", file=sys.stderr)
        args.stores = [s for s in args.stores if s != "etcd"]
        args.idle_stores = [s for s in args.idle_stores if s != "etcd"]
    main_pid = os.getpid()

    def on_term(*_):
        if os.getpid() != main_pid:
            os._exit(1)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    os.chmod(work, 0o755)
    results: dict = {}
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.splitlines()
    print(f"scale: {os.cpu_count()} CPUs; {mem[1].split()[1] if len(mem) > 1 else '?'} memory; python {sys.version.split()[0]}; "
          f"date {datetime.datetime.now().isoformat(timespec='seconds')}; load {load()}; sections {','.join(sections)}", flush=True)
    started = time.monotonic()
    try:
        for s in sections:
            {"matrix": matrix, "idle": idle, "plan": plan_bench, "edit": edit_bench, "cold": cold_bench}[s](args, work, results)
    finally:
        if "cluster" in _ETCD:
            _ETCD.pop("cluster").stop()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
