"""The systemd notification client: sd_notify(3) in a few lines, without libsystemd.

Under `Type=notify` systemd passes a datagram socket in $NOTIFY_SOCKET; the agent says
READY=1 once it runs, WATCHDOG=1 at least every half of the watchdog interval (systemd kills
and restarts an agent that stops pinging: a hung loop is a failure, as a crash is), and
STOPPING=1 when it begins to shut down. Without $NOTIFY_SOCKET (not under systemd, or in a
test) every call is a no-op that returns False, so callers never need to check first.

A failed send is logged and reported as False, never raised: losing one notification must not
take the agent down, and a missed watchdog ping is exactly what systemd is there to notice.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Variables that systemd sets for the agent alone. Children the agent starts must not inherit
# them: a service that speaks sd_notify would otherwise report READY or WATCHDOG for the agent
# (NotifyAccess=main makes systemd drop such messages, but they still confuse the journal).
AGENT_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def address(environ: Mapping[str, str] | None = None) -> str | None:
    """The socket address in $NOTIFY_SOCKET; '@name' is Linux's abstract namespace."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset, empty, or a transport we do not speak (vsock:)


def send(*fields: str) -> bool:
    """Send one notification made of KEY=VALUE fields; True when a datagram left."""
    addr = address()
    if addr is None:
        return False
    message = "\n".join(fields).encode()
    try:
        # Non-blocking: a full socket (a systemd that does not read it for a while) costs this
        # one notification, never a stalled event loop and with it the lease.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(addr)
            sock.send(message)
    except OSError as exc:
        log.warning("sd_notify %s to %s failed: %s", fields, os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _one_line(text: str) -> str:
    # a newline would start a new field that systemd would read as an assignment
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    fields = ["READY=1"]
    if status_text:
        fields.append("STATUS=" + _one_line(status_text))
    return send(*fields)


def watchdog() -> bool:
    return send("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    fields = ["STOPPING=1"]
    if status_text:
        fields.append("STATUS=" + _one_line(status_text))
    return send(*fields)


def status(text: str) -> bool:
    """The one-line status that `systemctl status` shows."""
    return send("STATUS=" + _one_line(text))


class StatusLine:
    """STATUS= whenever the text changes, at most once per `every` seconds: the agent offers
    its summary after every pass (many a second while busy); a change that comes too soon
    after the last one sent is sent by a later offer (at least one a tick). `now`: monotonic
    seconds, the caller's."""

    def __init__(self, *, every: float = 1.0, send: Callable[[str], bool] | None = None):
        self._every = every
        self._send = send if send is not None else status
        self.text = ""  # the last text sent
        self._sent_at = float("-inf")

    def sent(self, text: str, now: float) -> None:
        """`text` went out another way (with READY=1)."""
        self.text, self._sent_at = text, now

    def offer(self, text: str, now: float) -> bool:
        """Send `text` if it is new and the last send is `every` seconds old; True if sent."""
        if text == self.text or now - self._sent_at < self._every:
            return False
        self._send(text)
        self.text, self._sent_at = text, now
        return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog watches this process.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; a child that inherited
    the variables must not act on them. Ping at least every half of the returned interval.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def child_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the variables meant for the agent alone."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k not in AGENT_ONLY}
