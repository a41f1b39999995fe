"""docs/tutorial.md and specs/examples/, run: so that neither can rot.

The tutorial marks each command block in its source, just above the block:
`<!-- run: NAME on NODE[,NODE...] [background] -->` (the test runs it on those nodes; a
`background` block is a foreground program the reader starts in a terminal of its own), or
`<!-- not run: why -->`. Every `sh` block carries one of the two, and every block marked
`run` is run by test_tutorial_runs, in the tutorial's order (a unit test checks both).

The three "machines" are network namespaces on one bridge (tests/netns.py), with the
tutorial's addresses, 192.0.2.11-13 on eth0. Each runs a small init as PID 1 of its own pid,
mount and UTS namespaces: hostname nodeN, and the machine's own disk bind-mounted at the
paths the tutorial uses (/etc/reconciler, /var/lib/reconciler, /var/lib/etcd, /srv,
/usr/local/sbin), each a directory under the test's tmp_path. So the blocks run as written,
with no path, port or address replaced; the test provides what the tutorial takes from the
hardware: the shared disk (a loop device labelled webdb-data that every namespace sees) and
`reconcile` on the PATH (this checkout's, instead of part 1's installation).

What the tutorial shows as output is an illustration (digests, times and pids differ); the
test checks the facts its prose states: exit statuses, what the services answer, who owns
each group (read from etcd) and where the addresses are.

(Over ~400 lines: the machines' set-up and the walk through the tutorial's steps belong
together; the step list must match the page, which one unit test checks.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
EXAMPLES = ROOT / "specs" / "examples"
ADDRESSES = {"node1": "192.0.2.11", "node2": "192.0.2.12", "node3": "192.0.2.13"}
# Where each machine's own disk is mounted (created on the host, empty, when missing).
DISK_PATHS = ("/etc/reconciler", "/var/lib/reconciler", "/var/lib/etcd", "/srv", "/usr/local/sbin")
LABEL = "webdb-data"

_MARK = re.compile(r"^<!-- (run|not run): ([^\n]*?) -->\n```(\w*)\n(.*?)\n```", re.S | re.M)
_FENCE = re.compile(r"^```(\w*)\n(.*?)\n```", re.S | re.M)
_RUN = re.compile(r"^(?P<name>[\w-]+) on (?P<nodes>[\w,]+)(?P<bg> background)?$")


class Block:
    def __init__(self, name: str, *, nodes: list[str], background: bool, code: str):
        self.name, self.nodes, self.background, self.code = name, nodes, background, code


def tutorial_blocks(text: str) -> list[Block]:
    """The blocks marked `run`, in order; a malformed marker is an error naming it."""
    out = []
    for kind, what, _lang, code in _MARK.findall(text):
        if kind != "run":
            continue
        m = _RUN.match(what)
        assert m, f"docs/tutorial.md: bad marker 'run: {what}' (NAME on NODE[,NODE] [background])"
        nodes = m["nodes"].split(",")
        assert set(nodes) <= set(ADDRESSES), f"docs/tutorial.md: {what}: unknown node"
        out.append(Block(m["name"], nodes=nodes, background=bool(m["bg"]), code=code))
    return out


# --- unit tests: the markers, the imported cltab --------------------------------------------


def test_every_command_block_of_the_tutorial_is_marked():
    text = TUTORIAL.read_text()
    shell = [code for lang, code in _FENCE.findall(text) if lang == "sh"]
    marked = [code for _kind, _what, lang, code in _MARK.findall(text) if lang == "sh"]
    assert shell and shell == marked, "every ```sh block of docs/tutorial.md needs <!-- run: ... --> or <!-- not run: why --> above it"
    names = [b.name for b in tutorial_blocks(text)]
    assert len(names) == len(set(names)), names
    assert names == list(STEPS), "test_tutorial_runs must run exactly the tutorial's marked blocks, in its order"


def test_imported_cltab_is_what_reconcile_import_makes_today():
    src = EXAMPLES / "openmosix"
    out = subprocess.run([sys.executable, "-m", "reconciler.cli", "import", "cltab", "hactl"], cwd=src,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (src / "cltab.toml").read_text(), \
        "specs/examples/openmosix/cltab.toml is stale: cd specs/examples/openmosix && reconcile import cltab hactl > cltab.toml"


# --- check on every example ----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.needs("root", "unshare")
def test_check_accepts_every_example(tmp_path):
    """`reconcile check` on each directory of specs/examples/, with the fence hook the
    webdb example names installed (in a mount namespace of its own: the host is untouched)."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "fence-node").symlink_to(ROOT / "contrib" / "fence" / "fence-test")
    specs = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())
    assert {p.name for p in specs} >= {"webdb", "openmosix"}
    toml = {p.parent for p in EXAMPLES.rglob("*.toml")}
    assert toml <= set(specs), f"a .toml outside the example directories: {toml - set(specs)}"
    for spec in specs:
        out = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$1" /usr/local/sbin && exec "$2" -m reconciler.cli check --spec "$3"',
             "sh", str(sbin), sys.executable, str(spec)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert out.returncode == 0 and out.stderr == "", f"{spec}: {out.stdout}{out.stderr}"
        assert f"spec {spec}:" in out.stdout


# --- the machines ---------------------------------------------------------------------------

# PID 1 of a machine: its hostname, its disk mounted, then reap orphans for ever (the keeper
# outlives a killed agent and is re-parented here).
INIT = """
import os, socket, subprocess, sys, time
name, ready, *pairs = sys.argv[1:]
socket.sethostname(name)
for src, dst in zip(pairs[::2], pairs[1::2]):
    subprocess.run(["mount", "--bind", src, dst], check=True)
open(ready, "w").close()
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.1)
"""


class Machine:
    def __init__(self, root: Path, name: str, *, netns: str, cgroup: str | None, shared: dict[str, Path]):
        self.name, self.netns = name, netns
        self.dir = root / name
        self.cgroup = None
        if cgroup is not None:
            self.cgroup = os.path.join(cgroup, name)
            os.makedirs(self.cgroup, exist_ok=True)
        pairs = []
        for path in DISK_PATHS:
            own = self.dir / path.strip("/").replace("/", "-")
            own.mkdir(parents=True, mode=0o755)
            os.chmod(own, 0o755)
            pairs += [str(own), path]
        for path, src in shared.items():  # what every machine sees alike
            pairs += [str(src), path]
        ready = self.dir / "ready"
        self.proc = subprocess.Popen(
            self._in_cgroup(["ip", "netns", "exec", netns, "unshare", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child",
                             sys.executable, "-c", INIT, name, str(ready), *pairs]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.dir / "init.log", "wb"),
            start_new_session=True,
        )
        wait_until(ready.exists, 10, what=f"{name} up")
        self.init = psutil.Process(self.proc.pid).children()[0].pid
        self.background: dict[str, subprocess.Popen] = {}

    def _in_cgroup(self, argv: list[str]) -> list[str]:
        """`argv` started in this machine's cgroup: joined by a shell that then execs it, as
        tests/cluster.py does. Not with preexec_fn: Python code between fork and exec in a
        process that has loaded grpc (earlier etcd tests) can abort the child in grpc's fork
        handlers."""
        if self.cgroup is None:
            return argv
        procs = os.path.join(self.cgroup, "cgroup.procs")
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

    def _argv(self, code: str) -> list[str]:
        return self._in_cgroup(["nsenter", "-t", str(self.init), "-p", "-m", "-u", "-n", f"--wd={ROOT}", "--", "bash", "-ec", code])

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env

    def run(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(code), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=self._env())

    def run_until(self, code: str, cond, *, timeout: float = 30, what: str = "") -> subprocess.CompletedProcess:
        """Run `code` again until cond(result) holds (a reader repeating a command until it
        shows what the tutorial says)."""
        last: list[subprocess.CompletedProcess] = []

        def attempt():
            last[:] = [self.run(code)]
            return cond(last[0])

        try:
            wait_until(attempt, timeout, what=what or code, step=0.2)
        except AssertionError as exc:
            r = last[0] if last else None
            raise AssertionError(f"{exc}\non {self.name}, last result: rc={r and r.returncode}\n{r and r.stdout}{r and r.stderr}") from None
        return last[0]

    def start(self, name: str, code: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        proc = subprocess.Popen(self._argv(code), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=self._env(), start_new_session=True)
        log.close()
        self.background[name] = proc
        return proc

    def interrupt(self, name: str) -> int:
        """Ctrl-C in the block's terminal: SIGINT to the program nsenter runs."""
        proc = self.background[name]
        child = wait_until(lambda: psutil.Process(proc.pid).children(), 5, what=f"{name}'s program")[0]
        os.kill(child.pid, signal.SIGINT)
        return proc.wait(30)

    def has_address(self, ip: str) -> bool:
        out = subprocess.run(["ip", "-n", self.netns, "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True)
        return f" {ip}/" in out.stdout

    def logs(self) -> str:
        return "".join(f"--- {self.name} {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.init, signal.SIGKILL)  # PID 1: the whole machine goes
            except ProcessLookupError:
                pass
            self.proc.wait(15)
        for proc in self.background.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def store(machine: Machine) -> dict:
    """{"claims": {group: [owner, generation]}, "members": {node: counter}} in etcd, read
    through the store backend from inside a machine's network namespace."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import cluster;"
            " print(json.dumps(cluster._read_store(sys.argv[2])))")
    out = subprocess.run(["ip", "netns", "exec", machine.netns, sys.executable, "-c", code, str(Path(__file__).parent),
                          str(machine.dir / "etc-reconciler")], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def claims(machine: Machine) -> dict[str, list]:
    return store(machine)["claims"]


# --- the tutorial ----------------------------------------------------------------------------

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", re.M)

# The tutorial's marked blocks, in order (test_every_command_block_of_the_tutorial_is_marked
# keeps this list and the page in step); test_tutorial_runs says what each must show.
STEPS = ("hello-spec", "hello-dry-run", "hello-agent", "hello-status", "hello-tell", "hello-tell-back", "hello-remove",
         "etcd-node1", "etcd-node2", "etcd-node3", "etcd-health", "webdb-spec", "webdb-site", "webdb-fence",
         "webdb-check", "agent-node1", "agent-node2", "agent-node3", "webdb-status", "webdb-rehearse",
         "web-maint", "web-maint-check", "web-run", "drill-kill", "drill-watch", "drill-return", "drill-after")


@pytest.mark.integration
@pytest.mark.needs("root", "unshare", "nsenter", "ip", "etcd", "loop", "mount", "curl")
def test_tutorial_runs(tmp_path):
    from cluster import cgroup_base, remove_cgroup_tree
    from netns import Topology

    blocks = {b.name: b for b in tutorial_blocks(TUTORIAL.read_text())}
    made = [p for p in (*DISK_PATHS, "/dev/disk") if not os.path.exists(p)]
    for p in made:  # a mount point for the machines' disks; removed again at the end
        os.makedirs(p, mode=0o755)
    image = tmp_path / "shared-disk.img"
    with open(image, "wb") as fh:
        fh.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-L", LABEL, str(image)], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True).stdout.strip()
    # udev's link to the disk by its label, which the agent reads (no udev runs here)
    (tmp_path / "dev-disk" / "by-label").mkdir(parents=True)
    (tmp_path / "dev-disk" / "by-label" / LABEL).symlink_to(loop)
    topo = Topology(f"rtu{os.getpid() % 100000}")
    cgroup = cgroup_base()
    machines: dict[str, Machine] = {}
    try:
        for name, ip in ADDRESSES.items():
            machines[name] = Machine(tmp_path, name, netns=topo.add(name, ip), cgroup=cgroup, shared={"/dev/disk": tmp_path / "dev-disk"})
        _follow(blocks, machines)
    except BaseException:
        print("\n".join(m.logs() for m in machines.values()))
        raise
    finally:
        for m in machines.values():
            m.stop()
        topo.cleanup()
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        if cgroup is not None:
            remove_cgroup_tree(cgroup)
        for p in reversed(made):
            os.rmdir(p)


def _on(blocks: dict[str, Block], name: str, machines: dict[str, Machine]) -> list[tuple[Machine, str]]:
    b = blocks[name]
    return [(machines[n], b.code) for n in b.nodes]


def _one(blocks, name, machines) -> tuple[Machine, str]:
    (pair,) = _on(blocks, name, machines)
    return pair


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    return r


def _follow(blocks: dict[str, Block], machines: dict[str, Machine]) -> None:
    step = lambda name: _one(blocks, name, machines)  # noqa: E731
    node1, node2, node3 = machines["node1"], machines["node2"], machines["node3"]

    # --- part 2: one machine, the directory store
    m, code = step("hello-spec")
    out = _ok(m.run(code)).stdout
    assert "spec /etc/reconciler/: 1 groups" in out and "hello: runlevel run, 3 entries" in out, out
    m, code = step("hello-dry-run")
    out = _ok(m.run(code)).stdout
    assert "start hello/hello-ready" in out and "tests have not passed here yet" in out and "exit status 2" in out, out
    m, code = step("hello-agent")
    m.start("hello-agent", code)
    m, code = step("hello-status")
    out = m.run_until(code, lambda r: r.returncode == 0 and r.stdout.endswith("hello, world\n"), what="hello served").stdout
    assert "node1" in out and "hello-server" in out, out
    m, code = step("hello-tell")
    out = _ok(m.run(code)).stdout
    assert out.splitlines() == ["hello: runlevel maint (revision 2; the agents write it into their files)",
                                'runlevel = "maint"'], out
    m.run_until("curl -s http://127.0.0.1:8000/", lambda r: r.returncode != 0, what="the server stopped at maint")
    m, code = step("hello-tell-back")
    _ok(m.run(code))
    m.run_until("curl -s http://127.0.0.1:8000/", lambda r: r.stdout == "hello, world\n", what="the server back at run")
    assert node1.interrupt("hello-agent") == 0, "the agent exits 0 on Ctrl-C"
    assert node1.run("curl -s http://127.0.0.1:8000/").returncode != 0, "Ctrl-C stopped the group"
    m, code = step("hello-remove")
    _ok(m.run(code))

    # --- part 3: etcd, the spec, the agents
    for n in ("etcd-node1", "etcd-node2", "etcd-node3"):
        m, code = step(n)
        m.start(n, code)
    m, code = step("etcd-health")
    m.run_until(code, lambda r: r.returncode == 0 and (r.stdout + r.stderr).count("is healthy") == 3, what="etcd healthy")  # etcdctl 3.4 writes it to stderr
    for name in ("webdb-spec", "webdb-site", "webdb-fence"):
        for m, code in _on(blocks, name, machines):
            _ok(m.run(code))
    for m, code in _on(blocks, "webdb-check", machines):
        out = _ok(m.run(code)).stdout
        assert "db: runlevel run, 4 entries, on node1, node2" in out, out
    for n in ("agent-node1", "agent-node2", "agent-node3"):
        m, code = step(n)
        m.start(n, code)
    m, code = step("webdb-status")
    out = m.run_until(code, lambda r: r.returncode == 0 and "hello from webdb" in r.stdout and TIMESTAMP.search(r.stdout),
                      what="web and db answer on their addresses").stdout
    created = TIMESTAMP.findall(out)[-1]
    assert "node3" in out, out
    held = claims(node3)
    assert held["db"][0] == "node1" and held["web"][0] == "node2", held
    assert node2.has_address("192.0.2.10") and not node1.has_address("192.0.2.10")
    m, code = step("webdb-rehearse")
    out = _ok(m.run(code)).stdout
    assert "takeover db" in out and "exit status 2" in out, out

    for m, code in _on(blocks, "web-maint", machines):
        assert re.fullmatch(r"web: runlevel maint \(revision \d+; the agents write it into their files\)\n",
                            _ok(m.run(code)).stdout)
    m, code = step("web-maint-check")
    m.run_until(code, lambda r: r.stdout == "down for maintenance\n", what="the maintenance page")
    for m, code in _on(blocks, "web-run", machines):
        _ok(m.run(code))
    node3.run_until("curl -s http://192.0.2.10:8080/", lambda r: r.stdout == "hello from webdb\n", what="the site back")
    assert claims(node3)["web"] == held["web"], "web stayed on node2, same claim"

    # --- part 4: the drill
    m, code = step("drill-kill")
    _ok(m.run(code))
    m, code = step("drill-watch")
    out = m.run_until(code, lambda r: r.returncode == 0 and created in r.stdout and claims(node3)["db"][0] == "node2",
                      timeout=30, what="db moved to node2, with its data").stdout
    assert "node2" in out, out
    assert claims(node3)["db"][1] > held["db"][1], "a new generation"
    assert node2.has_address("192.0.2.20")
    wait_until(lambda: not node1.has_address("192.0.2.20"), 10, what="node1's keeper took its address away")
    assert claims(node3)["web"] == held["web"], "web never moved"
    # (silent for dead_after, or its heartbeat expired in etcd first: fenced either way)
    assert re.search(r"takeover db: owner node1 is (silent for [\d.]+s|gone from the store \(its heartbeat expired\)): fence it",
                     (node2.dir / "agent-node2.log").read_text()), "node2's log has the fenced takeover"
    stale = store(node3)["members"].get("node1")  # the dead agent's last counter, or None once etcd dropped it
    m, code = step("drill-return")
    m.start("drill-return", code)
    m, code = step("drill-after")
    wait_until(lambda: store(node3)["members"].get("node1") not in (None, stale), 30, what="node1's heartbeat back")
    # Time must pass to show that nothing moves back: two dead_after periods (failback = false).
    time.sleep(5.2)
    out = _ok(m.run(code)).stdout
    assert "node1" in out, out
    assert claims(node3)["db"][0] == "node2", "failback = false: db stays on node2"
    assert node2.has_address("192.0.2.20") and not node1.has_address("192.0.2.20")


# --- links between the documents ------------------------------------------------------------

_LINK = re.compile(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", ["tutorial.md", "concepts.md", "faq.md"])
def test_links_between_documents_resolve(doc):
    docs = ROOT / "docs"
    links = _LINK.findall((docs / doc).read_text())
    for target, anchor in links:
        assert (docs / target).exists(), f"docs/{doc}: link to missing {target}"
        if anchor:
            assert anchor in _anchors(docs / target), f"docs/{doc}: no heading #{anchor} in {target}"
