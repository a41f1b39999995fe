"""The agent: the loop that composes every stage on one node, and what it shows outside.

    loop.py     Agent: observe -> plan -> execute -> publish, woken by any change
    status.py   the status document a node publishes, and `reconcile status`'s overview from them
    overview.py `reconcile status`: its document, the judgements (group state, --check) and text
    metrics.py  Prometheus metrics
    dryrun.py   `reconcile --dry-run`: the same observe and plan, executing nothing
"""
