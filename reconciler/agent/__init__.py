"""The agent: the loop that composes every stage on one node, and what it shows outside.

    loop.py     Agent: observe -> plan -> execute -> publish, woken by any change
    status.py   the status document a node publishes, and `reconcile status`
    metrics.py  Prometheus metrics
    dryrun.py   `reconcile --dry-run`: the same observe and plan, executing nothing
"""
