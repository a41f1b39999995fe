"""The lease is renewed from a thread of its own (reconciler/renewal.py): an event loop kept
busy for longer than the lease does not cost the node its lease, a wedged loop does, and a
lapse is handed to the loop so that the node's claims are re-arbitrated first.

The agent runs in this test's process (a real store directory, a real keeper and a real
`sleep` process), so the tests can block its event loop at will.
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
from reconciler.agent import loop as agentmod
from reconciler.store import StoreError
from reconciler.host import leaserecord

pytestmark = pytest.mark.integration  # a real Agent in-process, its entries real processes, real time

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
        assert a.lease_until > time.monotonic()

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)
    assert deadlines
    # At every moment the deadline in the file was still ahead: it never ran out.
    assert all(d > seen for seen, d in deadlines), [round(d - seen, 3) for seen, d in deadlines if d <= seen][:5]
    assert "lease lapsed" not in caplog.text


def test_a_wedged_loop_loses_the_lease(tmp_path, caplog):
    """A loop that does not run for longer than the renewer's bound loses the lease (the
    keeper then stops its processes), and the agent re-arbitrates when it comes back."""

    async def scenario(a):
        a.renewer.loop_stall = 1.0  # the default is max(2 s, 2 x lease)
        assert a.renewer.post_after < a.renewer.loop_stall  # an idle loop is posted to in time
        pid = next(st.pid for st in a.supervisor.snapshot().values() if st.state == "running")
        time.sleep(1.5)  # wedged, on the loop
        assert a.lease_until < time.monotonic()
        # The keeper, a separate process, has killed the group's process by now.
        end = time.monotonic() + 2
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < end:
            time.sleep(0.02)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        # Back: the loop marks the claim stale, renews, and the group runs again.
        await _until(lambda: a.lease_until > time.monotonic() and _running(a), 10, "the group back after the lapse")

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)
    assert "not renewing the lease" in caplog.text
    assert "lease lapsed" in caplog.text and "re-arbitrating web" in caplog.text


def test_a_failing_publish_marks_the_store_unreachable_and_lapses(tmp_path, caplog):
    """publish_blocking failing: no renewal, the view says the store is unreachable, the
    node demotes; once it succeeds again the lapse goes through the loop (claims stale)."""

    async def scenario(a):
        real = a.store.publish_blocking
        failing = {"on": True}

        def publish(hb):
            if failing["on"]:
                raise StoreError(f"{a.store.url}: injected failure")
            return real(hb)

        a.store.publish_blocking = publish
        await _until(lambda: not a.view.store_ok and "injected" in a.view.store_error, 3, "the store error in the view")
        await _until(lambda: not _running(a), 5, "self-demotion")
        # Past the lease itself (demotion comes demote_margin before it): without this the
        # first renewal after the failures lands on the lease's last instant, a coin flip.
        await _until(lambda: time.monotonic() > a.lease_until + 0.01, 2, "the lease to run out")
        failing["on"] = False
        await _until(lambda: a.lease_until > time.monotonic() and _running(a), 10, "the group back")

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)
    assert "lease lapsed" in caplog.text


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
        assert a.lease_until > time.monotonic() and _running(a)

    _run(tmp_path, scenario)


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
                demoted.append((time.monotonic(), a.lease_until))

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
        await _until(lambda: a.lease_until > time.monotonic() and _running(a), 10, "the group back")

    with caplog.at_level(logging.INFO):
        _run(tmp_path, scenario)


@pytest.fixture(autouse=True)
def _no_stray_sigchld():
    # The agent installs its SIGCHLD handling on the test's loop; restore the default after.
    yield
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
