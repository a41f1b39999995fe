"""A fence hook for tests: asks the test harness (outside every node's pid namespace) to
power a test node off, and waits for the answer.

    python3 fence_kill.py REQUESTS_DIR NODE

Appends its argv to REQUESTS_DIR/fence.log, creates REQUESTS_DIR/request-NODE and waits up to
5 s for REQUESTS_DIR/done-NODE. Exit 0 only when the harness confirms the node is gone.
"""

import os
import sys
import time

requests, node = sys.argv[1], sys.argv[2]
with open(os.path.join(requests, "fence.log"), "a") as fh:
    fh.write(" ".join(sys.argv[1:]) + "\n")
open(os.path.join(requests, f"request-{node}"), "w").close()
done = os.path.join(requests, f"done-{node}")
for _ in range(500):
    if os.path.exists(done):
        sys.exit(0)
    time.sleep(0.01)
sys.exit(1)
