"""The lease is renewed from a thread of its own (reconciler/cluster/renewal.py): an event
loop kept busy for longer than the lease does not cost the node its lease, a wedged loop
does, and a lapse marks the node's claims stale so that they are re-arbitrated first.

The first tests run the renewer's components (lease, instance, watch, renewer) on a real
store directory with an injected clock: one beat at a time, time moved on by the test, no
thread and no sleeping. The others run the agent in this test's process (a real store
directory, a real keeper and a real `sleep` process), so they can block its event loop at
will.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from reconciler import keeper
from reconciler import spec as specmod
from reconciler.agent import loop as agentmod
from reconciler.cluster.instance import Instance
from reconciler.cluster.lease import Lease
from reconciler.cluster.renewal import Publisher, Pulse, Renewer
from reconciler.cluster.watch import Watch
from reconciler.store import StoreError
from reconciler.store.directory import DirectoryStore
from reconciler.host import leaserecord
from reconciler.published import EMPTY


SPEC = """
[cluster]
store = "dir:{root}/store"
state_dir = "{root}/state"

[groups.web]
runlevel = "run"
nodes = ["n1"]

[[groups.web.entries]]
tag = "srv"
runlevels = ["run"]
command = ["sleep", "3600"]
stop_timeout = "1s"
"""


# --- the renewer's components, with an injected clock ------------------------------------


class Clock:
    """Monotonic time as the test says (it starts at the real clock's reading: the lease
    file holds monotonic deadlines)."""

    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _failing_publish(store) -> dict[str, bool]:
    """Make the store's publish_blocking fail while the switch returned says "on"."""
    real = store.publish_blocking
    failing = {"on": True}

    def publish(hb):
        if failing["on"]:
            raise StoreError(f"{store.url}: injected failure")
        return real(hb)

    store.publish_blocking = publish
    return failing


class Parts:
    """Lease, instance, watch and renewer of node n1, as the agent composes them."""

    def __init__(self, tmp_path: Path):
        (tmp_path / "spec.toml").write_text(SPEC.format(root=tmp_path))
        self.spec = specmod.load(str(tmp_path / "spec.toml"))
        self.timing = self.spec.cluster.timing
        self.clock = Clock()
        self.store = DirectoryStore(tmp_path / "store")
        asyncio.run(self.store.setup())
        node_dir = tmp_path / "state" / "n1"
        node_dir.mkdir(parents=True)
        self.lease = Lease("n1", str(node_dir / "lease"), clock=self.clock)
        self.instance = Instance("n1", str(node_dir / "instance"), lease=self.lease, timing=lambda: self.timing,
                                 clock=self.clock)
        self.watch = Watch("n1", spec=lambda: self.spec, store_url=self.store.url, lease=self.lease,
                           instance=self.instance, clock=self.clock)
        self.pulse = Pulse(self.clock)
        self.posts: list[bool] = []
        self.publisher = Publisher("n1", instance=self.instance, digest=lambda: "", status=lambda: EMPTY)
        self.renewer = Renewer(lease=self.lease, watch=self.watch, instance=self.instance, store=self.store,
                               publisher=self.publisher, pulse=self.pulse, post=self.posts.append,
                               timing=lambda: self.timing, clock=self.clock)

    def beats(self, seconds: float, *, alive: bool = True) -> None:
        """A heartbeat's worth of time, then a beat, for `seconds`; the loop stamps its pulse
        before each beat if `alive`."""
        end = self.clock() + seconds
        while self.clock() < end - 1e-9:
            self.clock.advance(self.timing.heartbeat)
            if alive:
                self.pulse.stamp()
            self.renewer.beat()

    def settled(self) -> "Parts":
        """Past the first read (the instance's watch) and the claim hold: renewing."""
        self.renewer.beat()
        self.beats(0.5)
        assert self.instance.verdict.state == "ok" and self.lease.until > self.clock()
        return self

    def claim(self, group: str) -> None:
        claim = asyncio.run(self.store.claim(group, "n1"))
        assert claim is not None
        self.watch.set_claim(group, claim)


def test_renewals_move_the_lease_on_while_the_loop_lives(tmp_path):
    """A loop busy for three leases but alive within loop_stall: every beat moves the lease
    on, it never runs out."""
    p = Parts(tmp_path).settled()
    p.pulse.stamp()
    for _ in range(12):  # 1.2 s: the loop proves nothing meanwhile
        p.clock.advance(p.timing.heartbeat)
        started = p.clock()
        p.renewer.beat()
        assert p.lease.until == started + p.timing.lease > p.clock()
        assert leaserecord.read_deadline(p.lease.path) == pytest.approx(p.lease.until, abs=1e-6)  # the keeper is told
    assert not p.lease.stale()


def test_a_stalled_loop_stops_the_renewals_and_the_lapse_marks_claims_stale(tmp_path, caplog):
    p = Parts(tmp_path).settled()
    p.claim("web")
    assert p.renewer.loop_stall == max(2.0, 2 * p.timing.lease)
    assert p.renewer.post_after < p.renewer.loop_stall  # an idle loop is posted to in time
    with caplog.at_level(logging.INFO):
        p.beats(p.renewer.loop_stall + p.timing.heartbeat, alive=False)
        counter = p.publisher.counter
        p.beats(0.5, alive=False)
    assert p.publisher.counter == counter  # nothing published while the loop stalls
    assert p.lease.until < p.clock()  # lapsed: nothing renewed it
    assert caplog.text.count("not renewing the lease") == 1  # (logged once, not every beat)
    assert "stalled" in p.renewer.publish_error
    assert not p.watch.view.store_ok and "stalled" in p.watch.view.store_error
    # Back: the first renewal marks this node's claims stale and extends the lease, as one.
    p.pulse.stamp()
    started = p.clock()
    with caplog.at_level(logging.INFO):
        p.renewer.beat()
    assert "lease lapsed" in caplog.text and "re-arbitrating web" in caplog.text
    assert p.lease.until == started + p.timing.lease
    assert p.instance.continuous_since == started  # (identity: the lease was broken)
    lease_until, stale = p.lease.snapshot(p.watch.view.claims)
    assert (lease_until, stale) == (p.lease.until, {"web"})
    assert p.watch.planning_view().stale_claims == {"web"}
    # Won again: no longer stale.
    p.watch.set_claim("web", p.watch.view.claims["web"])
    assert p.watch.planning_view().stale_claims == frozenset()


def test_failing_publishes_mark_the_store_unreachable_and_the_lease_lapses(tmp_path, caplog):
    p = Parts(tmp_path).settled()
    p.claim("web")
    failing = _failing_publish(p.store)
    before = p.lease.until
    p.beats(p.timing.heartbeat)
    assert not p.watch.view.store_ok and "injected" in p.watch.view.store_error
    assert p.lease.until == before  # no renewal
    p.beats(p.timing.lease)  # past the lease itself
    assert p.clock() > p.lease.until
    failing["on"] = False
    with caplog.at_level(logging.INFO):
        p.beats(p.timing.heartbeat)
    assert p.lease.until > p.clock() and p.watch.view.store_ok
    assert "lease lapsed" in caplog.text and p.lease.stale() == {"web"}


def test_a_hung_read_marks_the_store_unreachable_in_the_planning_view(tmp_path):
    """No read back for longer than lease / 2 + heartbeat: the loop plans with a view that
    says the store is unreachable (no takeovers on a view that old)."""
    p = Parts(tmp_path).settled()
    assert p.watch.planning_view().store_ok
    p.clock.advance(p.timing.lease / 2 + p.timing.heartbeat - 0.01)
    assert p.watch.planning_view().store_ok
    p.clock.advance(0.02)
    view = p.watch.planning_view()
    assert not view.store_ok and "no answer for" in view.store_error
    p.renewer.read_once()  # the read comes back
    assert p.watch.planning_view().store_ok


def test_an_idle_loop_is_posted_to_only_for_a_change_or_as_proof_of_life(tmp_path):
    p = Parts(tmp_path).settled()
    p.posts.clear()
    p.beats(3.0)  # the loop proves itself alive all along: nothing changes, nothing is posted
    assert p.posts == []
    p.beats(p.renewer.post_after + p.timing.heartbeat, alive=False)  # no pass for post_after
    assert p.posts == [False]  # a post that proves the loop alive, once (not every beat)
    p.posts.clear()
    p.claim("db")  # (the watch shows it at once; the next read brings the same claim)
    asyncio.run(p.store.claim("mail", "n2"))  # a change the planner cares about
    p.beats(p.timing.heartbeat)
    assert p.posts == [True]


def _running(a: agentmod.Agent) -> bool:
    return any(st.state == "running" for st in a.supervisor.snapshot().values())


def _cleanup(root: Path) -> None:
    """Kill the keeper and anything the agent left behind."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(root) in cmd or (p.info["cmdline"] or [""])[:2] == ["sleep", "3600"] and p.ppid() == os.getpid():
            try:
                p.kill()
            except psutil.Error:
                pass


async def _until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _run(tmp_path: Path, scenario) -> agentmod.Agent:
    (tmp_path / "spec.toml").write_text(SPEC.format(root=tmp_path))
    a = agentmod.Agent(str(tmp_path / "spec.toml"), "n1")

    async def main():
        task = asyncio.create_task(a.run())
        try:
            await _until(lambda: getattr(a, "renewer", None) is not None and _running(a), 10, "the group running")
            await scenario(a)
        finally:
            a.request_stop()
            await asyncio.wait_for(task, 15)

    try:
        asyncio.run(main())
    finally:
        _cleanup(tmp_path)
    return a


@pytest.mark.integration  # a real Agent in-process, its entries real processes, real time
def test_a_busy_loop_keeps_the_lease(tmp_path, caplog):
    """The loop blocked for 1.2 s (three leases): the lease file keeps moving, nothing lapses."""
    deadlines = []

    def watch(path: str, stop: threading.Event) -> None:
        while not stop.is_set():
            d = leaserecord.read_deadline(path)
            if d is not None:
                deadlines.append((time.monotonic(), d))
            time.sleep(0.01)

    async def scenario(a):
        assert a.renewer is not None  # the directory store renews from a thread
        stop = threading.Event()
        t = threading.Thread(target=watch, args=(str(a.node_dir / "lease"), stop), daemon=True)
        t.start()
        pid = next(st.pid for st in a.supervisor.snapshot().values() if st.state == "running")
        time.sleep(1.2)  # on the event loop: nothing else on the loop runs meanwhile
        await asyncio.sleep(0.3)
        stop.set()
        t.join()
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # the keeper left it alone
        assert a.lease.until > time.monotonic()

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)
    assert deadlines
    # At every moment the deadline in the file was still ahead: it never ran out.
    assert all(d > seen for seen, d in deadlines), [round(d - seen, 3) for seen, d in deadlines if d <= seen][:5]
    assert "lease lapsed" not in caplog.text


@pytest.mark.integration  # a real Agent in-process, its entries real processes, real time
def test_a_wedged_loop_loses_the_lease(tmp_path, caplog):
    """A loop that does not run for longer than the renewer's bound loses the lease (the
    keeper then stops its processes), and the agent re-arbitrates when it comes back."""

    async def scenario(a):
        a.renewer.loop_stall = 1.0  # the default is max(2 s, 2 x lease)
        assert a.renewer.post_after < a.renewer.loop_stall  # an idle loop is posted to in time
        pid = next(st.pid for st in a.supervisor.snapshot().values() if st.state == "running")
        time.sleep(1.5)  # wedged, on the loop
        assert a.lease.until < time.monotonic()
        # The keeper, a separate process, has killed the group's process by now.
        end = time.monotonic() + 2
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < end:
            time.sleep(0.02)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        # Back: the loop marks the claim stale, renews, and the group runs again.
        await _until(lambda: a.lease.until > time.monotonic() and _running(a), 10, "the group back after the lapse")

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)
    assert "not renewing the lease" in caplog.text
    assert "lease lapsed" in caplog.text and "re-arbitrating web" in caplog.text


@pytest.mark.integration  # a real Agent in-process, its entries real processes, real time
def test_a_failing_publish_marks_the_store_unreachable_and_lapses(tmp_path, caplog):
    """publish_blocking failing: no renewal, the view says the store is unreachable, the
    node demotes; once it succeeds again the lapse goes through the loop (claims stale)."""

    async def scenario(a):
        failing = _failing_publish(a.store)
        await _until(lambda: not a.view.store_ok and "injected" in a.view.store_error, 3, "the store error in the view")
        await _until(lambda: not _running(a), 5, "self-demotion")
        # Past the lease itself (demotion comes demote_margin before it): without this the
        # first renewal after the failures lands on the lease's last instant, a coin flip.
        await _until(lambda: time.monotonic() > a.lease.until + 0.01, 2, "the lease to run out")
        failing["on"] = False
        await _until(lambda: a.lease.until > time.monotonic() and _running(a), 10, "the group back")

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)
    assert "lease lapsed" in caplog.text


@pytest.mark.integration  # a real Agent in-process, its entries real processes, real time
def test_an_idle_loop_sleeps_through_the_renewals(tmp_path):
    """Idle, the loop plans once a tick: renewals (ten a second) neither post to it nor
    wake it, although its plan's earliest deadline is the self-demotion one of a lease
    that each renewal moves on."""
    async def scenario(a):
        await asyncio.sleep(1.5)  # settled: nothing left to do
        passes, posts, wakes = [], [], []
        reconcile, read_posted, wake = a.reconcile, a.read_posted, a.wake
        a.reconcile = lambda: (passes.append(time.monotonic()), reconcile())[1]
        a.read_posted = lambda changed: (posts.append(changed), read_posted(changed))[1]
        a.wake = lambda: (wakes.append(time.monotonic()), wake())[1]
        await asyncio.sleep(3.0)
        assert a.last_plan.wake_at is not None  # the demotion deadline: the loop follows the lease
        assert len(passes) <= 4, f"{len(passes)} passes in 3 s (tick 1 s)"
        assert len(posts) <= 1 and not wakes, (posts, len(wakes))
        assert a.lease.until > time.monotonic() and _running(a)

    _run(tmp_path, scenario)


@pytest.mark.integration  # a real Agent in-process, its entries real processes, real time
def test_a_hung_renewal_demotes_at_the_deadline(tmp_path, caplog):
    """The renewer stuck in the store (a hung publish): the loop, which otherwise sleeps
    through renewals, wakes at lease_until - demote_margin on its own and stops the group
    itself, before the lease (and so the keeper's SIGKILL) runs out."""
    async def scenario(a):
        await asyncio.sleep(1.0)
        hang, demoted = threading.Event(), []
        real_publish, reconcile = a.store.publish_blocking, a.reconcile

        def publish(hb):
            hang.wait(10)
            return real_publish(hb)

        def watched():
            reconcile()
            if not demoted and any("self-demotion" in x.reason for x in a.last_plan.actions):
                demoted.append((time.monotonic(), a.lease.until))

        a.reconcile = watched
        a.store.publish_blocking = publish
        try:
            await _until(lambda: demoted, 3, "a self-demotion")
            at, lease_until = demoted[0]
            t = a.spec.cluster.timing
            assert at < lease_until, "demoted only after the lease had run out"
            assert at >= lease_until - t.demote_margin - 0.01
        finally:
            hang.set()
        await _until(lambda: a.lease.until > time.monotonic() and _running(a), 10, "the group back")

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)


@pytest.fixture(autouse=True)
def _no_stray_sigchld():
    # The agent installs its SIGCHLD handling on the test's loop; restore the default after.
    yield
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
