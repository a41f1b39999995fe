"""The cluster as this node sees it: membership, liveness, this node's lease and its
renewal -> ClusterView.

    liveness.py   store snapshots -> ClusterView, heartbeats timed on this node's clock
    hpc.py        /proc/hpc membership (OpenMosix)
    lease.py      this node's lease: lease_until, the claims that outlived a lapse, the lock
    leasefile.py  the lease file the keeper watches
    instance.py   node identity: this agent's instance id, what it saw of its own record
    watch.py      the current ClusterView, and whether a read should wake the loop
    renewal.py    the renewer thread: publish, extend the lease, read into the watch
    survey.py     a look from outside an agent (status, dry run): which members are alive

The decisions they need (stale claims, an overdue read, a stalled loop, quorum) are pure
functions in reconciler/decide/view.py.
"""
