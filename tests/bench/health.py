#!/usr/bin/env python3
"""Health benchmarks (issue 16), figures in docs/performance.md.

    python3 tests/bench/health.py detect [--trials 20]     # SIGSTOP of a probed HTTP server -> a new one answers
    python3 tests/bench/health.py idle [--window 30]       # an idle agent owning 100 probed groups: CPU and RSS
    python3 tests/bench/health.py address [--trials 30]    # an address deleted behind the agent's back -> back (root, ip)

detect: one agent (`reconcile run`, directory store) runs one group whose entry is a small
HTTP server under an http probe (interval 500ms, timeout 200ms, failures 3: goal at p99 <=
interval x failures + timeout + 100 ms = 1.8 s). Each trial waits until the server answers and
the probe is healthy, waits a random part of an interval (any phase of the probe cycle), SIGSTOPs it, then GETs every 5 ms until a server with another pid
answers. The server is `python3 -S` with the socket module only (it starts in ~20 ms).

idle: one agent owning 100 groups, each one `sleep` entry with a probe every 2 s, half tcp and
half http, against one helper process serving 100 ports (outside the agent: its CPU is not
counted). After everything runs and a settling period, the agent's CPU time over the window
(psutil; 100 % = one core) and its RSS; goal <= 1.5 % and <= 60 MiB. Printed too: the same
agent with no probes, for the difference.

address: one agent in a network namespace of its own keeps 192.0.2.10/24 on a veth, with
tick = 30s (so only the kernel event can bring it back soon). A helper in that namespace
deletes the address and times, from a netlink socket subscribed to address events, until it
is added again; goal p50 <= 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import random

import psutil

HTTP_SERVER = r"""
import os, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
reply = ("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%d" % (len(str(os.getpid())), os.getpid())).encode()
while True:
    c, _ = s.accept()
    try:
        c.recv(4096); c.sendall(reply)
    except OSError:
        pass
    c.close()
"""

MANY_SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(port))); s.listen(64); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            c, _ = key.fileobj.accept()
        except OSError:
            continue
        c.settimeout(0.2)
        try:
            c.recv(4096); c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        c.close()
"""

CLUSTER = """\
[cluster]
name = "bench"
store = "dir:store"
state_dir = "state"
{timing}
"""


# A node name of its own: the agent's cgroup subtree (reconciler-NODE) and its keeper are
# per node name, and another run under the same name on this machine must not meet ours.
NODE = f"hbench{os.getpid()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def write_spec(root: Path, text: str) -> Path:
    spec = root / "spec"
    spec.mkdir(mode=0o755, exist_ok=True)
    os.chmod(root, 0o755)
    (spec / "spec.toml").write_text(text)
    os.chmod(spec / "spec.toml", 0o644)
    return spec


def start_agent(root: Path, spec: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    reconcile = shutil.which("reconcile")
    assert reconcile, "needs `reconcile` on PATH (pip install -e .)"
    log = open(root / "agent.log", "ab")
    return subprocess.Popen([*prefix, reconcile, "run", "--spec", str(spec), "--node", NODE, "--metrics-address", "off"],
                            cwd=spec, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(p: subprocess.Popen, root: Path) -> None:
    """Stop the agent, then wait for its keeper to see the released lease and exit (before the
    temporary directory goes: a keeper whose lease file vanished keeps guarding for ever)."""
    keeper = None
    try:
        keeper = int((root / "spec" / "state" / NODE / "keeper.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if keeper is not None:
        try:
            psutil.Process(keeper).wait(10)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            os.kill(keeper, signal.SIGKILL)


def get_pid(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.05) as r:
            return int(r.read())
    except Exception:
        return None


def healthy(root: Path) -> bool:
    try:
        doc = json.loads((root / "spec" / "store" / "status" / f"{NODE}.json").read_text())
        return doc["groups"]["web"]["entries"]["srv"].get("health") == "ok"
    except (OSError, ValueError, KeyError):
        return False


def wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def detect(trials: int) -> None:
    interval, timeout, failures = 0.5, 0.2, 3
    goal = interval * failures + timeout + 0.1
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-health-") as d:
        root = Path(d)
        (root / "server.py").write_text(HTTP_SERVER)
        spec = write_spec(root, CLUSTER.format(timing="") + f"""
[groups.web]
runlevel = "run"
[[groups.web.entries]]
tag = "srv"
runlevels = ["run"]
stop_timeout = "1s"
command = ["{sys.executable}", "-S", "{root / 'server.py'}", "{port}"]
health = {{ http = "http://127.0.0.1:{port}/", interval = "{interval}s", timeout = "{timeout * 1000:.0f}ms", failures = {failures} }}
""")
        agent = start_agent(root, spec)
        times = []
        try:
            wait(lambda: get_pid(port) or agent.poll() is not None, 20, "the server")
            if agent.poll() is not None or get_pid(port) is None:
                raise SystemExit((root / "agent.log").read_text()[-3000:])
            print(open(root / "spec" / "store" / "status" / f"{NODE}.json").read()[:800]) if os.environ.get("BENCH_DEBUG") else None
            for i in range(trials):
                old = wait(lambda: get_pid(port), 20, "the server")
                wait(lambda: healthy(root) and get_pid(port) == old, 20, "a healthy probe")
                time.sleep(random.uniform(0, interval) + 0.3)  # any phase of the probe cycle
                os.kill(old, signal.SIGSTOP)
                t0 = time.monotonic()
                wait(lambda: (p := get_pid(port)) is not None and p != old, 20, "a new server")
                times.append(time.monotonic() - t0)
                print(f"trial {i + 1}: {times[-1] * 1000:.0f} ms", flush=True)
        finally:
            stop(agent, root)
    print(f"detect ({trials} trials, interval {interval}s, timeout {timeout}s, failures {failures}):"
          f" p50 {statistics.median(times) * 1000:.0f} ms, p99 {pct(times, 99) * 1000:.0f} ms,"
          f" min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms; goal p99 <= {goal * 1000:.0f} ms:"
          f" {'met' if pct(times, 99) <= goal else 'MISSED'}")


def idle(window: float, groups: int = 100, settle: float = 10.0) -> None:
    ports = [free_port() for _ in range(groups)]
    helper = subprocess.Popen([sys.executable, "-S", "-c", MANY_SERVER, *map(str, ports)], stdout=subprocess.PIPE, text=True)
    assert helper.stdout is not None and helper.stdout.readline().strip() == "ready"
    try:
        for probed in (True, False):
            with tempfile.TemporaryDirectory(prefix="bench-health-") as d:
                root = Path(d)
                text = CLUSTER.format(timing="")
                for i, port in enumerate(ports):
                    probe = ""
                    if probed:
                        target = f'tcp = "127.0.0.1:{port}"' if i % 2 else f'http = "http://127.0.0.1:{port}/"'
                        probe = f"health = {{ {target}, interval = \"2s\", timeout = \"1s\" }}\n"
                    text += f"""
[groups.g{i:03d}]
runlevel = "run"
[[groups.g{i:03d}.entries]]
tag = "g{i:03d}-svc"
runlevels = ["run"]
command = ["sleep", "86400"]
{probe}"""
                spec = write_spec(root, text)
                agent = start_agent(root, spec)
                try:
                    def all_ok() -> bool:
                        try:
                            doc = json.loads((root / "spec" / "store" / "status" / f"{NODE}.json").read_text())
                        except (OSError, ValueError):
                            return False
                        gs = doc["groups"]
                        return len(gs) == groups and all(
                            g["entries"] and all(e.get("state") == "running" and (e.get("health") == "ok" or not probed)
                                                 for e in g["entries"].values()) for g in gs.values())
                    wait(all_ok, 120, "every group running (and healthy)")
                    time.sleep(settle)
                    p = psutil.Process(agent.pid)
                    t = p.cpu_times()
                    c0, w0 = t.user + t.system, time.monotonic()
                    time.sleep(window)
                    t = p.cpu_times()
                    cpu = (t.user + t.system - c0) / (time.monotonic() - w0) * 100
                    rss = p.memory_info().rss / 2**20
                    label = f"{groups} groups, a probe each every 2s (half tcp, half http)" if probed else f"{groups} groups, no probes"
                    goal = " goal <= 1.5 % and <= 60 MiB: " + ("met" if cpu <= 1.5 and rss <= 60 else "MISSED") if probed else ""
                    print(f"idle, {label}: agent CPU {cpu:.2f} % of a core over {window:.0f}s, RSS {rss:.1f} MiB;{goal}", flush=True)
                finally:
                    stop(agent, root)
    finally:
        helper.kill()
        helper.wait()


ADDR_TRIALS = r"""
import socket, struct, subprocess, sys, time
trials = int(sys.argv[1])
RTMGRP_IPV4_IFADDR, RTM_NEWADDR = 0x10, 20
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, RTMGRP_IPV4_IFADDR))
def present():
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "ha0"], capture_output=True, text=True).stdout
    return "192.0.2.10/24" in out
end = time.monotonic() + 20
while not present():
    if time.monotonic() > end: sys.exit("the address never appeared")
    time.sleep(0.05)
for i in range(trials):
    time.sleep(0.3)
    s.setblocking(False)
    try:
        while s.recv(65536): pass
    except BlockingIOError:
        pass
    s.setblocking(True)
    t0 = time.monotonic()
    subprocess.run(["ip", "addr", "del", "192.0.2.10/24", "dev", "ha0"], check=True)
    t_del = time.monotonic()  # (the deletion is done when `ip` returns)
    s.settimeout(5)
    while True:
        data = s.recv(65536)
        off, found = 0, False
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("IH", data, off)
            if kind == RTM_NEWADDR:
                found = True
            off += (length + 3) & ~3
        if found and present():
            break
    print(f"{(time.monotonic() - t_del) * 1000:.2f}", flush=True)
"""


def address(trials: int) -> None:
    ns = f"rbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "ha0", "type", "veth", "peer", "name", "ha1"], check=True)
        for dev in ("lo", "ha0", "ha1"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        with tempfile.TemporaryDirectory(prefix="bench-health-") as d:
            root = Path(d)
            spec = write_spec(root, CLUSTER.format(timing='[cluster.timing]\ntick = "30s"') + """
[groups.vip]
runlevel = "run"
[[groups.vip.entries]]
tag = "vip-addr"
runlevels = ["run"]
address = { ip = "192.0.2.10/24", interface = "ha0", announce = false }
""")
            agent = start_agent(root, spec, prefix=("ip", "netns", "exec", ns))
            try:
                out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ADDR_TRIALS, str(trials)],
                                     capture_output=True, text=True, timeout=120)
                if out.returncode:
                    raise SystemExit(out.stderr)
                times = [float(x) / 1000 for x in out.stdout.split()]
            finally:
                stop(agent, root)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print(f"address restore ({len(times)} trials, tick 30s): p50 {statistics.median(times) * 1000:.1f} ms,"
          f" p99 {pct(times, 99) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms; goal p50 <= 50 ms:"
          f" {'met' if statistics.median(times) <= 0.05 else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("detect", "idle", "address"))
    ap.add_argument("--trials", type=int, default=0)
    ap.add_argument("--window", type=float, default=30.0)
    args = ap.parse_args()
    if args.what == "detect":
        detect(args.trials or 20)
    elif args.what == "idle":
        idle(args.window)
    else:
        address(args.trials or 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
