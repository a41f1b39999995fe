"""PID 1 of a test node's pid namespace when the node must survive its agent (tests/cluster.py).

    python3 nodeinit.py HOLD_FILE NODE_STATE_DIR AGENT_ARGV...

Runs the agent as its child, as systemd runs it with `KillMode=process` (contrib/systemd): an
agent SIGKILLed on its own leaves its children and its keeper running, reparented to this
process, which reaps them. What happens then depends on HOLD_FILE:

- it exists: the agent was killed on purpose to be restarted (Node.kill_agent). Wait until
  HOLD_FILE is removed (Node.respawn_agent), then start the agent again with the same argv
  (systemd's `Restart=on-failure`), in the same namespaces and cgroup as the first.
- it does not: the node dies with its agent. This process exits, the kernel SIGKILLs every
  other process of the namespace, and `unshare` exits: kill -9 of the agent (Node.crash)
  still crashes the whole node, a clean exit (SIGTERM) still ends it.

SIGTERM, SIGINT and SIGHUP sent to this process are passed on to the agent. When the node
ends other than by a clean exit of its agent, the reason and the keeper's log (which lives
in NODE_STATE_DIR, a tmpfs that ends with the node) go to stderr: the node's console.
"""

from __future__ import annotations

import os
import signal
import sys
import time

HELD_POLL = 0.005


def spawn(argv: list[str]) -> int:
    return os.posix_spawnp(argv[0], argv, os.environ, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


def last_words(state: str, why: str) -> None:
    try:
        with open(os.path.join(state, "keeper.log")) as fh:
            keeper = fh.read()
    except OSError as exc:
        keeper = f"({exc})\n"
    sys.stderr.write(f"nodeinit: {why}: the node ends. keeper.log:\n{keeper}")
    sys.stderr.flush()


def main() -> int:
    hold, state, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    agent: int | None = spawn(argv)

    def forward(sig, _frame):
        if agent is not None:
            try:
                os.kill(agent, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        if agent is None:  # held: reap orphans until the harness lets the agent start again
            if not os.path.exists(hold):
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
        code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        if code != 0:
            how = f"exited {code}" if os.WIFEXITED(status) else f"killed by signal {os.WTERMSIG(status)}"
            last_words(state, f"agent pid {pid} {how}")
        return code


if __name__ == "__main__":
    sys.exit(main())
