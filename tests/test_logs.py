"""Entry logs rotated by size (reconciler/act/logs.py; issue 12, "Logs cannot fill the state
directory"): the policy, copytruncate on real files, a full disk, and a chatty entry run by
a real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import wait_until
from reconciler.act import logs, stamps

KIB = 1024


def test_policy_from_the_environment():
    assert logs.Policy.from_env({}) == logs.Policy(max_bytes=10 * 1024 * KIB, keep=3)
    assert logs.Policy.from_env({"RECONCILER_LOG_MAX_BYTES": "512K", "RECONCILER_LOG_KEEP": "5"}) == logs.Policy(512 * KIB, 5)
    assert logs.Policy.from_env({"RECONCILER_LOG_MAX_BYTES": "2MB"}).max_bytes == 2 * 1024 * KIB
    assert logs.Policy.from_env({"RECONCILER_LOG_MAX_BYTES": "1000"}).max_bytes == 1000
    assert logs.Policy.from_env({"RECONCILER_LOG_MAX_BYTES": "lots", "RECONCILER_LOG_KEEP": "-1"}) == logs.Policy()


def test_due_is_by_size_and_only_live_logs():
    p = logs.Policy(max_bytes=100, keep=2)
    sizes = {"g.a.log": 100, "g.b.log": 99, "g.a.log.1": 500, "notes.txt": 1000, "g.c.log": 10**9}
    assert logs.due(sizes, p) == ["g.a.log", "g.c.log"]
    assert logs.due(sizes, logs.Policy(max_bytes=0, keep=2)) == []


def test_rotation_shifts_copies_keeps_n_and_truncates_in_place(tmp_path):
    p = logs.Policy(max_bytes=10, keep=2)
    live = tmp_path / "g.t.log"
    # The writer keeps an O_APPEND descriptor across rotations, as an entry's process does.
    fd = os.open(live, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for n in range(4):
            os.write(fd, f"round {n} " .encode() * 3)
            assert logs.rotate_all(tmp_path, p) == ["g.t.log"]
            assert live.stat().st_size == 0
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert live.read_bytes() == b"after"  # O_APPEND: written at the new end, no hole
    assert (tmp_path / "g.t.log.1").read_bytes() == b"round 3 " * 3
    assert (tmp_path / "g.t.log.2").read_bytes() == b"round 2 " * 3
    assert not (tmp_path / "g.t.log.3").exists()
    assert (tmp_path / "g.t.log.1").stat().st_mode & 0o777 == 0o600
    assert logs.rotate_all(tmp_path, p) == []  # "after" is under max_bytes
    assert sorted(os.listdir(tmp_path)) == ["g.t.log", "g.t.log.1", "g.t.log.2"]  # no temporary files


def test_keep_zero_only_truncates(tmp_path):
    (tmp_path / "g.t.log").write_bytes(b"x" * 100)
    assert logs.rotate_all(tmp_path, logs.Policy(max_bytes=50, keep=0)) == ["g.t.log"]
    assert os.listdir(tmp_path) == ["g.t.log"] and (tmp_path / "g.t.log").stat().st_size == 0


@pytest.mark.integration
@pytest.mark.needs("root", "unshare", "mount")
def test_a_full_disk_truncates_without_a_copy(tmp_path):
    """On a tmpfs with no room for the copy: the copy is dropped (no partial file left), the
    live file truncated anyway, the problem reported, nothing raised."""
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from reconciler.act import logs
        d = Path({str(tmp_path / "fs")!r})
        (d / "g.t.log").write_bytes(b"y" * 700 * 1024)
        (d / "g.t.log.1").write_bytes(b"old")
        print(logs.rotate(d / "g.t.log", logs.Policy(max_bytes=1024, keep=2)))
        print(sorted((n, (d / n).stat().st_size) for n in os.listdir(d)))
    """)
    (tmp_path / "fs").mkdir()
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f'mount -t tmpfs -o size=1m tmpfs {tmp_path / "fs"} && exec "$@"', "sh", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    problems, files = r.stdout.splitlines()
    assert "No space left on device: truncated without one" in problems
    assert files == "[('g.t.log', 0), ('g.t.log.2', 3)]"


CHATTY = """
[groups.chat]
runlevel = "run"

[[groups.chat.entries]]
tag = "talk"
mode = "respawn"
runlevels = ["run"]
command = 'while :; do head -c 50000 /dev/zero | tr "\\\\0" x; echo; sleep 0.05; done'
"""


def test_a_chatty_entry_cannot_fill_the_state_directory(make_cluster, tmp_path):
    """About 1 MB/s of output, RECONCILER_LOG_MAX_BYTES=256K, RECONCILER_LOG_KEEP=2: the
    entry's logs stay within about three times the size plus a tick's output, the same
    process keeps writing, and the newest copy holds its output."""
    c = make_cluster(nodes=("n1",), groups=CHATTY, env={"RECONCILER_LOG_MAX_BYTES": "256K", "RECONCILER_LOG_KEEP": "2"})
    c.start()
    d = tmp_path / "state" / "n1" / "logs"
    live = d / "chat.talk.log"
    def pid():
        try:
            records = json.loads((d.parent / "processes.json").read_text())["records"]
        except (OSError, ValueError):
            return None
        return next((r["pid"] for r in records if r["tag"] == "talk" and r["state"] == "running"), None)

    first = wait_until(pid, 10, what="talk running")
    wait_until(lambda: (d / "chat.talk.log.2").exists(), 15, what="two rotations")
    t0 = time.monotonic()
    peak = 0
    while time.monotonic() - t0 < 4.0:
        used = sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.name.startswith("chat.talk.log"))
        peak = max(peak, used)
        time.sleep(0.05)  # sampling the peak over 4 s of output: the time passing is the test
    # Written meanwhile: ~4 MB. Kept: live + 2 copies of <= 256K + one tick (~1 MB) each.
    assert peak < 3 * 1024 * KIB, peak
    assert not (d / "chat.talk.log.3").exists()
    assert sorted(f.name for f in d.iterdir() if f.name.startswith("chat.talk")) == [
        "chat.talk.log", "chat.talk.log.1", "chat.talk.log.2"]
    assert b"x" * 1000 in (d / "chat.talk.log.1").read_bytes()
    assert pid() == first, "the same process writes on: rotation needs no restart"
    # the agent's index of times (act/stamps.py) went with the copy: its lines have stamps
    # (waited for: a rotation under way moves the copy first, then its index)
    wait_until(lambda: stamps.read(stamps.index_path(d / "chat.talk.log.1")), 3, what="the copy's index of times")
    size = live.stat().st_size
    wait_until(lambda: live.stat().st_size != size, 3, what="the entry to keep writing to the live file")
