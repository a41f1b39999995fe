"""What the agent's log says happened (issue 18, item 2), the unit half: the changes between
two successive views (reconciler/decide/transitions.py) as a decision table, the journald
formatter, the rate-limited STATUS= line and the respawn backoff's steps. No agent, no clock.
The agents' own log lines: tests/test_logs_lines_agent.py."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from reconciler import cli
from reconciler.decide import backoff, transitions as tr
from reconciler.host import notify
from reconciler.model import Claim, ClusterView, Member

ME = "n1"
DEAD_AFTER = 2.0
NOW = 100.0


def view(*, store_ok=True, store_error="", membership_error="", peers=None, claims=None) -> ClusterView:
    """A view at NOW: `peers` {name: seconds since its heartbeat moved}; `claims` {group: (node, generation)}."""
    return ClusterView(
        node=ME, lease_until=NOW + 1, store_ok=store_ok, store_error=store_error, membership_error=membership_error,
        members={n: Member(name=n, last_change=NOW - age) for n, age in (peers or {}).items()},
        claims={g: Claim(group=g, node=n, generation=gen) for g, (n, gen) in (claims or {}).items()},
    )


def after(first: ClusterView, second: ClusterView, *, at: float = NOW) -> tuple[tr.Change, ...]:
    seen, _ = tr.step(tr.Seen(), first, now=NOW - 5, dead_after=DEAD_AFTER)
    seen, _ = tr.step(seen, first, now=NOW, dead_after=DEAD_AFTER)
    return tr.step(seen, second, now=at, dead_after=DEAD_AFTER)[1]


MEMBERSHIP = "/proc/hpc/admin/mospe: No such file or directory"

# (case, first view, second view, the changes from the first to the second)
TABLE = [
    ("nothing changed", view(peers={"n2": 0}), view(peers={"n2": 0.5}), ()),
    ("store lost", view(), view(store_ok=False, store_error="dir:/s: missing"),
     (tr.Change(tr.STORE_LOST, detail="dir:/s: missing"),)),
    ("store still lost: said once", view(store_ok=False, store_error="a"), view(store_ok=False, store_error="b"), ()),
    ("membership failed: not the store", view(),
     view(store_ok=False, store_error=MEMBERSHIP, membership_error=MEMBERSHIP),
     (tr.Change(tr.MEMBERSHIP_FAILED, detail=MEMBERSHIP),)),
    ("membership back", view(store_ok=False, store_error=MEMBERSHIP, membership_error=MEMBERSHIP), view(),
     (tr.Change(tr.MEMBERSHIP_OK),)),
    ("membership failed while the store is down too: both",
     view(), view(store_ok=False, store_error="dir:/s: missing", membership_error=MEMBERSHIP),
     (tr.Change(tr.STORE_LOST, detail="dir:/s: missing"), tr.Change(tr.MEMBERSHIP_FAILED, detail=MEMBERSHIP))),
    ("peer dies", view(peers={"n2": 0.5}), view(peers={"n2": 3.0}), (tr.Change(tr.PEER_DEAD, "n2", seconds=3.0),)),
    ("peer down in the membership", view(peers={"n2": 0.1}),
     ClusterView(node=ME, lease_until=NOW + 1, members={"n2": Member(name="n2", last_change=NOW - 0.1, up=False)}),
     (tr.Change(tr.PEER_DEAD, "n2", detail="down in the membership", seconds=pytest.approx(0.1)),)),
    ("peer joins", view(), view(peers={"n3": 0}), (tr.Change(tr.PEER_NEW, "n3"),)),
    ("no peer judged while the store is down", view(peers={"n2": 0.5}),
     view(store_ok=False, store_error="x", peers={"n2": 9.0}), (tr.Change(tr.STORE_LOST, detail="x"),)),
    ("claim won", view(), view(claims={"web": (ME, 4)}), (tr.Change(tr.CLAIM_WON, "web", generation=4),)),
    ("claim taken by a peer", view(claims={"web": (ME, 4)}), view(claims={"web": ("n2", 5)}),
     (tr.Change(tr.CLAIM_LOST, "web", generation=4, detail="n2"),)),
    ("claim released", view(claims={"web": (ME, 4)}), view(), (tr.Change(tr.CLAIM_LOST, "web", generation=4),)),
    ("claim won again, a new generation", view(claims={"web": (ME, 4)}), view(claims={"web": (ME, 6)}),
     (tr.Change(tr.CLAIM_LOST, "web", generation=4), tr.Change(tr.CLAIM_WON, "web", generation=6))),
    ("a peer's claims are not ours", view(), view(claims={"db": ("n2", 1)}), ()),
]


@pytest.mark.parametrize("first, second, changes", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_changes_between_two_views(first, second, changes):
    assert after(first, second) == changes


def test_store_back_says_how_long_it_was_unreachable():
    seen, out = tr.step(tr.Seen(), view(), now=10.0, dead_after=DEAD_AFTER)
    seen, out = tr.step(seen, view(store_ok=False, store_error="gone"), now=12.0, dead_after=DEAD_AFTER)
    assert out == (tr.Change(tr.STORE_LOST, detail="gone"),)
    seen, out = tr.step(seen, view(store_ok=False, store_error="gone"), now=13.0, dead_after=DEAD_AFTER)
    assert out == ()
    seen, out = tr.step(seen, view(), now=15.5, dead_after=DEAD_AFTER)
    assert out == (tr.Change(tr.STORE_BACK, seconds=3.5),)
    assert tr.describe(out[0], node=ME) == "store reachable again after 3.5s"


def test_a_peer_back_says_how_long_it_was_silent():
    def at(now, last_change):
        return ClusterView(node=ME, lease_until=now + 1, members={"n2": Member(name="n2", last_change=last_change)})

    seen, _ = tr.step(tr.Seen(), at(10.0, 10.0), now=10.0, dead_after=DEAD_AFTER)
    seen, out = tr.step(seen, at(13.0, 10.0), now=13.0, dead_after=DEAD_AFTER)
    assert out == (tr.Change(tr.PEER_DEAD, "n2", seconds=3.0),)
    assert tr.describe(out[0], node=ME) == "peer n2 dead (heartbeat stopped, silent for 3.0s)"
    seen, out = tr.step(seen, at(20.0, 10.0), now=20.0, dead_after=DEAD_AFTER)
    assert out == ()  # once per transition
    seen, out = tr.step(seen, at(21.0, 21.0), now=21.0, dead_after=DEAD_AFTER)
    assert out == (tr.Change(tr.PEER_BACK, "n2", seconds=11.0),)
    assert tr.describe(out[0], node=ME) == "peer n2 alive again after 11.0s of silence"


def test_the_first_view_reports_what_is_wrong_and_what_is_held_not_what_is_new():
    first = view(store_ok=False, store_error="dir:/s: missing", peers={"n2": 0}, claims={"web": (ME, 3)})
    _, out = tr.step(tr.Seen(), first, now=NOW, dead_after=DEAD_AFTER)
    assert out == (tr.Change(tr.STORE_LOST, detail="dir:/s: missing"), tr.Change(tr.CLAIM_HELD, "web", generation=3))


def test_every_change_has_a_line_and_a_severity():
    kinds = {v for k, v in vars(tr).items() if k.isupper() and isinstance(v, str) and k != "SEVERITY"}
    assert kinds == set(tr.SEVERITY)
    for k in kinds:
        assert tr.describe(tr.Change(k, "x", detail="d", seconds=1.0, generation=2), node=ME)
    assert tr.describe(tr.Change(tr.CLAIM_LOST, "web", generation=4, detail="n2"), node=ME) == \
        "claim lost: web (generation 4): now n2's"
    assert tr.severity(tr.Change(tr.CLAIM_LOST, "web", generation=4, detail="n2")) == "warning"  # taken
    assert tr.severity(tr.Change(tr.CLAIM_LOST, "web", generation=4)) == "info"  # released
    assert tr.describe(tr.Change(tr.MEMBERSHIP_FAILED, detail=MEMBERSHIP), node=ME) == \
        f"membership cannot be read: {MEMBERSHIP}"


@pytest.mark.parametrize("v, text", [
    (view(), "owning 0 groups, 1 member live"),
    (view(peers={"n2": 0, "n3": 5}, claims={"web": (ME, 1), "db": (ME, 2), "x": ("n2", 1)}),
     "owning 2 groups, 2 members live"),
    (view(store_ok=False, store_error="dir:/s: missing", claims={"web": (ME, 1)}),
     "owning 1 group, 1 member live; store unreachable: dir:/s: missing"),
    (view(store_ok=False, store_error=MEMBERSHIP, membership_error=MEMBERSHIP),
     f"owning 0 groups, 1 member live; membership cannot be read: {MEMBERSHIP}"),
])
def test_status_summary(v, text):
    assert tr.summary(v, NOW, DEAD_AFTER) == text


# --- journald -----------------------------------------------------------------------------------

def record(level: int, msg: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("reconciler.agent", level, __file__, 1, msg, None, exc_info)


@pytest.mark.parametrize("level, prefix", [
    (logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"), (logging.ERROR, "<3>"), (logging.CRITICAL, "<2>"),
])
def test_journal_lines_carry_the_priority_and_no_timestamp(level, prefix):
    assert cli._Journal().format(record(level, "store unreachable")) == f"{prefix}reconciler.agent: store unreachable"


def test_journal_gives_every_line_of_a_traceback_the_priority():
    try:
        raise ValueError("boom")
    except ValueError:
        text = cli._Journal().format(record(logging.ERROR, "reconcile failed", sys.exc_info()))
    lines = text.split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), text
    assert lines[-1] == "<3>ValueError: boom"


def test_journal_stream_must_be_stderr_itself(tmp_path):
    f = tmp_path / "err"
    f.write_text("")
    st = os.stat(f)
    other = os.stat(tmp_path)
    mine = f"{st.st_dev}:{st.st_ino}"
    assert cli.under_journal({"JOURNAL_STREAM": mine}, st)
    assert not cli.under_journal({"JOURNAL_STREAM": mine}, other)  # inherited, stderr redirected elsewhere
    assert not cli.under_journal({}, st)
    assert not cli.under_journal({"JOURNAL_STREAM": "junk"}, st)
    assert not cli.under_journal({"JOURNAL_STREAM": mine}, None)


# --- STATUS= --------------------------------------------------------------------------------------

def test_status_line_is_sent_when_it_changes_at_most_once_a_second():
    sent: list[str] = []
    line = notify.StatusLine(send=lambda t: sent.append(t) or True)
    line.sent("owning 0 groups, 1 member live", 0.0)  # with READY=1
    assert not line.offer("owning 0 groups, 1 member live", 0.0)
    assert not line.offer("owning 1 group, 1 member live", 0.5)  # too soon: a later offer sends it
    assert line.offer("owning 1 group, 1 member live", 1.0)
    assert not line.offer("owning 1 group, 1 member live", 5.0)  # unchanged
    assert line.offer("owning 1 group, 2 members live", 5.0)
    assert sent == ["owning 1 group, 1 member live", "owning 1 group, 2 members live"]


# --- respawn backoff -------------------------------------------------------------------------------

def test_the_respawn_backoff_steps_up_a_dozen_times_then_stays():
    steps = [n for n in range(1, 200) if backoff.RESPAWN.steps_up(n)]
    assert steps == list(range(4, 4 + len(steps)))  # the free exits (delay 0) are no step
    assert backoff.RESPAWN.delay(steps[-1]) == backoff.RESPAWN.cap
    assert len(steps) == 9  # 0.25 s .. 60 s: one warning each, not one per respawn


# --- the membership's errors name the file ----------------------------------------------------------

def test_a_membership_error_names_the_missing_file(tmp_path):
    from reconciler.cluster import hpc

    (tmp_path / "admin").mkdir()
    with pytest.raises(hpc.MembershipError) as info:
        hpc.read(tmp_path)
    assert str(info.value) == f"{tmp_path}/admin/mospe: No such file or directory"
    (tmp_path / "admin" / "mospe").write_text("1\n")
    with pytest.raises(hpc.MembershipError) as info:
        hpc.read(tmp_path)
    assert str(info.value) == f"{tmp_path}/nodes: No such file or directory"
    (tmp_path / "nodes" / "1").mkdir(parents=True)
    assert hpc.read(tmp_path).me == "1"


# --- the narrator: the loop's side ------------------------------------------------------------------

def test_the_narrator_logs_each_change_once_at_its_level_and_offers_the_summary(caplog):
    from reconciler.agent.narrator import Narrator

    sent: list[str] = []
    n = Narrator(ME, dead_after=lambda: DEAD_AFTER, send_status=lambda t: sent.append(t) or True)
    caplog.set_level(logging.DEBUG, logger="reconciler")
    assert n.ready(view(), NOW) == "owning 0 groups, 1 member live"
    down = view(store_ok=False, store_error="dir:/s: missing")
    for _ in range(3):
        n.tell(down, NOW)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("INFO", "ready: owning 0 groups, 1 member live"), ("WARNING", "store unreachable: dir:/s: missing")]
    assert sent == []  # a change within a second of READY=1 waits for a later offer
    n.tell(down, NOW + 1.5)
    assert sent == ["owning 0 groups, 0 members live; store unreachable: dir:/s: missing"]  # (its lease: NOW + 1)
    n.tell(view(claims={"web": (ME, 2)}), NOW + 2)
    assert [(r.levelname, r.getMessage(), getattr(r, "group", None)) for r in caplog.records[2:]] == [
        ("INFO", "store reachable again after 2.0s", None), ("INFO", "claim won: web (generation 2)", "web")]
    n.tell(view(claims={"web": (ME, 2)}, peers={"n2": -3.0}), NOW + 3)  # (its heartbeat moved at NOW + 3)
    joined = caplog.records[-1]
    assert (joined.getMessage(), joined.peer) == ("peer n2 joined", "n2")
    assert '"peer": "n2"' in cli._Json().format(joined)


# --- a program that cannot be started: warned once per step of the spawn backoff ---------------------

def test_a_start_that_keeps_failing_warns_once_per_backoff_step_and_the_executor_stays_quiet(tmp_path, caplog):
    """The real supervisor (no cgroups) and executor, a command that does not exist: the
    first failure and each step of decide/backoff.SPAWN at WARNING, every other retry at
    DEBUG; the executor's own line for the failed action is DEBUG (the supervisor said it)."""
    import asyncio

    from reconciler import spec as specmod
    from reconciler.act import executor as executormod, process, resources
    from reconciler.act.book import ResourceBook
    from reconciler.decide.intent import Action

    missing = str(tmp_path / "no-such-program")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "g.toml").write_text(
        f'[groups.g]\nrunlevel = "run"\n[[groups.g.entries]]\ntag = "t"\nmode = "respawn"\n'
        f'runlevels = ["run"]\ncommand = ["{missing}"]\n')
    spec = specmod.load(tmp_path / "specs")
    tries = 14
    caplog.set_level(logging.DEBUG, logger="reconciler")

    async def go() -> None:
        sup = process.Supervisor(node=ME, state_dir=tmp_path / "state", on_change=lambda: None, tree=False)
        ex = executormod.Executor(node=ME, supervisor=sup, store=None, resources=resources, book=ResourceBook(node=ME))
        for _ in range(tries):
            await ex.run_group(spec, (Action(kind="start", group="g", tag="t", reason="respawn: error"),), None)
        assert sup.snapshot()[("g", "t")].state == "error"

    asyncio.run(go())
    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    failed = f"g/t: cannot start {missing}: No such file or directory"
    process_lines = [(level, text) for name, level, text in said if name == "reconciler.process"]
    assert len(process_lines) == tries, said
    assert all(text.startswith(f"{failed} ({n} failures in a row, next try in ") for n, (_, text) in enumerate(process_lines, 1))
    warned = [n for n, (level, _) in enumerate(process_lines, 1) if level == "WARNING"]
    assert warned == [1] + [n for n in range(2, tries + 1) if backoff.SPAWN.steps_up(n)] == [1, 7, 8, 9, 10, 11, 12]
    assert all(level == "DEBUG" for n, (level, _) in enumerate(process_lines, 1) if n not in warned)
    assert "next try in 60.00s" in process_lines[11][1]  # the cap: quiet from here on
    executor_lines = [(level, text) for name, level, text in said if name == "reconciler.act"]
    assert len(executor_lines) == tries and {level for level, _ in executor_lines} == {"DEBUG"}, executor_lines
    assert executor_lines[0][1] == f"start g/t: respawn: error -> error (cannot start {missing}: No such file or directory)"
