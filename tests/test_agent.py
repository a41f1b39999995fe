"""Integration tests with real processes: the agent runs as `reconcile run` in a subprocess.

Every test writes its spec into tmp_path (files 0644, directory 0755, store and state_dir
under tmp_path), starts the agent, and polls what the agent writes (its state file
STATE/n1/processes.json and its published status STORE/status/n1.json) and the files the
test's commands write. The `agents` fixture always SIGTERMs, then SIGKILLs, every agent it
started and kills whatever process carries the test's marker in its environment (children
inherit the agent's environment), keeper included.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from reconciler.host import leaserecord
from reconciler.host import procfs

from helpers import READ_ERRORS, alive, handles, require, wait_until

NODE = "n1"
MARK = "RECONCILER_TEST_MARK"


# --- helpers ------------------------------------------------------------------------------------


# wait_for(fn, timeout, what): transient read errors (a file being written) count as not yet
wait_for = functools.partial(wait_until, tolerate=READ_ERRORS)


def reconcile(*args: str, check: int | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(["reconcile", *args], capture_output=True, text=True, timeout=30, **kw)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


# Tests other than the keeper's get a lease long enough that a busy machine's scheduling
# delays never let the keeper fire; heartbeats stay fast so status is published promptly.
TEST_TIMING = '[cluster.timing]\nheartbeat = "100ms"\nlease = "2s"\ndead_after = "2500ms"\n'

HEADER = """\
# test spec
[cluster]
name = "test"
store = "dir:../store"       # relative: resolves against the spec's directory
state_dir = "../state"
{timing}
"""


class Env:
    """One test's directories and spec."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.spec_dir = tmp_path / "spec"
        self.spec_dir.mkdir()
        os.chmod(self.spec_dir, 0o755)
        self.spec_file = self.spec_dir / "spec.toml"
        self.w = tmp_path / "w"  # where commands leave their traces
        self.w.mkdir()
        self.state = tmp_path / "state" / NODE
        self.store = tmp_path / "store"
        self.mark = uuid.uuid4().hex

    def write(self, body: str, *, timing: str | None = None, raw: str | None = None) -> None:
        """Replace the spec atomically (as editors and `reconcile tell` do). `timing` is the
        [cluster.timing] table: TEST_TIMING unless given ("" = the defaults)."""
        timing = TEST_TIMING if timing is None else timing
        text = raw if raw is not None else HEADER.format(timing=timing) + body.replace("{w}", str(self.w))
        tmp = self.spec_dir / ".spec.toml.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.spec_file)

    def records(self) -> dict:
        data = json.loads((self.state / "processes.json").read_text())
        return {r["tag"]: r for r in data["records"]}

    def record(self, tag: str) -> dict:
        return self.records().get(tag, {})

    def running(self, tag: str) -> int | None:
        """The pid of a running entry (per the agent's state file) that really is alive."""
        r = self.record(tag)
        if r.get("state") == "running" and alive(r.get("pid")):
            return r["pid"]
        return None

    def status(self) -> dict:
        return json.loads((self.store / "status" / f"{NODE}.json").read_text())

    def entry_status(self, group: str, tag: str) -> dict:
        return self.status()["groups"][group]["entries"][tag]

    def marked(self, argv: str = "") -> list[psutil.Process]:
        """Live processes started under this test (by their environment marker), optionally
        only those whose command line is exactly `argv` (split on spaces)."""
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.environ().get(MARK) == self.mark and (not argv or p.info["cmdline"] == argv.split()):
                    if p.status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
            except psutil.Error:
                pass
        return out

    def file(self, name: str) -> Path:
        return self.w / name


class Agent:
    def __init__(self, env: Env, *extra: str):
        self.env = env
        self.log_path = env.root / f"agent-{uuid.uuid4().hex[:6]}.log"
        self.log = open(self.log_path, "w")
        environ = {**os.environ, MARK: env.mark}
        environ.pop("RECONCILER_SPEC", None)
        self.proc = subprocess.Popen(
            ["reconcile", "run", "--spec", str(env.spec_dir), "--node", NODE, "--metrics-address", "off", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text()

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def env(tmp_path):
    require("reconcile")  # the console script, as an operator runs it
    return Env(tmp_path)


@pytest.fixture
def agents(env):
    """start(*args) -> Agent. Teardown: SIGTERM, then SIGKILL, then kill every marked process."""
    started: list[Agent] = []

    def start(*extra: str) -> Agent:
        a = Agent(env, *extra)
        started.append(a)
        return a

    yield start
    for a in started:
        a.signal(signal.SIGTERM)
    for a in started:
        try:
            a.wait(8)
        except subprocess.TimeoutExpired:
            a.signal(signal.SIGKILL)
            a.wait(5)
        a.log.close()
    for p in env.marked():
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            p.kill()
        except psutil.Error:
            pass


def started_order(env: Env, tags: list[str]) -> list[str]:
    recs = env.records()
    return sorted(tags, key=lambda t: recs[t]["started"])


def entry(tag: str, mode: str, command: str | list[str], runlevels=("run",), extra: str = "", group: str = "g") -> str:
    """One entry; a str command runs through /bin/sh -c, a list is an argv."""
    levels = ", ".join(f'"{lvl}"' for lvl in runlevels)
    cmd = json.dumps(command) if isinstance(command, list) else f"'{command}'"
    return f"""
[[groups.{group}.entries]]
tag = "{tag}"
mode = "{mode}"
runlevels = [{levels}]
command = {cmd}
{extra}
"""


def group(name: str, runlevel: str = "run") -> str:
    return f'\n[groups.{name}]\nrunlevel = "{runlevel}"\n'


# A process that logs its start, and its stop when it gets SIGTERM (then exits 0).
def traced(w: str = "{w}") -> str:
    return (
        f'echo start $RECONCILER_TAG $(date +%s.%N) >> {w}/log; '
        f'trap "echo stop $RECONCILER_TAG \\$(date +%s.%N) >> {w}/log; exit 0" TERM; sleep 100 & wait'
    )


def log_events(env: Env) -> list[str]:
    try:
        lines = env.file("log").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [" ".join(line.split()[:2]) for line in lines]


# --- run modes ------------------------------------------------------------------------------------


@pytest.mark.integration  # starts agents
def test_every_runmode_env_and_logs(env, agents):
    env.write(
        group("g")
        + entry("ready", "test", "test -d {w}")
        + entry("prep", "wait", "sleep 0.5; touch {w}/A")
        + entry(
            "after", "once",
            "test -f {w}/A && touch {w}/B; echo ran >> {w}/once.count; env | grep ^RECONCILER_ | sort > {w}/env; "
            "echo to-stdout; echo to-stderr >&2",
        )
        + entry("server", "respawn", ["sleep", "100"])
        + entry("never", "off", "touch {w}/OFF")
    )
    t0 = time.monotonic()
    agents()
    pid = wait_for(lambda: env.running("server"), 10, "server running")
    # wait blocks later entries: `after` found A, which `prep` made after 0.5 s
    assert env.file("B").exists()
    assert time.monotonic() - t0 >= 0.5
    recs = env.records()
    assert recs["ready"]["state"] == "passed"
    assert recs["prep"]["state"] == "done" and recs["prep"]["exit_code"] == 0
    assert started_order(env, ["ready", "prep", "after", "server"]) == ["ready", "prep", "after", "server"]
    assert recs["prep"]["started"] + 0.5 <= recs["after"]["started"]

    # the environment every child gets, and its output in the per-entry log file
    wait_for(lambda: env.file("env").read_text().count("\n") >= 5, 5, "env file")
    got = dict(line.split("=", 1) for line in env.file("env").read_text().splitlines())
    assert got["RECONCILER_NODE"] == NODE
    assert got["RECONCILER_GROUP"] == "g"
    assert got["RECONCILER_TAG"] == "after"
    assert got["RECONCILER_RUNLEVEL"] == "run"
    assert int(got["RECONCILER_GENERATION"]) >= 1
    log = env.state / "logs" / "g.after.log"
    wait_for(lambda: "to-stderr" in log.read_text(), 5, "log file")
    assert "to-stdout" in log.read_text()

    # respawn: SIGKILL -> a new process at once
    os.kill(pid, signal.SIGKILL)
    t1 = time.monotonic()
    new = wait_for(lambda: (p := env.running("server")) and p != pid and p, 5, "respawned server")
    assert new != pid and time.monotonic() - t1 < 1.0
    assert not alive(pid)
    assert env.record("server")["respawns"] >= 1
    assert len(env.marked("sleep 100")) == 1

    # once ran once, off never ran (a tick later still: the time passing is the test)
    time.sleep(1.2)
    assert env.file("once.count").read_text() == "ran\n"
    assert not env.file("OFF").exists()
    assert "never" not in env.records()
    st = env.status()["groups"]["g"]
    assert st["entries"]["never"]["state"] == "stopped"
    assert st["entries"]["server"]["state"] == "running" and st["entries"]["server"]["pid"] == new


@pytest.mark.integration  # starts agents
def test_failed_test_halts_the_group(env, agents):
    env.write(
        group("g")
        + entry("before", "respawn", "sleep 100")
        + entry("check", "test", "exit 3")
        + entry("late", "respawn", "touch {w}/LATE; sleep 100")
        + group("h")
        + entry("gate", "test", "false", group="h")
        + entry("hsrv", "respawn", "touch {w}/H; sleep 100", group="h")
    )
    agents()
    wait_for(lambda: env.entry_status("g", "check")["state"] == "failed", 10, "check failed")
    wait_for(lambda: env.entry_status("h", "gate")["state"] == "failed", 5, "gate failed")
    assert env.running("before")
    time.sleep(0.8)  # nothing after the failed test starts meanwhile: the time passing is the test
    assert not env.file("LATE").exists() and not env.file("H").exists()
    assert "late" not in env.records() and "hsrv" not in env.records()
    st = env.status()["groups"]
    assert st["g"]["entries"]["check"]["message"] == "test failed: exit 3"
    assert st["g"]["actual"] == "failed"
    assert st["h"]["actual"] == "failed"
    assert st["h"]["eligible"] is False and "a test failed here" in st["h"]["note"]
    assert st["h"]["owner"] is None  # a node whose leading test failed does not own the group


# --- runlevels ---------------------------------------------------------------------------------------


@pytest.mark.integration  # starts agents
def test_minimal_runlevel_transition(env, agents):
    env.write(
        group("g")
        + entry("a", "respawn", traced(), runlevels=("run", "maint"))
        + entry("b", "respawn", traced())
        + entry("c", "respawn", traced())
        + entry("d", "respawn", traced(), runlevels=("maint",))
        + entry("e", "respawn", traced(), runlevels=("maint",))
    )
    agents()
    for tag in "abc":
        wait_for(lambda: env.running(tag), 10, f"{tag} running")
    wait_for(lambda: len(log_events(env)) == 3, 5, "three start lines")
    pid_a = env.running("a")
    assert set(log_events(env)) == {"start a", "start b", "start c"}
    assert started_order(env, list("abc")) == list("abc")

    reconcile("tell", "g", "maint", "--spec", str(env.spec_dir), check=0)
    for tag in "de":
        wait_for(lambda: env.running(tag), 5, f"{tag} running")
    wait_for(lambda: len(log_events(env)) == 7, 5, "seven log lines")
    events = log_events(env)[3:]
    assert events[:2] == ["stop c", "stop b"], events  # reverse file order, before any start
    assert set(events[2:]) == {"start d", "start e"}, events
    assert started_order(env, ["d", "e"]) == ["d", "e"]  # new ones in file order
    assert env.running("a") == pid_a  # listed for both levels: untouched
    assert env.record("b")["state"] == "stopped" and env.record("b")["exit_code"] == 0  # TERM, not KILL
    st = wait_for(lambda: (s := env.status()["groups"]["g"])["actual"] == "maint" and s, 5, "actual maint")
    assert st["desired"] == "maint"

    reconcile("tell", "g", "stop", "--spec", str(env.spec_dir), check=0)
    wait_for(lambda: len(log_events(env)) == 10, 5, "three stop lines")
    assert log_events(env)[7:] == ["stop e", "stop d", "stop a"]
    wait_for(lambda: not env.marked("sleep 100"), 5, "every process gone")


# --- respawn backoff and stop escalation ----------------------------------------------------------------


@pytest.mark.integration  # starts agents
def test_respawn_backoff_grows_and_never_gives_up(env, agents):
    env.write(group("g") + entry("flap", "respawn", "exit 7"))
    agents()
    delays: list[float] = []
    states: set[str] = set()
    retry_in_seen = False
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            doc = env.entry_status("g", "flap")
        except (OSError, ValueError, KeyError):
            time.sleep(0.01)
            continue
        states.add(doc["state"])
        retry_in_seen = retry_in_seen or "retry_in" in doc
        msg = doc.get("message", "")
        if "next try in" in msg:
            d = float(msg.rsplit("next try in ", 1)[1].rstrip("s"))
            if not delays or d != delays[-1]:
                delays.append(d)
        if len(delays) >= 3 and delays[-1] >= 2.0:
            break
        time.sleep(0.01)
    assert states <= {"stopped", "running", "exited"}, states  # never a terminal state
    assert "exited" in states and retry_in_seen
    assert delays == sorted(delays) and len(delays) >= 3 and delays[-1] >= 2.0, delays
    assert env.record("flap")["exit_code"] == 7
    assert env.record("flap")["rapid_exits"] >= 6
    # and it is still being tried
    n = env.record("flap")["respawns"]
    wait_for(lambda: env.record("flap")["respawns"] > n, 6, "another attempt")


@pytest.mark.integration  # starts agents
def test_stop_escalates_to_sigkill(env, agents):
    # The shell survives SIGTERM (its trap only notes the time) and so does every `sleep` it
    # runs next; the stop must end it with SIGKILL stop_timeout after the SIGTERM.
    stubborn = 'trap "date +%s.%N >> {w}/term" TERM; while true; do sleep 0.1; done'
    env.write(group("g") + entry("stubborn", "respawn", stubborn, extra='stop_timeout = "1s"'))
    agents()
    pid = wait_for(lambda: env.running("stubborn"), 10, "stubborn running")
    wait_for(lambda: handles(pid, signal.SIGTERM), 5, "the shell's trap")
    reconcile("tell", "g", "stop", "--spec", str(env.spec_dir), check=0)
    wait_for(lambda: not alive(pid), 10, "stubborn gone")
    gone = time.time()
    term = float(env.file("term").read_text().split()[0])
    assert 0.9 <= gone - term <= 2.0, gone - term
    rec = wait_for(lambda: (r := env.record("stubborn"))["state"] == "stopped" and r, 5, "stopped")
    assert rec["exit_code"] == -signal.SIGKILL
    assert env.file("term").read_text().count("\n") == 1  # one SIGTERM, then SIGKILL
    wait_for(lambda: not env.marked("sleep 0.1"), 5, "the whole process group gone")


@pytest.mark.integration  # starts agents
def test_process_ignoring_sigterm_is_killed(env, agents):
    env.write(group("g") + entry("deaf", "respawn", 'trap "" TERM; sleep 100', extra='stop_timeout = "1s"'))
    agents()
    pid = wait_for(lambda: env.running("deaf"), 10, "deaf running")
    wait_for(lambda: handles(pid, signal.SIGTERM), 5, "the shell ignoring TERM")
    t0 = time.monotonic()
    reconcile("tell", "g", "stop", "--spec", str(env.spec_dir), check=0)
    wait_for(lambda: not alive(pid), 10, "deaf gone")
    assert time.monotonic() - t0 >= 1.0  # it outlived its SIGTERM by stop_timeout
    rec = wait_for(lambda: (r := env.record("deaf"))["state"] == "stopped" and r, 5, "stopped")
    assert rec["exit_code"] == -signal.SIGKILL
    assert not env.marked("sleep 100")  # its child (which ignored TERM too) went with the group


# --- adoption and the keeper ---------------------------------------------------------------------------

LONG_LEASE = '[cluster.timing]\nheartbeat = "1s"\nlease = "30s"\ndead_after = "40s"\n'


@pytest.mark.integration  # starts agents
def test_adoption_after_agent_sigkill(env, agents):
    env.write(group("g") + entry("srv", "respawn", ["sleep", "101"]), timing=LONG_LEASE)
    first = agents()
    pid = wait_for(lambda: env.running("srv"), 10, "srv running")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    second = agents()
    wait_for(lambda: f"adopted g/srv pid {pid}" in second.text(), 10, "adoption logged")
    time.sleep(1.0)  # a few rounds: nothing restarts it
    assert env.running("srv") == pid
    assert [p.pid for p in env.marked("sleep 101")] == [pid]  # no second copy
    assert "start g/srv" not in second.text()
    # an adopted process (not our child) that dies is still noticed at once and respawned
    os.kill(pid, signal.SIGKILL)
    new = wait_for(lambda: (p := env.running("srv")) and p != pid and p, 5, "respawn of adopted process")
    assert len(env.marked("sleep 101")) == 1 and new != pid


@pytest.mark.integration  # starts keepers
def test_a_second_keeper_steps_aside(tmp_path):
    """Two keepers for one node (the agent started one while the first was starting up):
    the second exits at once, so that at expiry the first does not find it among the
    agent's children and kill it (nor it the first: then nothing would stop the node)."""
    from reconciler import keeper

    node = tmp_path / "n1"
    node.mkdir()
    (node / "lease").write_bytes(leaserecord.lease_record(time.monotonic() + 1.0))
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    ticks = procfs.start_ticks(victim.pid)
    (node / "processes.json").write_text(json.dumps(
        {"records": [{"pid": victim.pid, "pgid": victim.pid, "state": "running", "ticks": ticks}]}))
    first = subprocess.Popen([sys.executable, "-m", "reconciler.keeper", str(node)])
    try:
        wait_for(lambda: (node / "keeper.pid").exists(), 10, "the first keeper")
        second = subprocess.Popen([sys.executable, "-m", "reconciler.keeper", str(node)])
        assert second.wait(10) == 0  # stepped aside
        assert first.poll() is None
        assert victim.wait(5) == -signal.SIGKILL  # the lease ran out: the first keeper acted
        # The keeper logs after its kills: the victim can be reaped before the line is written.
        wait_for(lambda: "SIGKILL" in (node / "keeper.log").read_text(), 5, "the kill logged")
        assert first.poll() is None
        (node / "lease").write_bytes(leaserecord.lease_record(leaserecord.RELEASED))  # a clean exit
        assert first.wait(5) == 0
    finally:
        for p in (first, victim):
            if p.poll() is None:
                p.kill()


@pytest.mark.integration  # starts agents
def test_keeper_kills_processes_when_agent_dies(env, agents):
    env.write(group("g") + entry("srv", "respawn", ["sleep", "102"]), timing="")  # the default lease: 400ms
    a = agents()
    pid = wait_for(lambda: env.running("srv"), 10, "srv running")
    wait_for(lambda: (env.state / "keeper.pid").exists(), 5, "the keeper to have read the lease")
    os.kill(a.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: not alive(pid), 5, "keeper killed srv")
    took = time.monotonic() - t0
    assert took < 1.5, took  # lease 400ms: ~0.4 s
    # The keeper logs after its kills: srv can be seen dead before the line is written.
    wait_for(lambda: "SIGKILL" in (env.state / "keeper.log").read_text(), 5, "the kill logged")
    assert not env.marked("sleep 102")


# --- spec edits ------------------------------------------------------------------------------------------


@pytest.mark.integration  # starts agents
def test_hot_reload(env, agents):
    body = group("g") + entry("one", "respawn", ["sleep", "103"])
    env.write(body)
    a = agents()
    pid = wait_for(lambda: env.running("one"), 10, "one running")
    t0 = time.monotonic()
    env.write(body + entry("two", "respawn", ["sleep", "104"]))
    wait_for(lambda: env.running("two"), 5, "two running")
    took = time.monotonic() - t0
    assert took < 1.5, took
    assert env.running("one") == pid and not a.exited()


@pytest.mark.integration  # starts agents
def test_bad_edit_keeps_last_good(env, agents):
    body = group("g") + entry("one", "respawn", ["sleep", "105"])
    env.write(body)
    a = agents()
    pid = wait_for(lambda: env.running("one"), 10, "one running")
    env.write("", raw=env.spec_file.read_text() + "\n[groups.broken\n")
    line = wait_for(
        lambda: next((ln for ln in a.text().splitlines() if "keeping the last good spec" in ln), None), 5, "error logged"
    )
    assert f"{env.spec_file}: not valid TOML" in line
    assert wait_for(lambda: env.status()["spec_error"], 5, "spec_error published").startswith(f"{env.spec_file}: ")
    time.sleep(0.5)  # the bad edit changes nothing meanwhile: the time passing is the test
    assert env.running("one") == pid and not a.exited()
    # `reconcile status` needs the spec to find the store: it names the bad line, exit 1
    p = reconcile("status", "--spec", str(env.spec_dir), "--json")
    assert p.returncode == 1 and p.stderr.startswith(f"reconcile: {env.spec_file}: not valid TOML"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # a bad value (valid TOML) is refused the same way
    env.write(body.replace('mode = "respawn"', 'mode = "sometimes"'))
    wait_for(lambda: "groups.g.entries[0].mode: must be one of" in env.status()["spec_error"], 5, "mode error published")
    assert env.running("one") == pid
    # fixed: converges, error cleared
    env.write(body + entry("two", "respawn", ["sleep", "106"]))
    wait_for(lambda: env.running("two"), 5, "two running")
    assert env.running("one") == pid
    wait_for(lambda: env.status()["spec_error"] == "", 5, "spec_error cleared")
    p = reconcile("status", "--spec", str(env.spec_dir), "--node", NODE, check=0)
    assert "one" in p.stdout and "two" in p.stdout


@pytest.mark.integration  # starts agents
def test_removed_group_is_stopped_gracefully(env, agents):
    keep = group("g") + entry("stay", "respawn", ["sleep", "107"])
    gone = group("h") + entry("leave", "respawn", f'trap "touch {{w}}/got-term; exit 0" TERM; sleep 100 & wait', group="h")
    env.write(keep + gone)
    agents()
    stay = wait_for(lambda: env.running("stay"), 10, "stay running")
    leave = wait_for(lambda: env.running("leave"), 5, "leave running")
    wait_for(lambda: handles(leave, signal.SIGTERM), 5, "the shell's trap")
    env.write(keep)
    wait_for(lambda: not alive(leave), 5, "leave gone")
    wait_for(lambda: env.file("got-term").exists(), 5, "TERM trapped")
    rec = wait_for(lambda: (r := env.record("leave"))["state"] == "stopped" and r, 5, "leave stopped")
    assert rec["exit_code"] == 0  # exited on its own after TERM: not KILLed
    assert env.running("stay") == stay
    wait_for(lambda: not (env.store / "claims" / "h").exists(), 5, "claim on h released")


@pytest.mark.integration  # starts agents
def test_sigterm_stops_everything_gracefully_and_exits_0(env, agents):
    trap = 'trap "touch {w}/term.$RECONCILER_TAG; exit 0" TERM; sleep 100 & wait'
    env.write(group("g") + entry("a", "respawn", trap) + entry("b", "respawn", trap) + group("h") + entry("c", "respawn", trap, group="h"))
    a = agents()
    pids = [wait_for(lambda: env.running(t), 10, f"{t} running") for t in "abc"]
    for pid in pids:
        wait_for(lambda: handles(pid, signal.SIGTERM), 5, "the shells' traps")
    a.signal(signal.SIGTERM)
    assert a.wait(10) == 0
    for t in "abc":
        assert env.file(f"term.{t}").exists(), t
    assert not any(alive(p) for p in pids)
    from reconciler import keeper

    assert leaserecord.read_deadline(str(env.state / "lease")) == leaserecord.RELEASED  # the keeper's signal: clean exit
    wait_for(lambda: not env.marked(), 5, "keeper gone too")
    assert "stopping every local group" in a.text()


# --- the CLI ---------------------------------------------------------------------------------------------

COMMENTED = """\
# comment at the top
[cluster]
name = "test"   # inline comment
store = "dir:../store"
state_dir = "../state"
timing = { heartbeat = "100ms", lease = "2s", dead_after = "2500ms" }

[groups.g]
# the desired level
runlevel = "run"   # keep this comment

[[groups.g.entries]]
tag = "s"          # a tag
mode = "respawn"
runlevels = ["run", "maint"]
command = ["sleep", "108"]
"""


def test_check_exit_codes(env):
    env.write("", raw=COMMENTED)
    p = reconcile("check", "--spec", str(env.spec_dir), check=0)
    assert "1 groups" in p.stdout and "g: runlevel run" in p.stdout
    env.write("", raw=COMMENTED.replace('mode = "respawn"', 'mode = "bogus"'))
    p = reconcile("check", "--spec", str(env.spec_dir), check=1)
    assert p.stderr == f"reconcile: {env.spec_file}: groups.g.entries[0].mode: must be one of wait, once, respawn, test, off\n"
    env.write("", raw=COMMENTED.replace('["sleep", "108"]', '["/nonexistent/bin/x"]'))
    p = reconcile("check", "--spec", str(env.spec_dir), check=1)
    assert f"{env.spec_file}: groups.g.entries[0].command: /nonexistent/bin/x: command not found" in p.stderr
    os.chmod(env.spec_file, 0o666)
    p = reconcile("check", "--spec", str(env.spec_dir), check=1)
    assert "writable by others" in p.stderr
    # $RECONCILER_SPEC is the default --spec
    env.write("", raw=COMMENTED)
    p = subprocess.run(["reconcile", "check"], capture_output=True, text=True, env={**os.environ, "RECONCILER_SPEC": str(env.spec_dir)})
    assert p.returncode == 0, p.stderr


def test_tell_exit_codes_and_comments(env):
    env.write("", raw=COMMENTED)
    before = env.spec_file.read_bytes()
    p = reconcile("tell", "nogroup", "run", "--spec", str(env.spec_dir), check=1)
    assert "unknown group 'nogroup'" in p.stderr and len(p.stderr.splitlines()) == 1
    assert env.spec_file.read_bytes() == before
    p = reconcile("tell", "g", "nolevel", "--spec", str(env.spec_dir), check=1)
    assert "no entry of g mentions runlevel 'nolevel'" in p.stderr
    assert env.spec_file.read_bytes() == before
    mode = os.stat(env.spec_file).st_mode
    reconcile("tell", "g", "maint", "--spec", str(env.spec_dir), check=0)
    old, new = before.decode().splitlines(), env.spec_file.read_text().splitlines()
    assert len(old) == len(new)
    diff = [(a, b) for a, b in zip(old, new) if a != b]
    assert diff == [('runlevel = "run"   # keep this comment', 'runlevel = "maint"   # keep this comment')]
    assert os.stat(env.spec_file).st_mode == mode
    reconcile("tell", "g", "stop", "--spec", str(env.spec_dir), check=0)
    assert 'runlevel = "stop"   # keep this comment' in env.spec_file.read_text()


@pytest.mark.integration  # starts agents
def test_dry_run_exit_codes(env, agents):
    env.write("", raw=COMMENTED)
    a = agents()
    wait_for(lambda: env.running("s"), 10, "s running")
    wait_for(lambda: env.entry_status("g", "s")["state"] == "running", 5, "s running in the published status")
    p = reconcile("--dry-run", "--spec", str(env.spec_dir), "--node", NODE)
    assert p.returncode == 0, (p.stdout, p.stderr)  # converged
    assert "converged" in p.stdout
    assert not a.exited() and env.running("s")
    a.signal(signal.SIGTERM)
    assert a.wait(10) == 0
    p = reconcile("run", "--dry-run", "--spec", str(env.spec_dir), "--node", NODE, check=2)  # nothing runs now
    assert "claim g: unclaimed and this node is candidate 1 of 1" in p.stdout
    assert not env.running("s")  # a dry run executes nothing
    env.write("", raw=COMMENTED.replace('mode = "respawn"', 'mode = "bogus"'))
    p = reconcile("--dry-run", "--spec", str(env.spec_dir), "--node", NODE, check=1)
    assert p.stderr.startswith(f"reconcile: {env.spec_file}: groups.g.entries[0].mode:")


@pytest.mark.integration  # starts agents
def test_status_json_shape(env, agents):
    env.write(group("g") + entry("s", "respawn", ["sleep", "109"]) + entry("t", "once", "true"))
    agents()
    pid = wait_for(lambda: env.running("s"), 10, "s running")
    wait_for(lambda: env.entry_status("g", "s").get("pid") == pid, 5, "status published")
    p = reconcile("status", "--spec", str(env.spec_dir), "--node", NODE, "--json", check=0)
    doc = json.loads(p.stdout)
    assert set(doc) == {"nodes", "groups", "summary", "problems", "spec_error", "intents"}
    n = doc["nodes"][NODE]
    assert n["live"] is True and isinstance(n["heartbeat_age"], float) and n["spec_differs"] is False and n["spec_error"] == ""
    g = doc["groups"]["g"]
    assert set(g) == {"desired", "owner", "generation", "actual", "state", "entries", "failures", "notes",
                      "group_failures", "bans", "banned_everywhere"}  # (issue 16's)
    assert g["desired"] == "run" and g["owner"] == NODE and g["generation"] >= 1 and g["actual"] == "run" and g["state"] == "running"
    assert g["entries"]["s"] == {"state": "running", "pid": pid}
    assert g["entries"]["t"]["state"] in ("running", "done")
    p = reconcile("status", "--spec", str(env.spec_dir), "--node", NODE, check=0)
    assert "GROUP" in p.stdout and f"pid {pid}" in p.stdout


@pytest.mark.integration  # starts agents
def test_status_after_a_bad_edit_shows_what_the_nodes_publish(env, agents):
    """A spec edit that does not load: the agent keeps its last good spec (the cluster spec's
    revision), and `reconcile status` shows the cluster as that revision says, the node's
    refused edit, and warns of this machine's files."""
    env.write(group("g") + entry("s", "respawn", ["sleep", "113"]) + group("h", runlevel="stop") + entry("u", "respawn", ["sleep", "114"], group="h"))
    agents()
    pid = wait_for(lambda: env.running("s"), 10, "s running")
    wait_for(lambda: env.entry_status("g", "s").get("pid") == pid, 5, "status published")
    env.write(group("g") + entry("s", "respawn", ["sleep", "113"]).replace('mode = "respawn"', 'mode = "bogus"'))
    wait_for(lambda: "bogus" in env.status().get("spec_error", "") or "mode" in env.status().get("spec_error", ""), 5, "the agent reports the bad edit")
    assert env.running("s") == pid  # the last good spec keeps running
    p = reconcile("status", "--spec", str(env.spec_dir), "--node", NODE, "--json", check=0)
    doc = json.loads(p.stdout)
    assert doc["spec_error"] == ""  # the cluster spec (revision 1) loads
    assert doc["groups"]["g"]["desired"] == "run" and doc["groups"]["g"]["owner"] == NODE
    assert doc["groups"]["g"]["entries"]["s"] == {"state": "running", "pid": pid}
    assert doc["groups"]["h"]["desired"] == "stop" and doc["groups"]["h"]["owner"] is None
    assert doc["nodes"][NODE]["live"] is True and "mode" in doc["nodes"][NODE]["spec_error"]
    assert doc["nodes"][NODE]["spec_differs"] is False and doc["nodes"][NODE]["revision"] == 1
    assert p.stderr.startswith(f"reconcile: warning: {env.spec_file}: groups.g.entries[0].mode:"), p.stderr
    assert "it runs revision 1" in p.stderr
    p = reconcile("status", "--spec", str(env.spec_dir), "--node", NODE, check=0)
    assert "g " in p.stdout and f"pid {pid}" in p.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
