"""The cluster as this node sees it: membership, liveness, this node's lease and its
renewal -> ClusterView.

    liveness.py   store snapshots -> ClusterView, heartbeats timed on this node's clock
    hpc.py        /proc/hpc membership (OpenMosix)
    heartbeat.py  this node's lease, heartbeat and view
    renewal.py    the renewer thread: publish, extend the lease, read
    leasefile.py  the lease file the keeper watches
"""
