"""Issue 16's I/O parts on their own (no root): the failure ledger (act/ledger.py) kept across
restarts and failing open when corrupt, clear requests; the probes (observe/probes.py)
against real local servers and commands; --dry-run's view of them (agent/dryrun.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import attrs
import pytest

from reconciler import published
from reconciler.act.ledger import Ledger
from reconciler.agent import dryrun
from reconciler.model import ClusterView, EntryState, Heartbeat, Member, Observed
from reconciler.observe import probes as probemod
from reconciler.observe.probes import Prober
from reconciler.spec import Cluster, Entry, Group, Health, Spec

from helpers import free_port, until

G = Group(name="web", runlevel="run", max_failures=2, failure_window=60.0, ban=120.0, entries=(
    Entry(tag="s", runlevels=("run",), command=("sleep", "100"), health=Health(tcp="127.0.0.1:1", interval=0.1, timeout=0.05)),))
SPEC = Spec(cluster=Cluster(), groups={"web": G})


# --- the ledger -----------------------------------------------------------------------------------

def test_failures_and_bans_survive_a_restart_of_the_agent(tmp_path):
    path = tmp_path / "health.json"
    now = time.monotonic()
    led = Ledger(path=path)
    led.record("web", "s", "rapid_exit", "exit 1", now=now - 2)
    assert led.bans(SPEC, now) == {}
    led.record("web", "s", "start_failed", "cannot start x", now=now - 1)
    assert led.bans(SPEC, now) == pytest.approx({"web": now - 1 + 120.0}, abs=0.01)
    again = Ledger(path=path)  # a new agent reads it back (wall times -> monotonic)
    assert [(f.tag, f.cause, f.message) for f in again.failures["web"]] == [("s", "rapid_exit", "exit 1"), ("s", "start_failed", "cannot start x")]
    assert again.bans(SPEC, now) == pytest.approx({"web": now - 1 + 120.0}, abs=0.05)


def test_a_corrupt_ledger_fails_open_and_is_kept_aside(tmp_path, caplog):
    path = tmp_path / "health.json"
    path.write_text('{"failures": {"web": [{"at": "soon"}]}}')
    led = Ledger(path=path)
    assert led.failures == {} and led.bans(SPEC, time.monotonic()) == {}
    assert (tmp_path / "health.json.corrupt").exists() and not path.exists()
    assert "starting with no failures and no bans" in caplog.text
    readonly = tmp_path / "ro.json"
    readonly.write_text("not json")
    Ledger(path=readonly, readonly=True)  # --dry-run: never moves it
    assert readonly.read_text() == "not json"


def test_prune_keeps_what_can_still_matter(tmp_path):
    led = Ledger(path=None)
    now = 10_000.0
    led.record("web", "s", "rapid_exit", now=now - 500)  # older than window + ban
    led.record("web", "s", "rapid_exit", now=now - 100)
    led.record("gone", "x", "rapid_exit", now=now - 1)  # a group the spec no longer has
    led.prune(SPEC, now)
    assert [f.at for f in led.failures["web"]] == [now - 100] and "gone" not in led.failures


def test_a_clear_request_resets_the_group_once(tmp_path):
    led = Ledger(path=tmp_path / "health.json")
    led.record("web", "s", "rapid_exit")
    led.record("web", "s", "rapid_exit")
    assert led.bans(SPEC, time.monotonic())
    (tmp_path / "clear").mkdir()
    (tmp_path / "clear" / "web").write_text("abc123\n")
    (tmp_path / "clear" / ".web.x.tmp").write_text("half-written")
    assert led.apply_requests() == ["web"]
    assert led.failures == {} and led.cleared == {"web": "abc123"} and led.bans(SPEC, time.monotonic()) == {}
    assert not (tmp_path / "clear" / "web").exists()
    assert Ledger(path=tmp_path / "health.json").cleared == {"web": "abc123"}
    assert led.apply_requests() == []


# --- the probes ------------------------------------------------------------------------------------

E = Entry(tag="s", runlevels=("run",), command=("true",))


def run(coro):
    return asyncio.run(coro)


def test_tcp_probe():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        assert run(probemod.probe(Health(tcp=f"127.0.0.1:{port}"), E, group="g", node="n")) == ""
    with pytest.raises(ConnectionRefusedError):
        run(probemod.probe(Health(tcp=f"127.0.0.1:{port}"), E, group="g", node="n"))


@pytest.mark.parametrize("reply,accept,want", [
    (b"HTTP/1.1 200 OK\r\n\r\n", (200, 399), ""),
    (b"HTTP/1.0 302 Found\r\n\r\n", (200, 399), ""),
    (b"HTTP/1.1 503 Busy\r\n\r\n", (200, 399), "status 503 (200-399 expected)"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", (200, 200), "status 204 (200-200 expected)"),
    (b"SSH-2.0-OpenSSH\r\n", (200, 399), "not an HTTP status line: b'SSH-2.0-OpenSSH\\r\\n'"),
    (b"", (200, 399), "no HTTP status line"),
])
def test_http_probe(reply, accept, want):
    requests = []

    async def main():
        async def serve(reader, writer):
            requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await probemod.probe(Health(http=f"http://127.0.0.1:{port}/health?x=1", status=accept), E, group="g", node="n"), port

    got, port = run(main())
    assert got == want
    assert requests[0].startswith(f"GET /health?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())


def test_command_probe_gets_the_entrys_environment_and_says_why_it_failed(tmp_path):
    e = attrs.evolve(E, env=(("WANT", "yes"),), cwd=str(tmp_path))
    ok = Health(command=("/bin/sh", "-c", 'test "$WANT" = yes && test "$RECONCILER_GROUP" = g && test "$PWD" = ' + str(tmp_path)))
    assert run(probemod.probe(ok, e, group="g", node="n")) == ""
    bad = Health(command=("/bin/sh", "-c", "echo first; echo 'disk full' >&2; exit 3"))
    assert run(probemod.probe(bad, e, group="g", node="n")) == "exit 3: disk full"


def test_a_command_probe_that_times_out_is_killed_with_what_it_started(tmp_path):
    pidfile = tmp_path / "pid"

    async def main():
        h = Health(command=("/bin/sh", "-c", f"sleep 100 & echo $! > {pidfile}; wait"), timeout=0.3, interval=1.0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(h.timeout):
                await probemod.probe(h, E, group="g", node="n")

    run(main())
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        time.sleep(0.01)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_the_prober_counts_failures_wakes_only_on_change_and_starts_afresh_for_a_new_process():
    port = free_port()
    h = Health(tcp=f"127.0.0.1:{port}", interval=0.05, timeout=0.02, failures=3)
    spec = Spec(cluster=Cluster(), groups={"web": Group(name="web", runlevel="run", entries=(attrs.evolve(E, health=h),))})
    wakes = []
    measured = []

    async def main():
        p = Prober(node="n1", on_change=lambda: wakes.append(time.monotonic()), measured=lambda *a: measured.append(a))
        running = {("web", "s"): EntryState(group="web", tag="s", state="running", pid=100, since=time.monotonic())}
        assert p.sync(spec, running) == {("web", "s"): attrs.evolve(p.results[("web", "s")])}
        await until(lambda: p.results[("web", "s")].failures >= 4, 5, "4 failed probes")
        first = p.sync(spec, running)[("web", "s")]
        assert first.pid == 100 and first.result == "fail" and first.failures >= 4 and first.message == "Connection refused"
        with socket.create_server(("127.0.0.1", port)):
            await until(lambda: p.results[("web", "s")].result == "ok", 5, "a probe passing")
            healthy = p.sync(spec, running)[("web", "s")]
            assert healthy.result == "ok" and healthy.failures == 0 and healthy.passed
            n_wakes = len(wakes)
            await asyncio.sleep(0.2)  # (the time passing is the test) ok after ok: no wake
            assert len(wakes) == n_wakes
            # a new process: its probe starts afresh
            running[("web", "s")] = attrs.evolve(running[("web", "s")], pid=101)
            fresh = p.sync(spec, running)[("web", "s")]
            assert fresh.pid == 101 and fresh.result == "" and not fresh.passed
            assert p.sync(spec, {}) == {}
            p.stop()

    run(main())
    assert {(g, kind) for g, kind, _r, _s in measured} == {("web", "tcp")}
    assert {r for _g, _k, r, _s in measured} == {"ok", "fail"}


# --- --dry-run --------------------------------------------------------------------------------------

def test_dry_run_sees_the_ledgers_bans_and_the_published_probes(tmp_path):
    led = Ledger(path=tmp_path / "health.json")
    now = time.monotonic()
    led.record("web", "s", "rapid_exit", now=now - 2)
    led.record("web", "s", "rapid_exit", now=now - 1)
    obs = Observed(node="n1", entries={("web", "s"): EntryState(group="web", tag="s", state="running", pid=7)})
    status = published.NodeStatus(groups={"web": published.GroupStatus(entries={"s": published.EntryStatus(
        state="running", pid=7, health="unhealthy", probe_failures=3, probe_message="refused")})})
    view = ClusterView(node="n1", members={"n1": Member(name="n1", last_change=now, heartbeat=Heartbeat(node="n1", counter=1, status=status))})
    got = dryrun.with_health(SPEC, obs, view, Ledger(path=tmp_path / "health.json", readonly=True), now)
    assert got.bans == pytest.approx({"web": now - 1 + 120.0}, abs=0.05)
    assert got.probes[("web", "s")].failures == 3 and got.probes[("web", "s")].result == "fail"


def test_a_tcp_probe_that_cannot_be_decided_at_once_waits_on_the_loop_bounded_by_its_timeout():
    h = Health(tcp="192.0.2.1:9", interval=1.0, timeout=0.2)  # TEST-NET-1: nothing answers
    quick = probemod._tcp_now(h)
    if isinstance(quick, str):  # no route here at all: decided at once, a failure
        assert quick
        return
    assert quick is not None

    async def main():
        with pytest.raises((TimeoutError, OSError)):  # (a firewall may refuse it)
            async with asyncio.timeout(h.timeout):
                await probemod.probe(h, E, group="g", node="n", pending=quick)

    run(main())
    assert quick[0].fileno() == -1  # closed either way


def finish(h: Health) -> str:
    """A tcp probe as the prober makes it: _tcp_now, then the wait if its connect is under way."""
    quick = probemod._tcp_now(h)
    if isinstance(quick, str):
        return quick
    try:
        return run(probemod.probe(h, E, group="g", node="n", pending=quick))
    except OSError as exc:
        return exc.strerror or str(exc)


def test_a_tcp_probe_started_without_waiting():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        assert finish(Health(tcp=f"127.0.0.1:{port}")) == ""
    assert finish(Health(tcp=f"127.0.0.1:{port}")) == "Connection refused"
    assert probemod._tcp_now(Health(tcp=f"localhost:{port}")) is None  # a name: resolved on the loop
