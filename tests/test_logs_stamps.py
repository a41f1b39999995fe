"""Each line of an entry's log stamped with when it was written (reconciler/act/stamps.py;
issue 18, `reconcile logs` with timestamps): the index the agent's look appends to, what
each line is stamped with, the index moving with a rotation, an agent restart, an index
thinned out, and the Rotator writing it on its thread. Real files; the times are arguments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import wait_until
from reconciler.act import logs, stamps


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as fh:
        fh.write("".join(f"{line}\n" for line in lines))


def look(s: stamps.Stamps, directory: Path, now: float) -> None:
    s.note(logs.sizes(directory), now)


def stamped(path: Path) -> list[tuple[str, float]]:
    return [(line, t) for seg in logs.tail(path, None) for line, t in zip(seg.lines, seg.times)]


def test_a_line_is_stamped_with_the_first_look_that_saw_it_and_the_rest_with_the_mtime(tmp_path):
    live = tmp_path / "g.t.log"
    s = stamps.Stamps(tmp_path)
    append(live, "a", "b")
    look(s, tmp_path, 1000.0)
    look(s, tmp_path, 1001.0)  # unchanged: no entry
    append(live, "c")
    look(s, tmp_path, 1002.0)
    append(live, "d")  # written after the last look
    os.utime(live, (1003.5, 1003.5))
    assert stamps.read(stamps.index_path(live)) == [(4, 1000.0), (6, 1002.0)]
    assert stamped(live) == [("a", 1000.0), ("b", 1000.0), ("c", 1002.0), ("d", 1003.5)]
    assert [seg.times for seg in logs.tail(live, 2)] == [(1002.0, 1003.5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".g.t.log.times", "g.t.log"]
    assert logs.due(logs.sizes(tmp_path), logs.Policy(max_bytes=1, keep=1)) == ["g.t.log"]  # the index is no log


def test_a_rotation_moves_the_index_with_the_copy_and_the_live_log_starts_a_new_one(tmp_path):
    live = tmp_path / "g.t.log"
    s = stamps.Stamps(tmp_path)
    policy = logs.Policy(max_bytes=1, keep=2)
    append(live, "one")
    look(s, tmp_path, 100.0)
    logs.rotate(live, policy)
    s.forget("g.t.log")
    append(live, "two")
    look(s, tmp_path, 200.0)
    logs.rotate(live, policy)
    s.forget("g.t.log")
    append(live, "three")
    look(s, tmp_path, 300.0)
    assert stamped(live) == [("one", 100.0), ("two", 200.0), ("three", 300.0)]
    assert stamps.read(stamps.index_path(tmp_path / "g.t.log.2")) == [(4, 100.0)]
    logs.rotate(live, policy)  # the oldest copy goes, and its index with it
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".g.t.log.1.times", ".g.t.log.2.times", "g.t.log", "g.t.log.1", "g.t.log.2"]
    assert [line for line, _ in stamped(live)] == ["two", "three"]
    # a segment without an index (its copy failed, or an older agent rotated it) takes its mtime
    os.unlink(stamps.index_path(tmp_path / "g.t.log.1"))
    os.utime(tmp_path / "g.t.log.1", (350.0, 350.0))
    assert stamped(live) == [("two", 200.0), ("three", 350.0)]


def test_a_log_truncated_behind_the_agents_back_starts_its_index_again(tmp_path):
    live = tmp_path / "g.t.log"
    s = stamps.Stamps(tmp_path)
    append(live, "old", "old")
    look(s, tmp_path, 10.0)
    os.truncate(live, 0)
    append(live, "new")
    look(s, tmp_path, 20.0)
    assert stamps.read(stamps.index_path(live)) == [(4, 20.0)]


def test_after_an_agent_restart_the_index_goes_on_and_lines_written_meanwhile_get_its_first_look(tmp_path):
    live = tmp_path / "g.t.log"
    append(live, "a")
    look(stamps.Stamps(tmp_path), tmp_path, 10.0)
    append(live, "while no agent ran")
    again = stamps.Stamps(tmp_path)  # a new agent: nothing in memory
    look(again, tmp_path, 50.0)
    look(again, tmp_path, 51.0)
    assert stamped(live) == [("a", 10.0), ("while no agent ran", 50.0)]
    assert len(stamps.read(stamps.index_path(live))) == 2


def test_a_long_index_keeps_every_other_entry_and_the_newest(tmp_path, monkeypatch):
    monkeypatch.setattr(stamps, "MAX_ENTRIES", 4)
    live = tmp_path / "g.t.log"
    s = stamps.Stamps(tmp_path)
    for n in range(1, 6):
        append(live, f"line {n}")
        look(s, tmp_path, float(n))
    entries = stamps.read(stamps.index_path(live))
    assert [t for _, t in entries] == [1.0, 3.0, 5.0]
    times = dict(stamped(live))
    assert times == {"line 1": 1.0, "line 2": 3.0, "line 3": 3.0, "line 4": 5.0, "line 5": 5.0}  # coarser, never early
    append(live, "line 6")
    look(stamps.Stamps(tmp_path), tmp_path, 6.0)  # a restart counts what is there
    assert [t for _, t in stamps.read(stamps.index_path(live))] == [1.0, 3.0, 5.0, 6.0]


def test_a_damaged_index_line_is_skipped_and_a_line_without_newline_is_stamped():
    assert stamps.times([3, 7, 9], [(4, 1.0), (8, 2.0)], mtime=5.0) == [1.0, 2.0, 5.0]
    assert stamps.times([3], [(4, 9.0)], mtime=5.0) == [5.0]  # never later than the file was last written
    assert logs._lines(b"a\r\nbc\nd") == (["a", "bc", "d"], [3, 6, 7])


def test_the_rotator_records_the_times_on_its_thread_and_rotates_with_them(tmp_path):
    live = tmp_path / "g.t.log"
    rot = logs.Rotator(tmp_path, logs.Policy(max_bytes=10, keep=1))
    append(live, "short")
    rot.look()
    wait_until(lambda: stamps.read(stamps.index_path(live)), 5, what="the index of times")
    append(live, "long enough to rotate")
    # the pass that rotates records the size it rotates at first; the index goes with the copy
    copied = stamps.index_path(tmp_path / "g.t.log.1")
    wait_until(lambda: rot.look() or (copied.exists() and live.stat().st_size == 0), 5, what="a rotation")
    assert [size for size, _ in stamps.read(copied)] == [6, 28]
    append(live, "after")
    wait_until(lambda: rot.look() or stamps.read(stamps.index_path(live)), 5, what="a new index for the live log")
    assert [line for line, _ in stamped(live)] == ["short", "long enough to rotate", "after"]


def test_an_index_line_being_written_is_not_read_and_a_failed_append_starts_the_index_again(tmp_path):
    live = tmp_path / "g.t.log"
    index = stamps.index_path(live)
    index.write_text("4 10.000\n8 2")  # the second line half written: not "8 2.0"
    assert stamps.read(index) == [(4, 10.0)]
    index.unlink()
    append(live, "a")
    s = stamps.Stamps(tmp_path)
    look(s, tmp_path, 10.0)
    append(live, "b", "c")
    index.unlink()
    index.symlink_to("/dev/full")  # the append fails (refused: a symlink; through it, ENOSPC)
    with pytest.raises(OSError):
        look(s, tmp_path, 20.0)
    assert not index.is_symlink()  # whatever was cut short is gone
    look(s, tmp_path, 30.0)
    assert stamps.read(index) == [(6, 30.0)]  # later than the truth, never earlier
    index.unlink()
    index.symlink_to("/dev/zero")  # not followed, neither read nor written; then replaced
    assert stamps.read(index) == []
    again = stamps.Stamps(tmp_path)
    with pytest.raises(OSError):
        look(again, tmp_path, 40.0)
    look(again, tmp_path, 50.0)
    assert stamps.read(index) == [(6, 50.0)]
