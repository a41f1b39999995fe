"""The agent's history component (reconciler/agent/events.py) against a real directory
store: batches appended by a task of its own, a bounded queue that drops (and counts) when the
store is down, never blocking the caller; the events the executor's results and a pass make."""

from __future__ import annotations

import asyncio
import time

from reconciler.act.executor import Events
from reconciler.act.fence import Outcome
from reconciler.agent.events import History
from reconciler.decide.intent import Action, Plan
from reconciler.model import Claim, EntryState, Observed
from reconciler.spec import loader
from reconciler.store.directory import DirectoryStore


def _store(tmp_path) -> DirectoryStore:
    s = DirectoryStore(tmp_path / "store")
    s.create()
    return s


def test_queued_events_are_appended_in_order_by_the_task(tmp_path):
    async def body():
        store = _store(tmp_path)
        appended = []
        h = History("n1", on_appended=appended.append)
        task = asyncio.create_task(h.run(store))
        for i in range(250):
            h.record("claim", f"g{i}", f"reason {i}")
        for _ in range(200):
            if h.appended == 250:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        got = await store.events_read(limit=1000)
        assert [e.group for e in got] == [f"g{i}" for i in range(250)]
        assert {e.node for e in got} == {"n1"} and h.dropped == 0 and sum(appended) == 250
        assert max(appended) <= 100  # batches
        await store.close()

    asyncio.run(body())


def test_a_down_store_drops_and_counts_and_record_never_blocks(tmp_path):
    async def body():
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        store = DirectoryStore(blocker)
        dropped = []
        h = History("n1", queue=10, on_dropped=dropped.append)
        task = asyncio.create_task(h.run(store))
        t0 = time.monotonic()
        for i in range(50):
            h.record("claim", f"g{i}")
        assert time.monotonic() - t0 < 0.05  # record() is a deque append, no I/O
        await asyncio.sleep(0.2)
        task.cancel()
        assert h.dropped == 50 == sum(dropped)  # 40 over the queue's bound, 10 in the failed append
        assert h.appended == 0

    asyncio.run(body())


SPEC = """
[cluster]
name = "c"
store = "dir:{store}"
state_dir = "{state}"
[groups.web]
runlevel = "run"
nodes = ["n1", "n2"]
max_failures = 2
entries = [
  {{ tag = "fit", mode = "test", runlevels = ["run"], command = ["true"] }},
  {{ tag = "srv", mode = "respawn", runlevels = ["run"], command = ["sleep", "100"] }},
]
"""


def test_executor_results_and_passes_make_the_events(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC.format(store=tmp_path / "store", state=tmp_path / "state"))
    spec = loader.load(str(tmp_path / "spec.toml"))
    h = History("n1")
    ev = h.wrap(Events())
    ev.done(Action("claim", "web", reason="unclaimed and this node is candidate 1 of 2"), True, "generation 3")
    old = Claim(group="web", node="n2", generation=3)
    take = Action("takeover", "web", reason="owner n2 silent for 2.10s", claim=old, fence=("fence", "n2"))
    h.dispatched(take, 2.1)
    ev.fenced("web", Outcome(ok=True, message="", seconds=0.25))
    ev.taken_over("web", Claim(group="web", node="n1", generation=4))
    ev.done(take, True, "took over from n2: generation 4")
    # Not yet running: no takeover event; then running and planned out: told with its phases.
    h.observed(spec, Observed(node="n1"), Plan(), (), time.monotonic())
    assert [e.kind for e in h._queue] == ["claim", "fence", "fence-result"]
    running = {("web", "fit"): EntryState(group="web", tag="fit", state="passed"),
               ("web", "srv"): EntryState(group="web", tag="srv", state="running", pid=5)}
    h.observed(spec, Observed(node="n1", entries=running), Plan(), (), time.monotonic())
    takeover = list(h._queue)[-1]
    assert takeover.kind == "takeover" and takeover.group == "web"
    assert set(takeover.phases) == {"detect", "fence", "claim", "start"}
    assert takeover.phases["detect"] == 2.1 and takeover.phases["fence"] == 0.25
    assert "generation 4, started" in takeover.reason
    # A failed start is told once per reason; a failed test and a ban once when they begin.
    for _ in range(3):
        ev.done(Action("start", "web", "srv", reason="respawn: exit 1"), False, "cannot execute: No such file")
    failed = {("web", "fit"): EntryState(group="web", tag="fit", state="failed", message="exit 1")}
    for _ in range(2):
        h.observed(spec, Observed(node="n1", entries=failed, bans={"web": time.monotonic() + 60}), Plan(), (), time.monotonic())
    kinds = [e.kind for e in h._queue]
    assert kinds[-3:] == ["start-failed", "test-failed", "ban"] and kinds.count("start-failed") == 1
    assert list(h._queue)[-2].reason == "fit: exit 1"


def test_the_dropped_count_is_published_only_when_some_were_dropped():
    """An older agent (forbid_extra_keys) reads a newer node's status while it dropped nothing."""
    from reconciler.published import NodeStatus, dumps, loads

    assert "events_dropped" not in dumps(NodeStatus())
    assert loads(dumps(NodeStatus(events_dropped=3))).events_dropped == 3


def test_reconcile_events_prints_filters_and_says_an_unreachable_store_in_one_line(tmp_path):
    from reconciler.published import Event

    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(store=tmp_path / "store", state=tmp_path / "state"))
    p = reconcile("events", "--spec", str(spec))
    assert p.returncode == 0 and p.stdout == "", p.stderr  # no agent set the store up yet: no history
    store = _store(tmp_path)
    old = time.time() - 7200
    asyncio.run(store.events_append([
        Event(wall=old, node="n1", kind="claim", group="web", reason="unclaimed: generation 1"),
        Event(wall=time.time(), node="n2", kind="takeover", group="web", reason="owner n1 silent",
              phases={"start": 0.25, "detect": 0.7, "claim": 0.01}),
        Event(wall=time.time(), node="n2", kind="spec-revision", reason="revision 2 published: web: runlevel run -> stop"),
    ]))
    lines = reconcile("events", "--spec", str(spec)).stdout.splitlines()
    assert len(lines) == 3 and lines[0].endswith("  n1  web  claim: unclaimed: generation 1"), lines
    assert lines[1].endswith("  n2  web  takeover: owner n1 silent  [detect 0.700s, claim 0.010s, start 0.250s]"), lines
    assert "  n2  -  spec-revision: revision 2" in lines[2]
    assert len(reconcile("events", "--since", "1h", "--spec", str(spec)).stdout.splitlines()) == 2
    assert len(reconcile("events", "--group", "web", "--node", "n1", "--spec", str(spec)).stdout.splitlines()) == 1
    p = reconcile("events", "--since", "soon", "--spec", str(spec))
    assert p.returncode == 64 and "not a duration like 30s, 10m, 2h or 1d" in p.stderr
    (tmp_path / "store" / "events").rename(tmp_path / "elsewhere")  # set up, then gone: unreachable
    (tmp_path / "store" / "events").write_text("")
    p = reconcile("events", "--spec", str(spec))
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and p.stderr.startswith("reconcile: dir:"), p.stderr


def reconcile(*args: str):
    """`reconcile ARGS` in this process (click's runner: a subprocess costs ~0.8 s here);
    .returncode, .stdout, .stderr as subprocess.run gives them."""
    import types

    from click.testing import CliRunner

    from reconciler import cli

    r = CliRunner().invoke(cli.main, list(args))
    return types.SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)
