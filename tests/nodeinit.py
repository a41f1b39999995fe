"""PID 1 of a test node's pid namespace when the node must survive its agent (tests/cluster.py).

    python3 nodeinit.py HOLD_FILE NODE_STATE_DIR AGENT_ARGV...

Runs the agent as its child, as systemd runs it with `KillMode=process` and
`Restart=on-failure` (contrib/systemd): an agent that dies on its own leaves its children
and its keeper running, reparented to this process, which reaps them. Then:

- the agent was SIGKILLed and HOLD_FILE exists: it was killed on purpose to be restarted
  (Node.kill_agent). Wait until HOLD_FILE is removed (Node.respawn_agent), then start the
  agent again with the same argv, in the same namespaces and cgroup as the first.
- the agent exited with a non-zero code (a traceback): start it again after RESTART_SEC
  (systemd's RestartSec), and not before HOLD_FILE is gone.
- otherwise (a clean exit, or a kill -9 without HOLD_FILE: Node.crash) the node ends with
  its agent. This process exits, the kernel SIGKILLs every other process of the namespace,
  and `unshare` exits.

SIGTERM, SIGINT and SIGHUP sent to this process are passed on to the agent, and the node
then ends with that agent however it exits after a SIGTERM or SIGINT (a stop is not a failure
to restart from). An agent's
failure, and the end of a node other than by a clean exit, go to stderr (the node's console)
with the keeper's log, which lives in NODE_STATE_DIR, a tmpfs that ends with the node.
"""

from __future__ import annotations

import os
import signal
import sys
import time

HELD_POLL = 0.005
RESTART_SEC = 1.0  # contrib/systemd/reconciler.service: RestartSec=1s


def spawn(argv: list[str]) -> int:
    return os.posix_spawnp(argv[0], argv, os.environ, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


def last_words(state: str, why: str) -> None:
    try:
        with open(os.path.join(state, "keeper.log")) as fh:
            keeper = fh.read()
    except OSError as exc:
        keeper = f"({exc})\n"
    sys.stderr.write(f"nodeinit: {why}. keeper.log:\n{keeper}")
    sys.stderr.flush()


def main() -> int:
    hold, state, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    agent: int | None = spawn(argv)

    stopping = []  # a stop was passed on: the node ends with this agent, however it exits

    def forward(sig, _frame):
        if agent is None:
            sys.exit(0)  # a stop while no agent runs (held, or waiting to restart it): the node ends
        if sig != signal.SIGHUP:
            stopping.append(sig)
        try:
            os.kill(agent, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    restart_at = 0.0
    while True:
        if agent is None:  # reap orphans until the agent may start again
            if not os.path.exists(hold) and time.monotonic() >= restart_at:
                agent = spawn(argv)
                continue
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            time.sleep(HELD_POLL)
            continue
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if pid != agent:
            continue  # an orphan of the agent (a former child of a killed agent)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and os.path.exists(hold):
            agent = None
            continue
        if stopping:
            return 0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 1
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
            last_words(state, f"agent pid {pid} exited {os.WEXITSTATUS(status)}: restarted in {RESTART_SEC:g} s")
            agent, restart_at = None, time.monotonic() + RESTART_SEC
            continue
        if os.WIFEXITED(status):
            return 0
        last_words(state, f"agent pid {pid} killed by signal {os.WTERMSIG(status)}: the node ends")
        return 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
