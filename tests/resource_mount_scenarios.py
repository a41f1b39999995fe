"""Mount scenarios for tests/test_mounts.py, each run in its own private mount namespace.

Usage (as root): unshare -m --propagation private python3 resource_mount_scenarios.py NAME WORKDIR

It refuses to run in its parent's mount namespace, so the host mount table is never
touched. Exit status 0 and "ok" on the last line mean the scenario held.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from reconciler.act import mounts as act
from reconciler.act import resources
from reconciler.act.resources import ResourceError
from reconciler.observe import mounts as obs
from reconciler.spec import Entry, Mount


def entry(tag: str, **kw) -> Entry:
    return Entry(tag=tag, runlevels=("up",), mount=Mount(**kw))


def state(e: Entry) -> tuple[str, str]:
    st = obs.observe([e], group_of={e.tag: "g"})[e.tag]
    assert st.group == "g" and st.kind == "mount", st
    return st.state, st.message


def expect_error(fn, *args, permanent: bool, contains: str, **kw) -> ResourceError:
    try:
        fn(*args, **kw)
    except ResourceError as exc:
        assert exc.permanent is permanent, (exc, permanent)
        assert contains in str(exc), (str(exc), contains)
        return exc
    raise AssertionError(f"{fn.__name__} did not raise (expected {contains!r})")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def line_for(target: Path) -> str:
    lines = [ln for ln in open("/proc/self/mountinfo") if f" {target} " in ln]
    return lines[-1] if lines else ""


# --- scenarios ----------------------------------------------------------------------------


def tmpfs(work: Path) -> None:
    target = work / "a" / "b" / "tmp"  # absent: mkdir = true creates it
    e = entry("t", source="rtest", target=str(target), fstype="tmpfs", options="size=1m,mode=0750,nosuid,nodev,defaults,nofail")
    assert state(e) == ("stopped", ""), state(e)
    act.mount(e, deadline=5)
    assert state(e) == ("running", ""), state(e)
    assert resources.observe([e]) == {"t": ("running", "")}
    act.mount(e, deadline=5)  # idempotent
    (target / "f").write_text("x")
    sh("umount", str(target))  # someone else unmounts it
    assert state(e)[0] == "stopped"
    asyncio.run(resources.start(e, deadline=5))
    assert state(e) == ("running", ""), state(e)
    assert not (target / "f").exists()  # a fresh tmpfs
    asyncio.run(resources.stop(e, deadline=5))
    assert state(e)[0] == "stopped"
    act.unmount(e, deadline=5)  # idempotent


def bind(work: Path) -> None:
    src, other, dst = work / "src", work / "other", work / "dst"
    for d in (src, other):
        d.mkdir()
    (src / "data").write_text("hello")
    e = entry("b", source=str(src), target=str(dst), options="bind")
    act.mount(e, deadline=5)
    assert state(e) == ("running", ""), state(e)
    assert (dst / "data").read_text() == "hello"
    # Same target, another source directory on the same filesystem: device+root differ.
    wrong = entry("w", source=str(other), target=str(dst), options="bind")
    st, msg = state(wrong)
    assert st == "mismatch" and "directory" in msg, (st, msg)
    expect_error(act.mount, wrong, permanent=True, contains="not replacing", deadline=2)
    # Read-only requested, read-write in effect: a remount,bind fixes the per-mount flag.
    ro = entry("r", source=str(src), target=str(dst), options="bind,ro")
    st, msg = state(ro)
    assert st == "mismatch" and "ro requested, rw in effect" in msg, (st, msg)
    act.mount(ro, deadline=5)
    assert state(ro) == ("running", ""), state(ro)
    try:
        (dst / "new").write_text("x")
        raise AssertionError("write on a read-only bind succeeded")
    except OSError as exc:
        assert exc.errno == 30, exc  # EROFS
    act.unmount(ro, deadline=5)
    assert state(e)[0] == "stopped"
    # A bind of a single file: the target file is created.
    fe = entry("f", source=str(src / "data"), target=str(work / "files" / "data"), options="bind")
    act.mount(fe, deadline=5)
    assert state(fe) == ("running", ""), state(fe)
    assert (work / "files" / "data").read_text() == "hello"
    act.unmount(fe, deadline=5)


def options(work: Path) -> None:
    target = work / "opt"
    target.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "rtest", str(target))
    e = entry("o", source="rtest", target=str(target), fstype="tmpfs", options="size=2m")
    st, msg = state(e)
    assert st == "mismatch" and "size=2m requested, size=1024k in effect" in msg, (st, msg)
    act.mount(e, deadline=5)
    assert state(e) == ("running", ""), state(e)
    assert "size=2048k" in line_for(target), line_for(target)
    # tmpfs applies mode only when mounting: a remount cannot fix it, and says so.
    mode = entry("m", source="rtest", target=str(target), fstype="tmpfs", options="size=2m,mode=0700")
    expect_error(act.mount, mode, permanent=True, contains="remount did not take effect: ", deadline=2)
    ro = entry("ro", source="rtest", target=str(target), fstype="tmpfs", options="ro,size=2m")
    st, msg = state(ro)
    assert st == "mismatch" and "ro requested, rw in effect" in msg, (st, msg)
    act.mount(ro, deadline=5)
    assert state(ro) == ("running", ""), state(ro)
    assert line_for(target).split()[5].startswith("ro"), line_for(target)
    # A different filesystem at the target is a mismatch that mount() will not paper over.
    other = entry("x", source="elsewhere", target=str(target), fstype="tmpfs")
    st, msg = state(other)
    assert st == "mismatch" and "source is rtest, not elsewhere" in msg, (st, msg)
    expect_error(act.mount, other, permanent=True, contains="source is rtest", deadline=2)
    act.unmount(other, deadline=2)  # not this entry's mount: left alone
    assert state(ro)[0] == "running"
    act.unmount(ro, deadline=5)
    assert state(ro)[0] == "stopped"


HOLD_CWD = "import os,signal,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); os.chdir(sys.argv[1]); print('r', flush=True); time.sleep(60)"
HOLD_FD = "import sys,time; f=open(sys.argv[1]+'/held','w'); print('r', flush=True); time.sleep(60)"
HOLD_MAP = ("import mmap,sys,time; f=open(sys.argv[1]+'/mapped','w+b'); f.write(b'x'*4096); f.flush();"
            " m=mmap.mmap(f.fileno(), 4096); f.close(); print('r', flush=True); time.sleep(60)")


def busy(work: Path) -> None:
    target = work / "busy"
    e = entry("busy", source="rtest", target=str(target), fstype="tmpfs", kill_users=False)
    act.mount(e, deadline=5)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
             for code in (HOLD_CWD, HOLD_FD, HOLD_MAP)]
    for p in procs:
        assert p.stdout.readline().strip() == "r"
    pids = sorted(p.pid for p in procs)
    assert act.holders(str(target)) == pids, (act.holders(str(target)), pids)
    t = time.monotonic()
    exc = expect_error(act.unmount, e, permanent=False, contains="busy: pids ", deadline=1.0)
    assert str(exc) == "busy: pids " + " ".join(map(str, pids)), str(exc)
    assert time.monotonic() - t < 3, "the deadline bounds the retries"
    assert state(e)[0] == "running"
    assert all(p.poll() is None for p in procs), "kill_users = false must not kill"
    killer = entry("busy", source="rtest", target=str(target), fstype="tmpfs", kill_users=True)
    asyncio.run(resources.stop(killer, deadline=10))
    assert state(e)[0] == "stopped"
    codes = [p.wait(timeout=5) for p in procs]
    assert codes == [-9, -15, -15], codes  # the cwd holder ignores SIGTERM: it got SIGKILL


def bad_input(work: Path) -> None:
    e = entry("u", source="rtest", target=str(work / "u"), fstype="bogusfs")
    expect_error(act.mount, e, permanent=True, contains="unknown filesystem type 'bogusfs'", deadline=5)
    e = entry("d", source="/dev/nope", target=str(work / "d"), fstype="ext4")
    exc = expect_error(act.mount, e, permanent=True, contains="special device /dev/nope does not exist", deadline=5)
    assert str(exc) == f"mount: {work / 'd'}: special device /dev/nope does not exist", str(exc)
    e = entry("n", source="rtest", target=str(work / "nodir"), fstype="tmpfs", mkdir=False)
    expect_error(act.mount, e, permanent=True, contains="mount point does not exist", deadline=5)
    t = time.monotonic()
    try:
        asyncio.run(resources.start(entry("u2", source="x", target=str(work / "u2"), fstype="bogusfs"), deadline=5))
        raise AssertionError("start did not raise")
    except ResourceError as exc:
        assert exc.permanent and "unknown filesystem type" in str(exc), exc
    assert time.monotonic() - t < 2, "a permanent error is not retried"


def loop(work: Path) -> None:
    image = work / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(16 << 20)
    sh("mkfs.ext4", "-q", "-F", str(image))
    e = entry("l", source=str(image), target=str(work / "disk"), fstype="ext4", options="loop,noatime")
    act.mount(e, deadline=10)
    assert state(e) == ("running", ""), state(e)
    info = obs.find(obs.read(), str(work / "disk"))
    assert info.source.startswith("/dev/loop") and info.fstype == "ext4", info
    # The loop device itself (a block device) names the same filesystem.
    same = entry("l2", source=info.source, target=str(work / "disk"), fstype="ext4")
    assert state(same) == ("running", ""), state(same)
    act.unmount(e, deadline=10)
    assert state(e)[0] == "stopped"


SCENARIOS = {f.__name__: f for f in (tmpfs, bind, options, busy, bad_input, loop)}


def main() -> None:
    name, work = sys.argv[1], Path(sys.argv[2])
    if os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt"):
        sys.exit("refusing to run: not in a private mount namespace (use unshare -m --propagation private)")
    SCENARIOS[name](work)
    print("ok")


if __name__ == "__main__":
    main()
