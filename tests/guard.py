"""A test resource that reports when it runs, for the safety checker.

    python3 guard.py LOG

Appends `start`, then `alive` every 10 ms, then `stop` (on SIGTERM) records to LOG under an
flock: `<monotonic> <event> <node> <group> <pid> <generation> <pid namespace>`. A SIGKILLed
guard writes no `stop`; its last `alive` bounds when it ended (the checker adds the interval).
The pid namespace tells apart two agents with the same node name (a cloned VM).
"""

import fcntl
import os
import signal
import sys
import time

ALIVE_EVERY = 0.01


def main() -> None:
    log = sys.argv[1]
    node = os.environ.get("RECONCILER_NODE", "?")
    if os.environ.get("RECONCILER_TEST_MACHINE"):  # a second agent under the same name (cluster.add_twin)
        node += "@" + os.environ["RECONCILER_TEST_MACHINE"]
    group = os.environ.get("RECONCILER_GROUP", "?")
    gen = os.environ.get("RECONCILER_GENERATION", "-")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pidns = os.readlink("/proc/self/ns/pid").strip("pid:[]")

    def record(event: str) -> None:
        line = f"{time.monotonic():.6f} {event} {node} {group} {os.getpid()} {gen} {pidns}\n".encode()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.write(fd, line)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def on_term(_sig, _frame):
        record("stop")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    record("start")
    while True:
        time.sleep(ALIVE_EVERY)
        record("alive")


if __name__ == "__main__":
    main()
