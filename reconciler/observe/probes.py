"""Health probes (issue 16): one asyncio component that probes every running entry with a
`health` table, and the Probe values the observer puts into Observed.

One task per probed entry on the agent's own event loop: tcp and http probes are sockets
of that loop (no thread, no process per probe); a command probe is an asyncio subprocess
run as the entry's user with its environment. Nothing here blocks the loop, and every
probe is bounded by its timeout. The HTTP GET is a few lines on a socket (a request, the
status line) rather than a library: none of the project's dependencies does async
HTTP, and a probe needs only the status code.

A result wakes the reconcile only when it changes what the planner or the status sees (a
failure, a recovery): a healthy entry probed every 2 s costs no reconcile pass. Which
failures count (start_period) is decide/health.counts; what an unhealthy entry means is
the planner's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import pwd
import signal
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable

import attrs

from reconciler import spec as specmod
from reconciler.decide import health
from reconciler.model import EntryState, Probe
from reconciler.spec.rules import split_host_port

log = logging.getLogger("reconciler.observe")
Key = tuple[str, str]
MESSAGE_MAX = 200  # characters of a failed probe's reason kept (a command's last output line)


class Prober:
    def __init__(
        self,
        *,
        node: str,
        on_change: Callable[[], None],
        measured: Callable[[str, str, str, float], None] = lambda group, kind, result, seconds: None,
    ):
        """`on_change`: a result changed (wake the reconcile); `measured(group, kind, result,
        seconds)`: every probe (metrics)."""
        self.node = node
        self.on_change = on_change
        self.measured = measured
        self.results: dict[Key, Probe] = {}
        # key -> (its task, the Health and pid it probes)
        self._tasks: dict[Key, tuple[asyncio.Task[None], specmod.Health, int]] = {}

    def sync(self, spec: specmod.Spec, entries: dict[Key, EntryState]) -> dict[Key, Probe]:
        """Probe exactly the running entries with a health table (a new process or a changed
        probe starts afresh); the current results of those."""
        wanted: dict[Key, tuple[specmod.Entry, EntryState]] = {}
        for g in spec.groups.values():
            for e in g.entries:
                if e.health is None:
                    continue
                st = entries.get((g.name, e.tag))
                if st is not None and st.state == "running" and st.pid:
                    wanted[(g.name, e.tag)] = (e, st)
        for key in list(self._tasks):
            task, h, pid = self._tasks[key]
            w = wanted.get(key)
            if w is None or w[0].health != h or w[1].pid != pid or task.done():
                task.cancel()
                del self._tasks[key]
                self.results.pop(key, None)
        for key, (e, st) in wanted.items():
            if key not in self._tasks:
                assert e.health is not None and st.pid is not None
                self.results[key] = Probe(pid=st.pid)
                task = asyncio.get_running_loop().create_task(self._run(key, e, st), name=f"probe {key[0]}/{key[1]}")
                self._tasks[key] = (task, e.health, st.pid)
        return {k: self.results[k] for k in self._tasks if k in self.results}

    def stop(self) -> None:
        for task, _h, _pid in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    async def _run(self, key: Key, e: specmod.Entry, st: EntryState) -> None:
        h = e.health
        assert h is not None
        started = st.since  # monotonic: when the process started
        due = _slot(time.monotonic() + h.interval, h.interval)
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            t0 = time.monotonic()
            due = _slot(due + h.interval, h.interval)  # (timeout < interval: a probe ends before the next is due)
            try:
                # A tcp probe of an IP literal starts its connect here: a refusal (nothing
                # listens) is known at once, with no timeout and no await; a connect under
                # way, and every other probe, waits on the loop, bounded by the timeout.
                quick = _tcp_now(h) if h.tcp is not None else None
                if isinstance(quick, str):
                    message = quick
                else:
                    async with asyncio.timeout(h.timeout):
                        message = await probe(h, e, group=key[0], node=self.node, pending=quick)
            except TimeoutError:
                message = f"timed out after {specmod.format_duration(h.timeout)}"
            except OSError as exc:  # (asyncio's connect errors carry "Connect call failed": the errno says it better)
                message = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            except Exception as exc:  # a probe must never end its task: that is a failure too
                message = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            old = self.results.get(key, Probe(pid=st.pid))
            ok = message == ""
            if ok:  # (the common case, built directly: attrs.evolve costs several times more)
                new = Probe(pid=old.pid, failures=0, result="ok", at=now, since=old.since if old.result == "ok" else now,
                            message="", passed=True, seconds=now - t0)
            else:
                counted = health.counts(h, started=started, at=t0, passed=old.passed)
                new = attrs.evolve(old, failures=old.failures + (1 if counted else 0), result="fail", at=now,
                                   message=message[:MESSAGE_MAX], seconds=now - t0,
                                   since=old.since if old.result == "fail" else now)
            self.results[key] = new
            self.measured(key[0], h.kind, new.result, now - t0)
            if (new.result, new.failures, new.message) != (old.result, old.failures, old.message):
                if not ok:  # the first failure in a row at INFO, the next ones (the restart follows) at DEBUG
                    log.log(logging.INFO if old.result != "fail" else logging.DEBUG, "%s/%s: %s probe failed (%d in a row%s): %s", key[0], key[1], h.kind, new.failures,
                             "" if counted else ", within start_period", new.message, extra={"group": key[0], "tag": key[1]})
                self.on_change()


def _slot(t: float, interval: float) -> float:
    """`t` rounded to a grid of interval/20 (at most 100 ms): probes of many entries fall due
    together and share the loop's wake-ups. Up to 2 s the interval is a whole number of grid
    steps, so the gaps stay exact; beyond, a gap is off by at most half a step, and the next
    gap makes up for it."""
    grid = min(0.1, interval / 20)
    return round(t / grid) * grid


async def probe(h: specmod.Health, e: specmod.Entry, *, group: str, node: str,
                pending: tuple[socket.socket, tuple[str, int]] | None = None) -> str:
    """One probe: "" if healthy, else why not (the caller bounds it by h.timeout).
    `pending`: a tcp probe's connect that _tcp_now started."""
    if h.tcp is not None:
        if pending is not None:
            sock, addr = pending
            try:
                await asyncio.get_running_loop().sock_connect(sock, addr)
            finally:
                _reset(sock)
            return ""
        host, port = split_host_port(h.tcp) or ("", 0)
        sock = await _connect(host, port)
        _reset(sock)
        return ""
    if h.http is not None:
        return await _http(h.http, h.status)
    assert h.command is not None
    return await _command(h.command, e, group=group, node=node)


# Plain non-blocking sockets driven by the loop's sock_* calls, not asyncio streams: a probe
# is one connect (and for http one request and one status line), and a transport, a
# protocol and a StreamReader per probe cost several times the CPU (100 probed groups every
# 2 s: tests/bench/health.py idle).
@functools.lru_cache(maxsize=4096)
def _literal(host: str, port: int) -> tuple[int, tuple[str, int]] | None:
    """(family, address) of an IP literal (parsed once, not at every probe); None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (str(ip), port)


def _tcp_now(h: specmod.Health) -> str | tuple[socket.socket, tuple[str, int]] | None:
    """A tcp probe of an IP literal, as far as it goes without waiting: "" (connected), why
    it failed (refused, unreachable), or the socket and address whose connect is under way
    (probe(pending=...) waits for it); None: a name, resolved on the way (probe)."""
    assert h.tcp is not None
    host, port = split_host_port(h.tcp) or ("", 0)
    known = _literal(host, port)
    if known is None:
        return None
    family, addr = known
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN, errno.EINTR):
        return sock, addr
    _reset(sock)
    return "" if err in (0, errno.EISCONN) else os.strerror(err)


async def _connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    known = _literal(host, port)
    if known is None:  # a name: resolved by the loop's resolver (a thread), as asyncio does
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        known = infos[0][0], (str(infos[0][4][0]), int(infos[0][4][1]))
    family, addr = known
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        # A connect that is decided at once (refused, or done) needs no future and no
        # selector registration; one under way (EINPROGRESS) is the loop's to wait for.
        err = sock.connect_ex(addr)
        if err not in (0, errno.EISCONN):
            if err not in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN, errno.EINTR):
                raise OSError(err, os.strerror(err))
            await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


_LINGER_0 = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as HAProxy's checks do: no FIN exchange and no
    TIME_WAIT socket left behind per probe (100 probed groups every 2 s would keep ~3,000)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    except OSError:
        pass
    sock.close()


async def _http(url: str, accept: tuple[int, int]) -> str:
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    port = u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    hostport = f"[{host}]" if ":" in host else host
    if u.port:
        hostport += f":{u.port}"
    loop = asyncio.get_running_loop()
    sock = await _connect(host, port)
    try:
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: reconciler-probe\r\n"
                                      "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii", "replace"))
        line = b""
        while b"\n" not in line and len(line) < 1024:
            chunk = await loop.sock_recv(sock, 1024)
            if not chunk:
                break
            line += chunk
    finally:
        _reset(sock)
    line = line.split(b"\n", 1)[0] + (b"\n" if b"\n" in line else b"")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return "no HTTP status line" if not line else f"not an HTTP status line: {line[:60]!r}"
    code = int(parts[1])
    if not accept[0] <= code <= accept[1]:
        return f"status {code} ({accept[0]}-{accept[1]} expected)"
    return ""


async def _command(argv: tuple[str, ...], e: specmod.Entry, *, group: str, node: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")}
    kw: dict[str, object] = {}
    if e.user is not None:
        pw = pwd.getpwuid(int(e.user)) if e.user.isdigit() else pwd.getpwnam(e.user)
        gid = _gid(e.group) if e.group is not None else pw.pw_gid
        kw = {"user": pw.pw_uid, "group": gid, "extra_groups": os.getgrouplist(pw.pw_name, gid)}
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    elif e.group is not None:
        kw = {"group": _gid(e.group)}
    env.update(dict(e.env))
    env.update(RECONCILER_NODE=node, RECONCILER_GROUP=group, RECONCILER_TAG=e.tag, RECONCILER_PROBE="1")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=env, cwd=e.cwd, start_new_session=True, **kw,  # type: ignore[arg-type]
    )
    try:
        out, _ = await proc.communicate()
    except BaseException:  # the timeout (a cancel): the probe and whatever it started go
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        await proc.wait()
        raise
    if proc.returncode == 0:
        return ""
    last = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
    code = proc.returncode
    what = f"exit {code}" if code is not None and code >= 0 else f"killed by signal {-(code or 0)}"
    return what + (f": {last[0][:MESSAGE_MAX]}" if last else "")


def _gid(group: str) -> int:
    import grp

    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
